"""PyTorch baseline of the CPSC-DFKD iteration, for `scripts/benchmark.py` (torch is optional:
only `cpsc_jax.benchmark` imports this package, lazily, when a torch variant is asked for)."""
