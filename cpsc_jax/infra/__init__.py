"""Infrastructure: devices and processes, checkpoints, metrics writers, pictures."""
