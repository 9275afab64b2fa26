"""`cpsc-evaluate` from a checkout: see cpsc_jax/cli/evaluate.py (and `--help`)."""
from cpsc_jax.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
