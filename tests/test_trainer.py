"""The trainer: exact resume, non-finite stop, config validation, the cifar10-holdout protocol
(the end-to-end run of the digits default is test_packaging's)."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, load_config, tiny_digits_config
from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax.training import evaluation
from cpsc_jax.infra.checkpoint import init_variables
from cpsc_jax.config.validation import ConfigError, validate_config, validate_teacher
from cpsc_jax.teachers.teacher import Teacher, load_teacher
from cpsc_jax.teachers.training import resolve_teacher
from cpsc_jax.method.trainer import NonFiniteLossError, train_and_evaluate

quiet = lambda *a: None


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _without_times(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


@pytest.mark.slow
def test_interrupted_then_resumed_run_equals_straight_run(tmp_path, digits_teacher,
                                                         digits_teacher_model, monkeypatch):
    from cpsc_jax.method import trainer
    monkeypatch.setattr(trainer, "CURVES_MIN_INTERVAL_S", 1e9)   # curves only where due anyway
    teacher = digits_teacher_model
    config = tiny_digits_config()
    config.teacher.checkpoint = digits_teacher
    # An extra evaluation set (as the 1,017 CIFAR-10 test images are for cifar10-holdout).
    test = data_lib.load_split({"name": "digits"}, "test")
    extra = tmp_path / "extra.npz"
    np.savez(extra, data=test.images[:50, ..., 0], labels=test.labels[:50])
    config.data.extra_eval = str(extra)
    straight = train_and_evaluate(config, str(tmp_path / "straight"), teacher, log=quiet)
    assert train_and_evaluate(config, str(tmp_path / "split"), teacher, log=quiet,
                              stop_after_epochs=1) == {"stopped_at_step": config.epoch_itrs}
    assert not (tmp_path / "split" / "student").exists()
    assert (tmp_path / "split" / "plots" / "curves.png").is_file()   # drawn when it stops
    resumed = train_and_evaluate(config, str(tmp_path / "split"), teacher, log=quiet)
    _, a = ckpt_lib.load_model(straight["student_checkpoint"])
    _, b = ckpt_lib.load_model(resumed["student_checkpoint"])
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-7)
    assert _without_times(straight["history"]) == _without_times(resumed["history"])
    assert resumed["elapsed_s"] >= resumed["history"][-1]["elapsed_s"] > 0
    lines = lambda d: [json.loads(l)["step"] for l in open(tmp_path / d / "metrics.jsonl")]
    assert lines("straight") == lines("split")
    for key in ("teacher_accuracy", "student_accuracy", "best_student_accuracy"):
        assert isinstance(resumed[key], float)
    # Every evaluation set is reported, and each figure is what evaluating the saved model gives.
    assert set(resumed["student_accuracies"]) == {"test", "extra"}
    assert resumed["eval_sets"]["extra"]["num_examples"] == 50
    for path, key in ((resumed["student_checkpoint"], "student_accuracies"),
                      (digits_teacher, "teacher_accuracies")):
        assert resumed[key]["extra"] == pytest.approx(
            evaluation.evaluate_checkpoint(path, str(extra))["accuracy"])
    assert resumed["student_accuracies"]["test"] == resumed["student_accuracy"]
    assert resumed["best_student_accuracies"]["extra"] == max(
        h["accuracies"]["extra"] for h in resumed["history"])
    assert resumed["protocol"] == "digits"


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits_teacher,
                                                              digits_teacher_model):
    config = tiny_digits_config()
    config.teacher.checkpoint = digits_teacher
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, digits_teacher_model, log=quiet, stop_after_epochs=1)
    manager = ckpt_lib.RunCheckpointer(os.path.join(workdir, "checkpoints"))
    good = manager.latest_step()
    manager.close()
    config.lr_generator = 1e30   # generator weights overflow at once
    os.remove(os.path.join(workdir, "config.json"))   # else the changed rate is refused
    with pytest.raises(NonFiniteLossError, match="non-finite .* intact"):
        train_and_evaluate(config, workdir, digits_teacher_model, log=quiet)
    manager = ckpt_lib.RunCheckpointer(os.path.join(workdir, "checkpoints"))
    assert manager.latest_step() == good
    manager.close()


@pytest.mark.parametrize("field,value,message", [
    ("student.arch", "resnet1000", "unknown model 'resnet1000'; valid names: "),
    ("batch_size", 15, "not divisible by the 2 devices"),
    ("g_steps", 0, "config.g_steps must be an integer >= 1"),
    ("loss.gamma", -0.5, "config.loss.gamma is a loss weight and must be >= 0"),
    ("loss.ikd_form", "cube", "ikd_form must be 'log' or 'mse'"),
    ("generator_optimizer", "sgd", "generator_optimizer must be 'reset'"),
    ("image_size", 10, "divisible by 2\\*\\*generator.num_upsamples"),
])
def test_config_validation_messages(field, value, message):
    config = tiny_digits_config()
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, num_devices=2)


DISTILLATION_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py")
                              if p.stem not in ("__init__", "teacher"))


@pytest.mark.parametrize("name", DISTILLATION_CONFIGS)
def test_every_shipped_config_is_complete_and_valid(name):
    config = load_config(name)
    validate_config(config, num_devices=1)
    # Overrides on the command line need every data field to exist.
    assert {"name", "dir", "protocol", "extra_eval", "tfds_dir"} <= set(config.data)


def test_teacher_mismatch_messages(digits_teacher_model):
    config = tiny_digits_config()
    config.num_classes = 100
    with pytest.raises(ConfigError, match="the teacher has 10 classes but config.num_classes=100"):
        validate_teacher(config, digits_teacher_model)
    config = tiny_digits_config()
    config.image_size = 32
    nobn_spec = ckpt_lib.ModelSpec("lenet5", 10, 32, 1, (0.3,), (0.4,))
    nobn = Teacher(init_variables(nobn_spec, jax.random.PRNGKey(0)), 10, 32, 1, (0.3,), (0.4,),
                   arch="lenet5")
    with pytest.raises(ConfigError, match="needs BatchNorm layers in the teacher"):
        validate_teacher(config, nobn)


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    config = tiny_digits_config()
    config.teacher.checkpoint = str(tmp_path / "nope")
    config.teacher.train_if_missing = False
    with pytest.raises(ConfigError, match="is not a model checkpoint"):
        resolve_teacher(config, str(tmp_path / "w"), log=quiet)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
def test_cifar10_holdout_run_reports_batch5_and_the_1017_test_images(tmp_path):
    """The cifar10-holdout protocol through the trainer on the real files (tiny nets, 1 iteration)."""
    cifar = SHARED_DATA / "cifar10"
    # The teacher as small as the student: the run and the checks below evaluate each on the
    # 10,000 images of data_batch_5.
    info = data_lib.dataset_info("cifar10")
    spec = ckpt_lib.ModelSpec("small_cnn_half", 10, 32, 3, info.mean, info.std)
    teacher = str(tmp_path / "teacher")
    ckpt_lib.save_model(teacher, spec, init_variables(spec, jax.random.PRNGKey(0)))
    config = load_config("cifar10")
    config.teacher.arch, config.student.arch = "small_cnn_half", "small_cnn_half"
    config.teacher.checkpoint = teacher
    config.data.dir = str(cifar / "cifar-10-batches-py")
    config.data.protocol = "holdout"
    config.data.extra_eval = str(cifar / "test_batch_first1017.npz")
    config.batch_size, config.epochs, config.epoch_itrs, config.warmup_epochs = 16, 1, 1, 0
    config.g_steps = config.s_steps = 1
    config.generator.nz, config.generator.ngf = 8, 4
    config.sample_columns = 1
    r = train_and_evaluate(config, str(tmp_path / "run"), load_teacher(teacher), log=quiet)
    assert r["protocol"] == "cifar10-holdout"
    assert r["eval_sets"]["test"]["num_examples"] == 10000
    assert "data_batch_5" in r["eval_sets"]["test"]["name"]
    assert r["eval_sets"]["extra"]["num_examples"] == 1017
    for key, data in (("test", str(cifar / "cifar-10-batches-py" / "data_batch_5")),
                      ("extra", config.data.extra_eval)):
        assert r["teacher_accuracies"][key] == pytest.approx(
            evaluation.evaluate_checkpoint(teacher, data)["accuracy"])
        assert r["student_accuracies"][key] == pytest.approx(
            evaluation.evaluate_checkpoint(r["student_checkpoint"], data)["accuracy"])


def test_a_corrupt_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    import shutil
    state = {"w": np.arange(4.0, dtype=np.float32)}
    manager = ckpt_lib.RunCheckpointer(str(tmp_path / "ckpt"))
    manager.save(1, state, {"epoch": 1})
    manager.save(2, {"w": state["w"] + 1}, {"epoch": 2})
    manager.close()
    # Tear the newest step's state (as a disk fault would), and leave a crashed save's
    # temporary directory behind.
    for p in (tmp_path / "ckpt" / "2" / "state").iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.write_bytes(b"")
    (tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-123").mkdir()
    warnings = []
    manager = ckpt_lib.RunCheckpointer(str(tmp_path / "ckpt"))
    restored, meta, step = manager.restore_latest_intact(
        {"w": jax.ShapeDtypeStruct((4,), np.float32)}, log=warnings.append)
    manager.close()
    assert step == 1 and meta == {"epoch": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert warnings and "checkpoint" in warnings[0] and "unreadable" in warnings[0]
    assert not (tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-123").exists()


@pytest.mark.slow
def test_train_and_evaluate_in_process(tmp_path, digits_teacher_model, monkeypatch):
    """End to end in one process, as flax/examples/imagenet/train_test.py does: a tiny config,
    a workdir, and every artefact a run promises."""
    from cpsc_jax.infra import plots
    from cpsc_jax.method import trainer
    drawn = []
    run_curves = plots.run_curves
    monkeypatch.setattr(plots, "run_curves", lambda history, *a, **k: (
        drawn.append(len(history)), run_curves(history, *a, **k))[1])
    # However slowly a loaded machine compiles, the interval has not passed before the end.
    monkeypatch.setattr(trainer, "CURVES_MIN_INTERVAL_S", 1e9)
    config = tiny_digits_config()
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir), digits_teacher_model, log=quiet)
    # The curves are drawn once, at the last evaluation, with every evaluation in them.
    assert drawn == [config.epochs], drawn
    assert results["iterations"] == config.epochs * config.epoch_itrs
    assert 0.0 <= results["student_accuracy"] <= 100.0
    assert set(results["faithfulness"]) >= {"agreement", "confidence", "diversity",
                                            "real_diversity", "per_class_agreement"}
    assert len(results["faithfulness"]["per_class_agreement"]) == config.num_classes
    for name in ("config.json", "metrics.jsonl", "results.json", "student/model.json",
                 "student_best/model.json", "samples/epoch_0002.png", "plots/curves.png",
                 "teacher.json"):
        assert (workdir / name).exists(), name
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == config.batch_size
    spec, variables = ckpt_lib.load_model(str(workdir / "student"))
    test = data_lib.load_split({"name": "digits"}, "test")
    acc = evaluation.accuracy(spec.build(), variables, test, spec.mean, spec.std)
    assert acc == pytest.approx(results["student_accuracy"])
    best_spec, _ = ckpt_lib.load_model(str(workdir / "student_best"))
    assert best_spec.extra["epoch"] == results["best_epoch"]


@pytest.mark.slow
def test_a_collapsed_student_is_reported_in_the_log_metrics_and_results(tmp_path,
                                                                         digits_teacher_model):
    """An outsized student rate kills its ReLUs: it answers one class, and the run says so."""
    config = tiny_digits_config("released")
    config.lr_student = 30.0
    lines = []
    results = train_and_evaluate(config, str(tmp_path / "run"), digits_teacher_model,
                                 log=lines.append)
    assert results["collapsed"] is True and results["collapsed_epochs"][-1] == config.epochs
    assert results["history"][-1]["collapse"]["student_share"] >= 0.5
    assert any("WARNING: collapsed student" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flags = [r["collapse/collapsed"] for r in records if "collapse/collapsed" in r]
    assert flags and flags[-1] == 1.0


@pytest.mark.slow
def test_a_run_says_it_compiles_and_warns_once_when_it_would_take_hours(tmp_path, monkeypatch,
                                                                        digits_teacher_model):
    from cpsc_jax.method import trainer
    monkeypatch.setattr(trainer, "LONG_RUN_S", 0.0)   # any remaining time counts as long
    # Checked after the second iteration, so that two more follow (the tiny config's 2 x 2
    # iterations, whose compiled program other tests share).
    monkeypatch.setattr(trainer, "LONG_RUN_CHECK_AFTER", 1)
    config = tiny_digits_config()
    config.log_every = 100
    lines = []
    train_and_evaluate(config, str(tmp_path / "run"), digits_teacher_model, log=lines.append)
    text = "\n".join(lines)
    assert lines.index(next(l for l in lines if l.startswith("compiling the iteration"))) < \
        lines.index(next(l for l in lines if l.startswith("compiled and ran the first iteration")))
    assert sum("a recipe sized for GPUs" in l for l in lines) == 1, text
    assert "cifar10_cpu" in text


@pytest.mark.slow
def test_resuming_or_reopening_a_run_with_another_teacher_is_refused(tmp_path,
                                                                     digits_teacher_model):
    import dataclasses

    import jax

    from cpsc_jax.teachers.teacher import TeacherChanged
    config = tiny_digits_config()
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, digits_teacher_model, log=quiet, stop_after_epochs=1)
    other = dataclasses.replace(digits_teacher_model, variables=jax.tree.map(
        lambda v: v * 1.001, digits_teacher_model.variables))
    assert other.identity()["sha256"] != digits_teacher_model.identity()["sha256"]
    with pytest.raises(TeacherChanged, match="another teacher.*use a fresh workdir"):
        train_and_evaluate(config, workdir, other, log=quiet)
    # The same teacher resumes, finishes, and the finished run refuses the other one too.
    results = train_and_evaluate(config, workdir, digits_teacher_model, log=quiet)
    assert results["iterations"] == config.epochs * config.epoch_itrs
    with pytest.raises(TeacherChanged):
        train_and_evaluate(config, workdir, other, log=quiet)
