"""Teacher training: augmentation, the data-parallel step, resume, metrics and the checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import optax
import pytest

from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax.infra import runtime
from cpsc_jax.teachers import training as tt
from cpsc_jax.config.defaults import teacher_config
from cpsc_jax.config.validation import ConfigError
from cpsc_jax.training.evaluation import accuracy
from cpsc_jax.training.state import TrainState

REPO = Path(__file__).resolve().parents[1]


def digits_config(**kw):
    c = teacher_config("digits", epochs=2, log_every_s=1e9, checkpoint_min_interval_s=0.0)
    c.update(kw)
    return c


# --- the data-parallel step --------------------------------------------------------------------

def _state(arch="small_cnn", size=8, channels=1, axis=tt.AXIS):
    spec = ckpt_lib.ModelSpec(arch, 10, size, channels, (0.3,), (0.4,))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    v = ckpt_lib.init_variables(spec, jax.random.PRNGKey(0))
    return TrainState.create(apply_fn=spec.build(axis_name=axis).apply, params=v["params"],
                             batch_stats=v["batch_stats"], tx=tx)


def _on_devices(array, topo):
    return runtime.shard_local(np.broadcast_to(array[None], (topo.num_local,) + array.shape), topo)


def test_chunk_scan_with_padding_equals_single_steps():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    labels = rng.randint(0, 10, 40).astype(np.int32)
    topo = runtime.topology(max_devices=1)
    imgs, labs = _on_devices(images, topo), _on_devices(labels, topo)
    key = runtime.replicate(jax.random.PRNGKey(1), topo)
    idx = rng.randint(0, 40, (1, 4, 8)).astype(np.int32)  # [D, K, b]
    single = tt.make_train_step((0.3,), (0.4,), 1, True, steps_per_call=1)
    s1 = runtime.replicate(_state(), topo)
    losses = []
    for k in range(3):
        s1, sums = single(s1, np.ones(1, bool), key, imgs, labs, idx[:, k:k + 1])
        losses.append(float(sums["loss_sum"]))
    multi = tt.make_train_step((0.3,), (0.4,), 1, True, steps_per_call=4)
    s4, sums4 = multi(runtime.replicate(_state(), topo), np.array([True, True, True, False]),
                      key, imgs, labs, idx)  # the 4th step is padding
    assert int(s4.step) == int(s1.step) == 3
    assert int(sums4["count"]) == 24
    np.testing.assert_allclose(float(sums4["loss_sum"]), sum(losses), rtol=1e-5)
    chex.assert_trees_all_close(s4.params, s1.params, atol=1e-5)
    chex.assert_trees_all_close(s4.batch_stats, s1.batch_stats, atol=1e-5)


@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 simulated devices (conftest)")
def test_two_devices_match_one():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (64, 8, 8, 1)).astype(np.uint8)
    labels = rng.randint(0, 10, 64).astype(np.int32)
    out = {}
    for n in (1, 2):   # the same global batch of 32 on one device, then split over two
        topo = runtime.topology(max_devices=n)
        idx, valid = tt.epoch_indices(0, 1, 64, 1, 32, 1, topo)
        step = tt.make_train_step((0.3,), (0.4,), 0, False, steps_per_call=1)
        state, sums = step(runtime.replicate(_state(), topo), valid,
                           runtime.replicate(jax.random.PRNGKey(0), topo),
                           _on_devices(images, topo), _on_devices(labels, topo), idx)
        out[n] = jax.device_get((state.params, state.batch_stats, sums))
    chex.assert_trees_all_close(out[1][0], out[2][0], atol=2e-5)   # gradients averaged
    chex.assert_trees_all_close(out[1][1], out[2][1], atol=2e-5)   # global BN statistics
    np.testing.assert_allclose(out[1][2]["loss_sum"], out[2][2]["loss_sum"], rtol=1e-5)
    assert int(out[2][2]["count"]) == 32


# --- the whole run: checkpoint, metrics, resume ------------------------------------------------

def test_train_teacher_writes_checkpoint_metrics_and_resumes(tmp_path):
    lines = []
    full = tt.train_teacher(digits_config(epochs=3), str(tmp_path / "a"), log=lines.append)
    assert full == str(tmp_path / "a" / "teacher")
    spec, variables = ckpt_lib.load_model(full)
    assert (spec.arch, spec.num_classes, spec.image_size, spec.channels) == ("small_cnn", 10, 8, 1)
    chex.assert_trees_all_close(spec.mean, data_lib.dataset_info("digits").mean)
    records = [json.loads(l) for l in open(tmp_path / "a" / tt.METRICS_FILE)]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "elapsed_s", "images_per_s"):
        assert key in records[-1]
    assert records[-1]["lr"] == 0.0 and records[0]["lr"] > records[1]["lr"]  # cosine to 0
    test = data_lib.load_split({"name": "digits"}, "test")
    acc = accuracy(spec.build(), variables, test, spec.mean, spec.std)
    assert acc == pytest.approx(records[-1]["test_accuracy"]) and acc > 80.0
    assert spec.extra["accuracy"]["digits/test"] == pytest.approx(acc, abs=1e-3)
    assert any("ETA" in l for l in lines)

    # Interrupted after epoch 2 (its checkpoint and metric line are written), then re-run.
    cfg = digits_config(epochs=3, log_every_s=0.0)  # progress lines at every step
    with pytest.raises(KeyboardInterrupt):
        tt.train_teacher(cfg, str(tmp_path / "b"), log=_raise_at("teacher epoch 2/3 loss"))
    assert not ckpt_lib.is_model_checkpoint(str(tmp_path / "b" / "teacher"))
    resumed = []
    tt.train_teacher(cfg, str(tmp_path / "b"), log=resumed.append)
    assert any("resuming" in l and "after epoch 2/3" in l for l in resumed)
    assert not any("warning" in l for l in resumed), resumed
    _, v2 = ckpt_lib.load_model(str(tmp_path / "b" / "teacher"))
    chex.assert_trees_all_close(v2, variables, atol=1e-6)  # same trajectory as uninterrupted
    records_b = [json.loads(l) for l in open(tmp_path / "b" / tt.METRICS_FILE)]
    assert [r["epoch"] for r in records_b] == [1, 2, 3]

    # A finished run returns at once.
    again = []
    assert tt.train_teacher(cfg, str(tmp_path / "b"), log=again.append) == str(tmp_path / "b" / "teacher")
    assert "nothing to train" in again[0]


def test_resume_refuses_another_architecture(tmp_path):
    cfg = digits_config(epochs=2)
    with pytest.raises(KeyboardInterrupt):
        tt.train_teacher(cfg, str(tmp_path), log=_raise_at("teacher epoch 1/2 loss"))
    with pytest.raises(runtime.RunError, match="arch: 'small_cnn' -> 'small_cnn_half'.*fresh"):
        tt.train_teacher(digits_config(epochs=2, arch="small_cnn_half"), str(tmp_path),
                         log=lambda s: None)
    warned = []   # harmless changes go on, with a warning
    tt.train_teacher(digits_config(epochs=2, eval_batch_size=100), str(tmp_path), log=warned.append)
    assert any("warning" in l and "eval_batch_size" in l for l in warned)


def _raise_at(prefix):
    def log(msg):
        if msg.startswith(prefix):
            raise KeyboardInterrupt
    return log


@pytest.mark.parametrize("overrides,message", [
    (dict(batch_size=4096), "exceeds the 1438 training images"),
    (dict(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)), "mean/std have 3/3 values"),
    (dict(arch="resnet1000"), "unknown model 'resnet1000'; valid names"),
    (dict(epochs=0), "config.epochs must be an integer >= 1"),
    (dict(lr=-1.0), "config.lr must be a number > 0"),
    (dict(arch="lenet5_half"), "lenet5_half needs inputs of at least 32x32 pixels"),
])
def test_bad_settings_fail_early(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tt.train_teacher(digits_config(**overrides), str(tmp_path), log=lambda s: None)
    assert not (tmp_path / tt.STATE_DIR).exists()


def test_batch_not_divisible_by_the_devices(tmp_path):
    if jax.local_device_count() < 2:
        pytest.skip("needs 2 simulated devices (conftest)")
    with pytest.raises(ConfigError, match="not divisible by the 2 cpu device"):
        tt.train_teacher(digits_config(batch_size=63), str(tmp_path), log=lambda s: None)


def _mnist_like_folder(path, n=256):
    """A folder of train.npz/test.npz with 32x32 grey digits-shaped noise (no real data)."""
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        np.savez(path / f"{split}.npz", data=rng.randint(0, 256, (n, 32, 32)).astype(np.uint8),
                 labels=rng.randint(0, 10, n))
    return str(path)


def test_network_without_batchnorm_trains_and_resumes(tmp_path):
    """lenet5 has no BatchNorm (no batch_stats at all): fresh and resumed runs work."""
    cfg = teacher_config("mnist", arch="lenet5", epochs=2, batch_size=64, log_every_s=1e9,
                         checkpoint_min_interval_s=0.0)
    cfg.data.dir = _mnist_like_folder(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tt.train_teacher(cfg, str(tmp_path / "w"), log=_raise_at("teacher epoch 1/2 loss"))
    path = tt.train_teacher(cfg, str(tmp_path / "w"), log=lambda s: None)
    spec, variables = ckpt_lib.load_model(path)
    assert spec.arch == "lenet5" and "batch_stats" not in variables


def test_diverging_teacher_stops_without_saving(tmp_path):
    with pytest.raises(runtime.NonFiniteError, match="lower --config.lr"):
        tt.train_teacher(digits_config(lr=1e6, epochs=3),
                         str(tmp_path), log=lambda s: None)
    assert not ckpt_lib.is_model_checkpoint(str(tmp_path / "teacher"))


@pytest.mark.slow
def test_script_parses_flags_and_overrides(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train_teacher.py"),
                        "--config", "teacher:digits", "--workdir", str(tmp_path),
                        "--config.epochs=1", "--config.batch_size=128"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "teacher")
    assert "1 epochs x 11 steps of 128" in r.stdout
    assert ckpt_lib.is_model_checkpoint(str(tmp_path / "teacher"))


@pytest.mark.parametrize("arg", ["digits", "mnist", "cifar10", "cifar10,wrn_40_2",
                                 "cifar100,vgg11_bn", "svhn", "tiny_imagenet"])
def test_teacher_config_for_every_dataset(arg):
    from conftest import load_config
    c = load_config("teacher", arg)
    info = data_lib.dataset_info(c.data.name)
    assert c.arch == (arg.split(",")[1] if "," in arg else c.arch)
    assert c.arch in __import__("cpsc_jax.models", fromlist=["x"]).available_models()
    assert len(c.mean) == len(c.std) == info.channels
    assert (c.mean, c.std) == (info.mean, info.std)


def test_a_stop_mid_epoch_saves_that_step_and_resumes_bit_identically(tmp_path):
    """Ctrl-C / SIGTERM inside an epoch keeps the steps done (not the last epoch's end), with
    the epoch's running sums, and the re-run ends where an uninterrupted run does."""
    from cpsc_jax.infra import runtime
    cfg = digits_config(epochs=2, log_every_s=0.0, steps_per_call=1)
    straight = tt.train_teacher(cfg, str(tmp_path / "a"), log=lambda *_: None)
    _, reference = ckpt_lib.load_model(straight)
    said = []

    def stop_in_epoch_2(line):
        said.append(line)
        if "teacher epoch 2/2 step 7/" in line:
            runtime.request_stop()

    with pytest.raises(KeyboardInterrupt):
        tt.train_teacher(cfg, str(tmp_path / "b"), log=stop_in_epoch_2)
    saved = [l for l in said if "saved step" in l]
    assert saved and "(epoch 2, 7 of" in saved[0], said[-3:]
    resumed = []
    path = tt.train_teacher(cfg, str(tmp_path / "b"), log=resumed.append)
    assert any("resuming" in l and "7 of" in l for l in resumed), resumed
    _, variables = ckpt_lib.load_model(path)
    chex.assert_trees_all_equal(variables, reference)
    records = [json.loads(l) for l in open(tmp_path / "b" / tt.METRICS_FILE)]
    straight_records = [json.loads(l) for l in open(tmp_path / "a" / tt.METRICS_FILE)]
    timing = ("epoch_time_s", "elapsed_s", "images_per_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
    assert strip(records) == strip(straight_records)
