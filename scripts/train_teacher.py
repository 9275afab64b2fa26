"""`cpsc-train-teacher` from a checkout: see cpsc_jax/cli/train_teacher.py (and `--help`)."""
from cpsc_jax.cli.train_teacher import main

if __name__ == "__main__":
    raise SystemExit(main())
