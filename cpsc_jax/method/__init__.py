"""The method: its losses, the pmapped iteration, the distillation loop and its measurements."""
