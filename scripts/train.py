"""`cpsc-train` from a checkout: see cpsc_jax/cli/train.py (and `--help`)."""
from cpsc_jax.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
