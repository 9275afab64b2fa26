"""`cpsc-convert-teacher` from a checkout: see cpsc_jax/cli/convert_teacher.py (and `--help`)."""
from cpsc_jax.cli.convert_teacher import main

if __name__ == "__main__":
    raise SystemExit(main())
