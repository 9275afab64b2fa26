"""`cpsc-benchmark` from a checkout: see cpsc_jax/cli/benchmark.py (and `--help`)."""
from cpsc_jax.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
