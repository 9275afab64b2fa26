"""Student accuracy against wall time for several runs (cpsc_jax.infra.plots.accuracy_against_time).

    python scripts/plot_runs.py --out docs/cifar10_cpu.png --title "CIFAR-10, ResNet-20 -> WRN-16-1" \
        released=runs/c10/released/seed0,runs/c10/released/seed1 improved=runs/c10/improved/seed0

Each LABEL=DIR[,DIR...] names the run directories (their metrics.jsonl, finished or not) drawn
under one label.
"""
import argparse

from cpsc_jax.infra import plots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=DIR[,DIR...]")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    p.add_argument("--anchor", type=float, default=None, help="a horizontal line (e.g. the teacher)")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, _, dirs = spec.partition("=")
        if not dirs:
            p.error(f"{spec!r}: expected LABEL=DIR[,DIR...]")
        runs[label] = [plots.load_history(d) for d in dirs.split(",")]
    print(plots.accuracy_against_time(runs, args.out, args.title, args.anchor))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
