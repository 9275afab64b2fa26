"""Bad input to the command-line tools: a non-zero exit, one line naming what was wrong and what
would be right, no traceback. Each case is a row of docs/RELIABILITY.md.

The commands run in-process through their `main(argv)` (the console scripts call the same
function), which keeps the ~50 cases fast; tests/test_cli_subprocess (at the end of this file)
checks a few of them through real subprocesses (Ctrl-C: tests/test_crash.py).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax.infra import runtime

TINY = ["--config.batch_size=16", "--config.epochs=1", "--config.epoch_itrs=2",
        "--config.g_steps=1", "--config.s_steps=1", "--config.generator.nz=8",
        "--config.generator.ngf=4", "--config.sample_columns=2"]


def run_cli(command: str, args, capsys):
    """(exit code, stdout, stderr) of `cpsc-<command> args`, run in-process."""
    import importlib
    module = importlib.import_module(f"cpsc_jax.cli.{command}")
    code = 0
    try:
        if command in ("train", "train_teacher", "ablate", "benchmark"):
            module.main(["cpsc-" + command, *map(str, args)])
        else:
            code = module.main([*map(str, args)])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    if os.environ.get("CPSC_RELIABILITY_LOG"):   # collects the table of docs/RELIABILITY.md
        with open(os.environ["CPSC_RELIABILITY_LOG"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                                "message": lines[0]}) + "\n")
    return lines[0]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, digits_teacher):
    """Broken inputs of every kind, made once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "a_file").write_text("not a directory")
    (d / "empty_dir").mkdir()
    npz_dir = d / "npz_truncated"
    npz_dir.mkdir()
    np.savez(npz_dir / "train.npz", data=np.zeros((4, 32, 32), np.uint8), labels=np.zeros(4))
    (npz_dir / "test.npz").write_bytes((npz_dir / "train.npz").read_bytes()[:100])
    normalised = d / "normalised"
    normalised.mkdir()
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        np.savez(normalised / f"{split}.npz", labels=rng.randint(0, 10, 8),
                 data=((rng.rand(8, 32, 32) - 0.13) / 0.31).astype(np.float32))
    np.savez(d / "labels_out_of_range.npz", data=np.zeros((4, 8, 8), np.uint8),
             labels=np.array([0, 1, 2, 99]))
    torn = d / "teacher_torn_json"
    shutil.copytree(digits_teacher, torn)
    (torn / "model.json").write_text((torn / "model.json").read_text()[:40])
    wrong_k = d / "teacher_wrong_classes"
    shutil.copytree(digits_teacher, wrong_k)
    meta = json.loads((wrong_k / "model.json").read_text())
    meta["num_classes"] = 7
    (wrong_k / "model.json").write_text(json.dumps(meta))
    unknown_arch = d / "teacher_unknown_arch"
    shutil.copytree(digits_teacher, unknown_arch)
    meta = json.loads((unknown_arch / "model.json").read_text())
    meta["arch"] = "resnet1000"
    (unknown_arch / "model.json").write_text(json.dumps(meta))
    no_vars = d / "teacher_no_variables"
    shutil.copytree(digits_teacher, no_vars)
    shutil.rmtree(no_vars / "variables")
    nan_teacher = d / "teacher_nan"
    spec, variables = ckpt_lib.load_model(digits_teacher)
    variables = {k: {n: v for n, v in c.items()} for k, c in variables.items()}
    import jax
    variables = jax.tree.map(lambda a: np.full(a.shape, np.nan, np.float32), variables)
    ckpt_lib.save_model(str(nan_teacher), spec, variables)
    (d / "grid_bad.json").write_text("{not json")
    (d / "grid_unknown.json").write_text(json.dumps({"r": {"loss.alhpa": 1.0}}))
    (d / "grid_list.json").write_text(json.dumps([1, 2]))
    (d / "grid_preset.json").write_text(json.dumps({"r": {"preset": "relased"}}))
    return d


# ----------------------------------------------------------------------------- cpsc-train

