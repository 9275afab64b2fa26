"""Plots of runs (cpsc_jax.infra.plots): real PNGs whose content follows the data."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from cpsc_jax.infra import plots   # noqa: E402


def history(accs, agreement=0.9, k=10):
    return [{"epoch": i + 1, "step": 50 * (i + 1), "elapsed_s": 30.0 * (i + 1),
             "student_accuracy": a,
             "faithfulness": {"agreement": agreement, "per_class_agreement": [agreement] * k}}
            for i, a in enumerate(accs)]


def test_run_curves_writes_a_picture_that_changes_with_the_run(tmp_path):
    a = plots.run_curves(history([10.0, 50.0, 90.0]), str(tmp_path / "a.png"), "a run")
    b = plots.run_curves(history([10.0, 20.0, 30.0], agreement=0.2), str(tmp_path / "b.png"))
    ia, ib = (np.asarray(Image.open(p).convert("RGB")) for p in (a, b))
    assert ia.shape[0] > 100 and ia.shape[1] > 300
    assert ia.shape != ib.shape or np.any(ia != ib)
    assert not list(tmp_path.glob("*.tmp.png"))
    # A data-free run (no accuracy) still draws the agreement.
    plots.run_curves(history([None, None]), str(tmp_path / "free.png"))
    assert (tmp_path / "free.png").stat().st_size > 1000


def test_accuracy_against_time_compares_settings(tmp_path):
    runs = {"released": [history([20.0, 30.0]), history([25.0, 35.0, 40.0])],
            "improved": [history([50.0, 70.0])]}
    path = plots.accuracy_against_time(runs, str(tmp_path / "c.png"), "cmp", anchor=91.6)
    assert Image.open(path).size[0] > 300


def test_load_history_reads_the_evaluations_of_a_run_even_unfinished(tmp_path):
    import json
    lines = [{"step": 1, "loss": 3.0}, {"step": 50, "epoch": 1, "student_accuracy": 40.0,
                                       "elapsed_s": 12.0},
             {"step": 100, "epoch": 2, "student_accuracy": 60.0, "elapsed_s": 24.0}]
    text = "\n".join(json.dumps(l) for l in lines) + '\n{"step": 101, "lo'   # torn by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    h = plots.load_history(str(tmp_path))
    assert [r["student_accuracy"] for r in h] == [40.0, 60.0] and h[1]["elapsed_s"] == 24.0
