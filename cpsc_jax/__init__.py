"""cpsc-jax: Conditional Pseudo-Supervised Contrast for data-free knowledge distillation."""
__version__ = "0.1.0"
