"""`cpsc-ablate` from a checkout: see cpsc_jax/cli/ablate.py (and `--help`)."""
from cpsc_jax.cli.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
