"""scripts/evaluate.py and the evaluation helpers behind it."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax.training import evaluation as ev

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grey_checkpoint(tmp_path_factory):
    """A (random) 32x32 grey small_cnn with MNIST normalisation."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    spec = ckpt_lib.ModelSpec("small_cnn", 10, 32, 1, (0.1307,), (0.3081,))
    ckpt_lib.save_model(str(path), spec, ckpt_lib.init_variables(spec, jax.random.PRNGKey(0)))
    return str(path)


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    spec = ckpt_lib.ModelSpec("small_cnn", 10, 32, 3, data_lib.dataset_info("cifar10").mean,
                              data_lib.dataset_info("cifar10").std)
    ckpt_lib.save_model(str(path), spec, ckpt_lib.init_variables(spec, jax.random.PRNGKey(1)))
    return str(path)


def test_accuracy_report():
    r = ev.accuracy_report(np.array([0, 1, 1, 2, 0]), np.array([0, 1, 2, 2, 1]), 4)
    assert r["accuracy"] == pytest.approx(60.0) and r["num_examples"] == 5
    assert r["per_class_accuracy"] == [100.0, 50.0, 50.0, None]
    assert r["per_class_count"] == [1, 2, 2, 0]


def test_predict_pads_the_tail_and_normalises_like_host(grey_checkpoint):
    spec, variables = ckpt_lib.load_model(grey_checkpoint)
    x = np.random.RandomState(0).randint(0, 256, (7, 32, 32, 1)).astype(np.uint8)
    preds = ev.predict_labels(spec.build(), variables, x, spec.mean, spec.std, batch_size=3)
    logits = spec.build().apply(variables, data_lib.normalize(x, spec.mean, spec.std), train=False)
    np.testing.assert_array_equal(preds, np.argmax(np.asarray(logits), -1))


def test_evaluate_resizes_mnist_like_npz(grey_checkpoint, tmp_path):
    rng = np.random.RandomState(0)
    x28 = rng.randint(0, 256, (9, 28, 28)).astype(np.uint8)
    y = rng.randint(0, 10, 9)
    np.savez(tmp_path / "m.npz", data=x28, labels=y)
    with pytest.raises(data_lib.DataError, match="28x28.*takes 32x32.*--resize"):
        ev.evaluate_checkpoint(grey_checkpoint, str(tmp_path / "m.npz"))
    report = ev.evaluate_checkpoint(grey_checkpoint, str(tmp_path / "m.npz"), batch_size=4,
                                    resize=True)
    assert report["resized_from"] == [28, 28] and report["num_examples"] == 9
    spec, variables = ckpt_lib.load_model(grey_checkpoint)
    preds = ev.predict_labels(spec.build(), variables,
                                  data_lib.resize_uint8(x28[..., None], 32), spec.mean, spec.std)
    assert report["accuracy"] == pytest.approx(100.0 * np.mean(preds == y))
    assert report == {**report, **ev.accuracy_report(preds, y, 10)}


def test_evaluate_cifar_folder_holdout_and_single_batch(rgb_checkpoint, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(1, 6):
        x = rng.randint(0, 256, (3 + i, 3072)).astype(np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": list(range(3 + i))}, f)
    r = ev.evaluate_checkpoint(rgb_checkpoint, str(tmp_path), protocol="holdout")
    assert r["num_examples"] == 8 and r["set"].startswith("cifar10-holdout")
    r2 = ev.evaluate_checkpoint(rgb_checkpoint, str(folder / "data_batch_5"))
    assert r2["accuracy"] == r["accuracy"] and r2["per_class_count"] == r["per_class_count"]
    with pytest.raises(data_lib.DataError, match="holdout"):
        ev.evaluate_checkpoint(rgb_checkpoint, str(tmp_path))


def test_evaluate_rejects_channel_mismatch(grey_checkpoint, tmp_path):
    np.savez(tmp_path / "rgb.npz", data=np.zeros((2, 32, 32, 3), np.uint8), labels=[0, 1])
    with pytest.raises(data_lib.DataError, match="channels"):
        ev.evaluate_checkpoint(grey_checkpoint, str(tmp_path / "rgb.npz"))


@pytest.mark.slow
def test_evaluate_script_last_line_is_json(grey_checkpoint, tmp_path):
    rng = np.random.RandomState(1)
    np.savez(tmp_path / "m.npz", data=rng.randint(0, 256, (5, 28, 28)).astype(np.uint8),
             labels=[0, 1, 2, 3, 3])
    script = str(REPO / "scripts" / "evaluate.py")
    r = subprocess.run([sys.executable, script, "--checkpoint", grey_checkpoint,
                        "--data", str(tmp_path / "m.npz"), "--resize"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["num_examples"] == 5 and 0.0 <= out["accuracy"] <= 100.0
    assert out["per_class_count"][3] == 2 and out["resized_from"] == [28, 28]
    assert "accuracy" in r.stdout.strip().splitlines()[-2]
    bad = subprocess.run([sys.executable, script, "--checkpoint", grey_checkpoint,
                          "--data", str(tmp_path / "nothing_here")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    err = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "nothing_here" in err[0]