TRAIN_CASES = [
    # (id, args after --config digits --workdir W, words in the error)
    ("unknown_override", ["--config.loss.alhpa=0.5"], ["unknown config field", "alpha"]),
    ("override_bad_type", ["--config.loss.alpha=abc"], ["could not convert", "abc"]),
    ("unknown_student", ["--config.student.arch=nope"], ["unknown model 'nope'", "valid names"]),
    ("batch_not_divisible", ["--config.batch_size=15"], ["not divisible by the 2 devices"]),
    ("zero_g_steps", ["--config.g_steps=0"], ["config.g_steps must be an integer >= 1"]),
    ("negative_weight", ["--config.loss.gamma=-1"], ["config.loss.gamma is a loss weight"]),
    ("bad_ikd_form", ["--config.loss.ikd_form=cube"], ["ikd_form must be 'log' or 'mse'"]),
    ("bad_ce_form", ["--config.loss.ce_form=triple"], ["ce_form must be one of"]),
    ("bad_generator_optimizer", ["--config.generator_optimizer=sgd"], ["'reset'", "'persistent'"]),
    ("bad_student_schedule", ["--config.student_schedule=hourly"], ["'per_epoch'"]),
    ("bad_adapter_optimizer", ["--config.adapter_optimizer=adam"], ["'frozen'", "'sgd'"]),
    ("bad_student_data", ["--config.student_data=cached"], ["'fresh'", "'replay'"]),
    ("negative_replay_size", ["--config.student_data=replay", "--config.replay_size=-5"],
     ["config.replay_size must be 0", "got -5"]),
    ("crop_padding_too_large", ["--config.student_augment.crop_padding=9"],
     ["student_augment.crop_padding must be an integer in [0, image_size=8]"]),
    ("image_size_vs_upsamples", ["--config.image_size=10"], ["divisible by 2**generator"]),
    ("zero_lr", ["--config.lr_student=0"], ["config.lr_student must be > 0"]),
    ("bad_momentum", ["--config.momentum=1.5"], ["config.momentum must be in [0, 1)"]),
    ("warmup_beyond_epochs", ["--config.warmup_epochs=99"], ["config.warmup_epochs must be in"]),
    ("student_too_large_for_input", ["--config.student.arch=lenet5_half"],
     ["lenet5_half needs inputs of at least 32x32 pixels", "8x8"]),
    ("bad_protocol", ["--config.data.protocol=bogus"], ["data.protocol must be one of"]),
    ("holdout_on_digits", ["--config.data.protocol=holdout"], ["holdout", "cifar10 only",
                                                                "use 'standard'"]),
    ("unexpected_argument", ["extra"], ["unexpected arguments: extra"]),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_config(case, tmp_path, capsys, digits_teacher):
    _, args, words = case
    code, _, err = run_cli("train", ["--config", "digits", "--workdir", tmp_path / "w",
                                     f"--config.teacher.checkpoint={digits_teacher}", *TINY,
                                     *args], capsys)
    assert_one_line_error(code, err, *words)


def test_train_unknown_preset(tmp_path, capsys):
    code, _, err = run_cli("train", ["--config", "digits:relased", "--workdir", tmp_path / "w"],
                           capsys)
    assert_one_line_error(code, err, "--config digits:relased", "unknown preset 'relased'",
                          "released, conditioned")
    assert "Traceback" not in err


def _train_args(tmp_path, teacher, *extra, config="digits"):
    return ["--config", config, "--workdir", tmp_path / "w",
            f"--config.teacher.checkpoint={teacher}", *TINY, *extra]


TEACHER_FILE_CASES = [
    ("teacher_not_a_checkpoint", "empty_dir", ["is not a model checkpoint"]),
    ("teacher_torn_model_json", "teacher_torn_json", ["model.json is not valid JSON", "write it again"]),
    ("teacher_classes_disagree_with_weights", "teacher_wrong_classes",
     ["does not fit", "7 classes"]),
    ("teacher_unknown_arch", "teacher_unknown_arch", ["model.json names", "resnet1000"]),
    ("teacher_variables_missing", "teacher_no_variables", ["variables cannot be read"]),
    ("teacher_not_finite", "teacher_nan", ["non-finite (NaN/inf) weights", "train or convert it again"]),
]


@pytest.mark.parametrize("case", TEACHER_FILE_CASES, ids=[c[0] for c in TEACHER_FILE_CASES])
def test_train_bad_teacher(case, tmp_path, capsys, bad_files):
    _, name, words = case
    code, _, err = run_cli("train", _train_args(tmp_path, bad_files / name), capsys)
    assert_one_line_error(code, err, *words)


def test_train_teacher_mismatches(tmp_path, capsys, digits_teacher):
    code, _, err = run_cli("train", _train_args(tmp_path, digits_teacher,
                                                "--config.teacher.arch=small_cnn_half"), capsys)
    assert_one_line_error(code, err, "the teacher checkpoint is a 'small_cnn'",
                          "--config.teacher.arch=small_cnn")
    code, _, err = run_cli("train", _train_args(tmp_path, digits_teacher,
                                                "--config.num_classes=5"), capsys)
    assert_one_line_error(code, err, "the teacher has 10 classes but config.num_classes=5")


DATA_CASES = [
    ("data_dir_missing", lambda d: ["--config.data.dir=/nonexistent/mnist"],
     ["/nonexistent/mnist", "does not exist"]),
    ("data_dir_without_the_files", lambda d: [f"--config.data.dir={d / 'empty_dir'}"],
     ["empty_dir", "expected a folder with the MNIST IDX files"]),
    ("truncated_npz", lambda d: [f"--config.data.dir={d / 'npz_truncated'}"], ["test.npz"]),
    ("already_normalised_images", lambda d: [f"--config.data.dir={d / 'normalised'}"],
     ["look already normalised", "raw pixels"]),
    ("extra_eval_missing", lambda d: ["--config.data.extra_eval=/nonexistent/x.npz"],
     ["/nonexistent/x.npz"]),
    ("extra_eval_labels_out_of_range", lambda d: [f"--config.data.extra_eval={d / 'labels_out_of_range.npz'}"],
     ["label 99 out of range"]),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_train_bad_data(case, tmp_path, capsys, bad_files, digits_teacher):
    _, args, words = case
    config = "mnist" if "data.dir" in args(bad_files)[0] else "digits"
    extra = ["--config.teacher.arch=small_cnn", "--config.student.arch=small_cnn_half"]
    if config == "mnist":   # the digits teacher stands in: the data fails before it matters
        extra += ["--config.image_size=8", "--config.loss.beta=1"]
    code, _, err = run_cli("train", _train_args(tmp_path, digits_teacher, *extra,
                                                *args(bad_files), config=config), capsys)
    assert_one_line_error(code, err, *words)


def test_train_bad_workdir_and_config_file(tmp_path, capsys, bad_files, digits_teacher):
    code, _, err = run_cli("train", ["--config", "digits", "--workdir", bad_files / "a_file"],
                           capsys)
    assert_one_line_error(code, err, "is a file", "give a directory")
    # Not writable even for root: checked before any work.
    code, _, err = run_cli("train", ["--config", "digits", "--workdir", "/proc/cpsc_test"], capsys)
    assert_one_line_error(code, err, "/proc/cpsc_test", "not writable")
    code, _, err = run_cli("train", ["--config", "nope", "--workdir", tmp_path], capsys)
    assert_one_line_error(code, err, "not a shipped config", "digits")
    code, _, err = run_cli("train", ["--config", tmp_path / "missing.py", "--workdir", tmp_path],
                           capsys)
    assert_one_line_error(code, err, "missing.py", "no such file")
    code, _, err = run_cli("train", ["--config", "digits"], capsys)
    assert_one_line_error(code, err, "missing --workdir")


@pytest.mark.slow
def test_resume_with_another_config_is_refused_and_harmless_changes_warn(tmp_path, capsys,
                                                                         digits_teacher):
    args = _train_args(tmp_path, digits_teacher)
    code, out, err = run_cli("train", args, capsys)
    assert code == 0, err
    code, _, err = run_cli("train", args + ["--config.batch_size=8", "--config.loss.alpha=0.2"],
                           capsys)
    assert_one_line_error(code, err, "holds a run with another config",
                          "batch_size: 16 -> 8", "loss.alpha: 0.1 -> 0.2", "fresh --workdir")
    # Finished, same config: reported at once, nothing recomputed.
    code, out, err = run_cli("train", args, capsys)
    assert code == 0 and "holds a finished run" in out
    # Extending the epochs resumes, with a warning.
    code, out, err = run_cli("train", args + ["--config.epochs=2", "--config.log_every=7"], capsys)
    assert code == 0, err
    assert "warning: resuming with changed settings" in out and "epochs: 1 -> 2" in out
    assert json.loads((tmp_path / "w" / "results.json").read_text())["iterations"] == 4


def test_second_run_in_the_same_workdir_is_refused(tmp_path, capsys, digits_teacher):
    workdir = runtime.prepare_workdir(str(tmp_path / "w"))
    with runtime.WorkdirLock(workdir):
        code, _, err = run_cli("train", _train_args(tmp_path, digits_teacher), capsys)
    assert_one_line_error(code, err, "is in use by process", str(os.getpid()))


# ----------------------------------------------------------------------------- cpsc-train-teacher

TEACHER_CASES = [
    ("unknown_arch", ["--config.arch=resnet1000"], ["unknown model 'resnet1000'"]),
    ("zero_epochs", ["--config.epochs=0"], ["config.epochs must be an integer >= 1"]),
    ("batch_not_divisible", ["--config.batch_size=63"], ["not divisible by the 2 cpu device(s)"]),
    ("batch_larger_than_dataset", ["--config.batch_size=4096"], ["exceeds the 1438 training images"]),
    ("negative_lr", ["--config.lr=-1"], ["config.lr must be a number > 0"]),
    ("too_large_for_input", ["--config.arch=lenet5_half"], ["needs inputs of at least 32x32"]),
    ("bad_crop", ["--config.crop_padding=-2"], ["config.crop_padding must be an integer in"]),
    ("wrong_channel_count", ["--config.mean=(0.1,0.2,0.3)", "--config.std=(1.,1.,1.)"],
     ["mean/std have 3/3 values"]),
]


@pytest.mark.parametrize("case", TEACHER_CASES, ids=[c[0] for c in TEACHER_CASES])
def test_train_teacher_bad_config(case, tmp_path, capsys):
    _, args, words = case
    code, _, err = run_cli("train_teacher", ["--config", "teacher:digits", "--workdir", tmp_path,
                                             *args], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "teacher_state").exists()


def test_train_teacher_refuses_a_distillation_config(tmp_path, capsys):
    code, _, err = run_cli("train_teacher", ["--config", "digits", "--workdir", tmp_path], capsys)
    assert_one_line_error(code, err, "not a teacher config", "teacher:DATASET")


def test_diverging_teacher_says_so_and_saves_nothing(tmp_path, capsys):
    code, _, err = run_cli("train_teacher", ["--config", "teacher:digits", "--workdir", tmp_path,
                                             "--config.lr=1e6", "--config.epochs=1"], capsys)
    assert_one_line_error(code, err, "non-finite", "lower --config.lr")
    assert not ckpt_lib.is_model_checkpoint(str(tmp_path / "teacher"))


# ----------------------------------------------------------------------------- other tools

def test_evaluate_bad_inputs(tmp_path, capsys, bad_files, digits_teacher):
    np.savez(tmp_path / "mnist_like.npz", data=np.zeros((3, 32, 32), np.uint8), labels=[0, 1, 2])
    code, out, err = run_cli("evaluate", ["--checkpoint", digits_teacher, "--data", "digits"],
                             capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["num_examples"] == 359
    for args, words in (
            (["--checkpoint", digits_teacher, "--data", tmp_path / "nothing"], ["does not exist"]),
            (["--checkpoint", tmp_path, "--data", "digits"], ["not a cpsc-jax model checkpoint"]),
            (["--checkpoint", bad_files / "teacher_torn_json", "--data", "digits"],
             ["teacher_torn_json/model.json is not valid JSON"]),
            (["--checkpoint", digits_teacher, "--data", bad_files / "normalised" / "test.npz"],
             ["look already normalised"]),
            (["--checkpoint", digits_teacher, "--data", tmp_path / "mnist_like.npz"],
             ["images are 32x32", "takes 8x8", "--resize"])):
        code, _, err = run_cli("evaluate", args, capsys)
        assert_one_line_error(code, err, *words)


def test_export_failure_leaves_nothing_behind(tmp_path, capsys, bad_files, digits_teacher):
    pytest.importorskip("torch")
    out = bad_files / "a_file" / "student.pt"   # a "directory" that is a file
    code, _, err = run_cli("export_student", ["--checkpoint", digits_teacher, "--output", out],
                           capsys)
    assert code != 0 and "Traceback" not in err
    assert not os.path.exists(str(out) + ".tmp")
    code, _, err = run_cli("export_student", ["--checkpoint", bad_files / "teacher_torn_json",
                                              "--output", tmp_path / "s.pt"], capsys)
    assert code != 0 and "model.json is not valid JSON" in err
    assert sorted(os.listdir(tmp_path)) == []


def test_ablate_bad_grids(tmp_path, capsys, bad_files):
    for grid, words in ((tmp_path / "none.json", ["grid file", "does not exist"]),
                        (bad_files / "grid_bad.json", ["is not valid JSON"]),
                        (bad_files / "grid_list.json", ["must be a JSON object of rows"]),
                        (bad_files / "grid_unknown.json", ["'loss.alhpa' is not a config field"]),
                        (bad_files / "grid_preset.json", ["unknown preset 'relased'",
                                                          "released, conditioned"])):
        code, _, err = run_cli("ablate", ["--config", "digits", "--grid", grid, "--workdir",
                                          tmp_path / "w"], capsys)
        assert_one_line_error(code, err, *words)
        assert not (tmp_path / "w").exists()   # refused before any teacher is trained


@pytest.mark.slow
def test_ablate_runs_each_row_with_the_command_lines_overrides_and_teacher(tmp_path, capsys,
                                                                         digits_teacher):
    """A row naming a preset is the config file built with it plus the command line's
    overrides; every run records the one teacher."""
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"as_given": {}, "released": {"preset": "released"}}))
    code, out, err = run_cli("ablate", ["--config", "digits", *TINY, "--grid", grid, "--seeds", 1,
                                        f"--config.teacher.checkpoint={digits_teacher}",
                                        "--workdir", tmp_path / "w"], capsys)
    assert code == 0, err[-3000:]
    assert "| as_given |" in out and "| released |" in out
    for row, ce_form in (("as_given", "plain"), ("released", "double_softmax")):
        recorded = json.loads((tmp_path / "w" / row / "seed0" / "config.json").read_text())
        assert recorded["loss.ce_form"] == ce_form, row
        assert recorded["batch_size"] == 16 and recorded["epochs"] == 1, row
        assert recorded["teacher.checkpoint"] == str(digits_teacher), row


