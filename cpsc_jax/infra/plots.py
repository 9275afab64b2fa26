"""Pictures people would rather look at than read (matplotlib, optional: `pip install
cpsc-jax[plots]`).

`run_curves` draws one run's history (student accuracy and teacher agreement against iterations
and wall time, and the last evaluation's per-class agreement); the trainer writes it into
WORKDIR/plots/ at the evaluations. `accuracy_against_time` compares runs (seeds of several
settings) on one wall-clock axis, as docs/RESULTS.md shows them.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(ncols: int = 1, figsize=(8, 5)):
    """(figure, axes) drawn off-screen: matplotlib's Figure without pyplot, so no backend is
    chosen for the user's process and no figure is kept in pyplot's registry."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _save(fig, path: str, title: str = "") -> str:
    """Writes `fig` (titled) to `path` atomically."""
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    os.replace(tmp, path)   # a reader never sees half a picture
    return path


def load_history(workdir: str) -> List[Dict[str, Any]]:
    """A run's evaluations from WORKDIR/metrics.jsonl (finished or not), as `accuracy_against_time`
    takes them: [{"epoch", "step", "elapsed_s", "student_accuracy"}, ...]."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:   # a line torn by a kill
                continue
            if "epoch" in r and "student_accuracy" in r:
                out.append({k: r.get(k) for k in ("epoch", "step", "elapsed_s", "student_accuracy")})
    return out


def run_curves(history: Sequence[Dict[str, Any]], path: str, title: str = "") -> str:
    """One run's evaluations (the trainer's `history` records) as a PNG at `path`."""
    steps = [h["step"] for h in history]
    minutes = [h.get("elapsed_s", 0.0) / 60.0 for h in history]
    acc = [h.get("student_accuracy") for h in history]
    agree = [100.0 * h["faithfulness"]["agreement"] for h in history]
    fig, axes = _figure(3, figsize=(15, 4))
    for ax, x, label in ((axes[0], steps, "iteration"), (axes[1], minutes, "wall time (min)")):
        if any(a is not None for a in acc):
            ax.plot(x, [np.nan if a is None else a for a in acc], "o-", label="student accuracy %")
        ax.plot(x, agree, "s--", label="teacher agrees with the label %")
        ax.set_xlabel(label)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    per_class = history[-1]["faithfulness"]["per_class_agreement"] if history else []
    axes[2].bar(range(len(per_class)), [100.0 * p for p in per_class])
    axes[2].set_xlabel("class")
    axes[2].set_ylabel("teacher agrees %")
    axes[2].set_ylim(0, 100)
    axes[2].set_title(f"per class, epoch {history[-1]['epoch']}" if history else "")
    return _save(fig, path, title)


def accuracy_against_time(runs: Dict[str, List[Sequence[Dict[str, Any]]]], path: str,
                          title: str = "", anchor: Optional[float] = None) -> str:
    """Student accuracy against wall-clock minutes: for each label, one thin line per run
    (each a history) and their mean at each evaluation index in bold; `anchor` (e.g. the
    teacher's accuracy) as a horizontal line."""
    import matplotlib
    fig, ax = _figure()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, histories) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        n = min(len(h) for h in histories)
        for h in histories:
            ax.plot([r["elapsed_s"] / 60 for r in h], [r["student_accuracy"] for r in h],
                    color=c, alpha=0.3, lw=1)
        t = np.mean([[r["elapsed_s"] / 60 for r in h[:n]] for h in histories], axis=0)
        a = np.mean([[r["student_accuracy"] for r in h[:n]] for h in histories], axis=0)
        ax.plot(t, a, "o-", color=c, lw=2, label=f"{label} (mean of {len(histories)})")
    if anchor is not None:
        ax.axhline(anchor, color="k", ls=":", label=f"teacher {anchor:.2f}%")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("student accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path, title)
