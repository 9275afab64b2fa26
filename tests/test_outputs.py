"""What a run reports besides metrics.jsonl: TensorBoard event files, learning rates, a profiler
trace, and a student exported to PyTorch that loads and predicts like the Flax one."""
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, run_iterations, tiny_digits_config
from cpsc_jax.infra import metrics
from cpsc_jax.method.optimizers import student_schedule


def read_events(logdir):
    """Every Event proto in the TFRecord event files under `logdir` (length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    events = []
    for root, _, files in os.walk(logdir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            with open(os.path.join(root, name), "rb") as f:
                raw = f.read()
            at = 0
            while at < len(raw):
                (length,) = struct.unpack("<Q", raw[at:at + 8])
                events.append(event_pb2.Event.FromString(raw[at + 12:at + 12 + length]))
                at += 12 + length + 4
    return events


def test_tensorboard_writer_writes_scalars_images_and_hyperparameters(tmp_path):
    pytest.importorskip("tensorboardX")
    config = tiny_digits_config()
    tb = metrics.summary_writer(str(tmp_path / "tb"))
    assert tb.enabled
    tb.write_hparams(config)
    record = {"generator/loss": -1.5, "generator/teacher_agrees": 0.75, "student/kd": 0.25,
              "student_accuracy": None, "note": "skipped", "epoch": 1,
              "lr/student": 0.1, "lr/generator": 1e-3}
    tb.write(3, record)
    grid = np.zeros((10, 12, 3), np.uint8)
    grid[2:4, 5:7] = 255
    tb.write_image(3, "samples", grid)
    tb.close()

    events = read_events(tmp_path / "tb")
    scalars = {(v.tag, e.step): v.simple_value for e in events if e.HasField("summary")
               for v in e.summary.value if v.HasField("simple_value")}
    assert scalars[("generator/loss", 3)] == pytest.approx(-1.5)
    assert scalars[("generator/teacher_agrees", 3)] == pytest.approx(0.75)
    assert scalars[("lr/student", 3)] == pytest.approx(record["lr/student"])
    assert scalars[("epoch", 3)] == 1.0
    assert not any(tag in ("student_accuracy", "note") for tag, _ in scalars)
    tags = {v.tag for e in events if e.HasField("summary") for v in e.summary.value}
    assert {"samples", "_hparams_/experiment", "_hparams_/session_start_info"} <= tags
    image = next(v.image for e in events for v in e.summary.value if v.tag == "samples")
    assert (image.height, image.width) == (10, 12)
    assert any(tag.startswith("config") for tag in tags)


def test_tensorboard_resume_purges_repeated_steps_and_null_writer_is_silent(tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("tensorboardX")
    tb = metrics.summary_writer(str(tmp_path / "tb"), resume_step=4)
    tb.write(5, {"x": 1.0})
    tb.close()
    starts = [e for e in read_events(tmp_path / "tb") if e.HasField("session_log")]
    assert starts and starts[0].step == 5   # TensorBoard drops older events from step 5 on

    monkeypatch.setattr(metrics, "_summary_backend", lambda: None)
    null = metrics.summary_writer(str(tmp_path / "none"))
    assert not null.enabled and "tensorboardX" in null.reason
    null.write(1, {"x": 1.0})
    null.write_image(1, "s", np.zeros((2, 2)))
    null.close()
    assert not (tmp_path / "none").exists()
    assert not metrics.summary_writer(str(tmp_path / "off"), enabled=False).enabled


@pytest.mark.slow
def test_the_iteration_reports_the_learning_rates_of_the_optimizers_schedules():
    config = tiny_digits_config("released")   # per_epoch student schedule, warm-up 1 epoch of 2 iterations
    _, history = run_iterations(config, 1, n_iters=4, report_learning_rates=True)
    schedule = student_schedule(config, config.s_steps)
    for iteration, m in enumerate(history, start=1):
        assert float(m["lr/student"]) == pytest.approx(float(schedule((iteration - 1) * config.s_steps)))
        assert float(m["lr/generator"]) == pytest.approx(config.lr_generator)   # released: constant
    assert float(history[0]["lr/student"]) == pytest.approx(config.lr_student)   # epoch 1 of W=1
    assert float(history[2]["lr/student"]) < config.lr_student                   # cosine part
    config.generator_optimizer, config.generator_schedule = "persistent", "cosine"
    _, history = run_iterations(config, 1, n_iters=4, report_learning_rates=True)
    total = config.epochs * config.epoch_itrs * config.g_steps
    for iteration, m in enumerate(history, start=1):
        done = (iteration - 1) * config.g_steps
        expected = config.lr_generator * 0.5 * (1 + np.cos(np.pi * done / total))
        assert float(m["lr/generator"]) == pytest.approx(expected, rel=1e-5)
    assert float(history[3]["lr/generator"]) < config.lr_generator


def test_profile_window_traces_the_iterations_after_compilation(tmp_path):
    step_fn = jax.jit(lambda x: x @ x / 8.0)
    state = jnp.ones((8, 8))
    with metrics.ProfileWindow(str(tmp_path / "profile"), num_steps=2, start_after=1) as window:
        for step in range(1, 6):
            state = step_fn(state)
            window.after_iteration(step, state)
            assert window.active == (step in (1, 2))
    assert window.done
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files
              if f.endswith(".xplane.pb")]
    assert len(traces) == 1

    off = metrics.ProfileWindow(str(tmp_path / "none"), num_steps=0, start_after=1)
    off.after_iteration(1, state)
    off.close()
    assert not (tmp_path / "none").exists()
    # A run that ends inside the window still closes its trace.
    cut = metrics.ProfileWindow(str(tmp_path / "cut"), num_steps=10, start_after=1)
    cut.after_iteration(1, state)
    cut.close()
    assert cut.done and not cut.active


def test_profile_steps_is_a_validated_config_field():
    from cpsc_jax.config.validation import ConfigError, validate_config
    config = tiny_digits_config()
    assert config.profile_steps == 0
    config.profile_steps = 3
    validate_config(config, num_devices=2)
    config.profile_steps = -1
    with pytest.raises(ConfigError, match="profile_steps must be an integer >= 0"):
        validate_config(config, num_devices=2)


# ------------------------------------------------------------------------------ PyTorch export

def _randomised_variables(arch, num_classes, size, channels, seed):
    """Random weights (LeCun-normal kernels, as Flax initialises them) plus BatchNorm scales
    and running statistics away from (1, 0, 1), so that a layout or normalisation slip in the
    export cannot hide. Drawn with NumPy into the shapes `init` would give: initialising the
    deep networks op by op would compile hundreds of small programs."""
    from cpsc_jax.models import get_model
    model = get_model(arch, num_classes)
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("'kernel']"):
            value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif name.endswith(("'var']", "'scale']")):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0, 0.1, leaf.shape)
        return value.astype(np.float32)
    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    return model, {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def _export_cases():
    from cpsc_jax.models import BUILT_IN
    return sorted(BUILT_IN)


@pytest.mark.parametrize("arch", _export_cases())
def test_exported_student_loads_strictly_and_predicts_like_flax(arch, tmp_path):
    """Every registry architecture: Flax checkpoint -> export_student -> the PyTorch mirror
    (`cpsc_jax.pytorch.models`) with load_state_dict(strict=True) -> the same logits.

    Measured on jaxlib 0.10.2 / torch 2.13 CPU (float32, 8x8 inputs, 32x32 for LeNet): the
    largest logit difference is below 1e-6 of the largest logit for every architecture
    (6.8e-7 at most, wrn_40_2)."""
    torch = pytest.importorskip("torch")
    from cpsc_jax.infra.checkpoint import ModelSpec, save_model
    from cpsc_jax.teachers.convert import export_student
    from cpsc_jax.pytorch.models import get_model as torch_model

    channels = 1 if arch.startswith(("lenet", "small_cnn")) else 3
    size, k = (32 if arch.startswith("lenet") else 8), 7
    model, variables = _randomised_variables(arch, k, size, channels, seed=len(arch))
    spec = ModelSpec(arch, k, size, channels, (0.5,) * channels, (0.25,) * channels)
    save_model(str(tmp_path / "student"), spec, variables)
    export_student(str(tmp_path / "student"), str(tmp_path / "student.pt"))

    meta = json.loads((tmp_path / "student.json").read_text())
    net = torch_model(arch, k, channels=channels)
    assert meta["pytorch"]["class"] == f"{type(net).__module__}.{type(net).__qualname__}"
    assert meta["pytorch"]["build"].endswith(f"get_model({arch!r}, {k}, channels={channels})")
    state = torch.load(str(tmp_path / "student.pt"), weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval()

    x = np.random.default_rng(0).standard_normal((3, size, size, channels)).astype(np.float32)
    flax_logits = np.asarray(model.apply(variables, x, train=False))
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    scale = max(float(np.max(np.abs(flax_logits))), 1e-6)
    error = float(np.max(np.abs(flax_logits - torch_logits))) / scale
    print(f"{arch}: max |flax - torch| / max |logit| = {error:.2e}")
    assert error < 2e-5, f"{arch}: relative logit difference {error:.2e}"


def test_one_writer_gives_jsonl_tensorboard_and_console_the_same_records(tmp_path):
    lines = []
    with metrics.create_default_writer(str(tmp_path), console=lines.append) as out:
        tb = out.tensorboard
        seen = []
        tb.write = lambda step, record: seen.append((step, dict(record)))   # what TensorBoard gets
        out.write(3, {"loss": 1.5}, line="iteration 3")
        out.write(4, {"loss": 1.0, "epoch": 1})
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["loss"] for r in records] == [1.5, 1.0] and [r["step"] for r in records] == [3, 4]
    assert seen == [(3, {"loss": 1.5}), (4, {"loss": 1.0, "epoch": 1})]
    assert lines == ["iteration 3"]
    # Another process than the writer writes nothing, not even to the console.
    quiet = metrics.create_default_writer(str(tmp_path / "other"), enabled=False,
                                          console=lines.append)
    quiet.write(5, {"loss": 0.5}, line="never shown")
    assert lines == ["iteration 3"] and not (tmp_path / "other" / "metrics.jsonl").exists()

def test_tensorboard_backend_loads_without_importing_torch():
    """tensorboardX would import torch (seconds at every run start) for its type hints only:
    the writer loads without it, and torch still imports normally afterwards."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("torch")
    code = ("import sys\n"
            "from cpsc_jax.infra import metrics\n"
            "assert metrics._summary_backend() is not None\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import torch\n"
            "assert torch.ones(2).sum().item() == 2.0\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]