# ----------------------------------------------------------------------------- real processes

def _cli(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=kw.get("cwd", REPO), env=env)


@pytest.mark.slow
def test_console_entry_points_print_one_line_errors(tmp_path):
    r = _cli("cpsc_jax.cli.train", "--config", "digits", "--workdir", tmp_path,
             "--config.loss.alhpa=0.5", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: bad flag: unknown config field")
    r = _cli("cpsc_jax.cli.train_teacher", "--config", "teacher:digits", "--workdir", tmp_path,
             "--config.arch=nope", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "unknown model 'nope'" in r.stderr


HELP_CASES = [
    ("train", ["--config", "--workdir", "--stop_after_epochs", "cpsc-train --config digits"]),
    ("train_teacher", ["--config", "--workdir", "cpsc-train-teacher --config teacher:mnist"]),
    ("ablate", ["--grid", "--seeds", "cpsc-ablate --config digits --grid"]),
    ("benchmark", ["--config", "--torch", "cpsc-benchmark --config mnist"]),
    ("evaluate", ["--checkpoint", "--data"]),
    ("convert_teacher", ["--arch", "--input", "--output"]),
    ("export_student", ["--checkpoint", "--output"]),
]


@pytest.mark.parametrize("command,words", HELP_CASES, ids=[c for c, _ in HELP_CASES])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help(command, words, flag, capsys):
    code, out, err = run_cli(command, [flag], capsys)
    assert code == 0, err
    assert "Unknown command line flag" not in out + err
    for w in words:
        assert w in out, f"{w!r} not in the --help of {command}"


def test_helpfull_adds_the_library_flags(capsys):
    code, out, _ = run_cli("train", ["--helpfull"], capsys)
    short = run_cli("train", ["--help"], capsys)[1]
    assert code == 0 and "--config" in out and len(out) > len(short) and "--flagfile" in out
