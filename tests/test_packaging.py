"""`pip install .` gives a working package: the wheel declares its dependencies and extras,
carries the configs, and README's first command and the console commands run the digits default
with it from a directory outside the checkout, in a fresh virtualenv."""
import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import REPO
from cpsc_jax.infra import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build needs only setuptools, already here (no network).
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(REPO)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("cpsc_jax-*.whl")
    return path


def test_wheel_declares_dependencies_extras_and_commands(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    requires = [l.split(":", 1)[1].strip() for l in meta.splitlines()
                if l.startswith("Requires-Dist:")]
    plain = {r.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip() for r in requires
             if "extra ==" not in r}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "ml-collections", "chex"} <= plain
    extras = {l.split(":", 1)[1].strip() for l in meta.splitlines()
              if l.startswith("Provides-Extra:")}
    assert {"cuda12", "tpu", "torch", "tfds", "tensorboard", "test"} <= extras
    torch_req = [r for r in requires if r.startswith("torch") and "extra == \"torch\"" in r]
    assert torch_req and "==" not in torch_req[0].split(";")[0], torch_req   # a range, no pin
    for command in ("cpsc-train", "cpsc-train-teacher", "cpsc-convert-teacher",
                    "cpsc-export-student", "cpsc-evaluate", "cpsc-benchmark", "cpsc-ablate"):
        assert f"{command} = cpsc_jax.cli." in entry_points, command
    for config in ("digits", "mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "teacher"):
        assert f"cpsc_jax/configs/{config}.py" in names, config
    assert not any(n.startswith(("tests/", "configs/", "scripts/")) for n in names)


def test_wheel_runs_the_readme_command_outside_the_checkout(wheel, tmp_path):
    """The suite's one end-to-end run of the embedded default: README's first command (the
    script, shrunk) with the package from the wheel, in a fresh venv, from a directory outside
    the checkout; it trains the teacher, distils and writes every artefact. Then the console
    commands: `cpsc-evaluate` on the student, `cpsc-train` on a bad config (one line)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    py = str(bin_dir / "python")
    # The dependencies come from this environment (no network in tests): its site-packages on
    # the new venv's path; cpsc_jax itself comes only from the wheel.
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "deps_from_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    where = subprocess.run([py, "-c", "import cpsc_jax; print(cpsc_jax.__file__)"],
                           capture_output=True, text=True, cwd=str(tmp_path), check=True)
    assert str(venv) in where.stdout and str(REPO) not in where.stdout, where.stdout

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    # The script's own directory leads sys.path, not the checkout: cpsc_jax is the wheel's.
    r = subprocess.run([py, str(REPO / "scripts" / "train.py"),
                        "--config", str(REPO / "configs" / "digits.py"), "--workdir", "run",
                        "--config.epochs=2", "--config.epoch_itrs=10",
                        "--config.teacher.training.epochs=3", "--config.log_every=5"],
                       capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ETA" in r.stdout and "student" in r.stdout
    workdir = tmp_path / "run"
    results = json.loads((workdir / "results.json").read_text())
    assert results["iterations"] == 20 and results["teacher_accuracy"] > 80.0
    assert results["student_accuracy"] > 30.0          # well above chance (10%) after 20 iterations
    assert results["best_student_accuracy"] >= results["student_accuracy"]
    assert len(results["history"]) == 2
    assert (workdir / "samples" / "epoch_0002.png").read_bytes().startswith(b"\x89PNG")
    records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert any("student_accuracy" in r for r in records)
    assert any("generator/loss" in r for r in records)
    assert ckpt_lib.load_model_spec(str(workdir / "student")).arch == "small_cnn_half"

    r = subprocess.run([str(bin_dir / "cpsc-evaluate"), "--checkpoint", "run/student",
                        "--data", "digits"], capture_output=True, text=True, cwd=str(tmp_path),
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = json.loads(r.stdout.strip().splitlines()[-1])
    assert evaluated["num_examples"] == 359
    assert evaluated["accuracy"] == pytest.approx(results["student_accuracy"])
    bad = subprocess.run([str(bin_dir / "cpsc-train"), "--config", "digits", "--workdir", "bad",
                          "--config.student.arch=nope"], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=300)
    assert bad.returncode != 0
    assert "unknown model 'nope'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
