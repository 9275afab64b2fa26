"""The teacher side: the frozen teacher, training one, wrapping Flax models, converting PyTorch checkpoints."""
