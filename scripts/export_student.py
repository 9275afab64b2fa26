"""`cpsc-export-student` from a checkout: see cpsc_jax/cli/export_student.py (and `--help`)."""
from cpsc_jax.cli.export_student import main

if __name__ == "__main__":
    raise SystemExit(main())
