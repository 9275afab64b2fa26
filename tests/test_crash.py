"""Nothing is lost on a crash: a tiny distillation killed with SIGKILL at several points (mid
epoch, while a metrics line is half written, during a run-checkpoint write, during the best and
the final student writes) and re-run until done ends bit-identical to an uninterrupted run, with
the same metrics.jsonl apart from timing fields.

Each run is `cpsc-train` in a subprocess started through `conftest.KILL_LAUNCHER`, which kills
its own process at a planned point (mid epoch, in a metrics line, in an orbax commit, in the
final student's write) or sends it SIGTERM, which must save the current iteration (not the last
epoch's) and exit 143.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import KILL_LAUNCHER, REPO, without_compilation_cache
from cpsc_jax.infra import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow


# A replay memory in the state, mixup and a generator re-initialised every epoch: everything a
# resume has to restore. One uninterrupted run of these (`reference_run`) serves every test.
ARGS = ["--config", "digits", "--config.batch_size=16", "--config.epochs=3",
        "--config.epoch_itrs=4", "--config.g_steps=1", "--config.s_steps=1",
        "--config.generator.nz=8", "--config.generator.ngf=4", "--config.log_every=1",
        "--config.sample_columns=2", "--config.warmup_epochs=1",
        "--config.student_data=fresh+replay", "--config.replay_size=64",
        "--config.student_augment.mixup=1.0", "--config.generator_reinit_every=1"]
TIMING = {"elapsed_s"}


def _start(workdir, teacher, plan=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CPSC_TEST_KILL=plan,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-c", KILL_LAUNCHER, *ARGS, f"--workdir={workdir}",
                             f"--config.teacher.checkpoint={teacher}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _launch(workdir, teacher, plan=""):
    return _finish(_start(workdir, teacher, plan))


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _flat(variables):
    import jax
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(variables)])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, digits_teacher):
    """The uninterrupted run of ARGS, started at once (it runs beside the first crashing runs)
    and shared by the tests below that compare with it; call it for its directory."""
    workdir = tmp_path_factory.mktemp("reference") / "ref"
    proc = _start(workdir, digits_teacher)
    done = {}

    def wait():
        if not done:
            done["result"] = _finish(proc)
        assert done["result"].returncode == 0, done["result"].stderr[-3000:]
        return workdir
    yield wait
    if proc.poll() is None:
        proc.kill()


def test_killed_anywhere_and_resumed_equals_uninterrupted(tmp_path, digits_teacher,
                                                          reference_run):
    workdir = tmp_path / "crashed"
    evidence = []
    # 12 iterations, checkpoints after 4, 8, 12; metrics lines: one per iteration + per epoch.
    for plan in ("iteration:7",     # mid epoch 2: epoch 1's checkpoint is the last
                 "metrics:3",       # a torn metrics line (epoch 2's 3rd iteration record)
                 "commit:2",        # the second orbax commit of this process: a run checkpoint
                 "student"):        # during the final student's write
        r = _launch(workdir, digits_teacher, plan)
        assert r.returncode == -9, (plan, r.returncode, r.stderr[-3000:])
        tmp_dirs = [p for p in workdir.rglob("*") if ".orbax-checkpoint-tmp" in p.name]
        evidence.append((plan, len(tmp_dirs), (workdir / "student").exists(),
                         ckpt_lib.is_model_checkpoint(str(workdir / "student"))))
    ref = reference_run()
    done = _launch(workdir, digits_teacher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from iteration" in done.stdout
    # The kills did land inside the writes: a torn commit was left behind, and the final
    # student existed only as an unfinished directory (no model.json) before the last run.
    assert evidence[2][1] > 0, evidence                  # commit:2 left a torn commit
    assert evidence[3][2] and not evidence[3][3], evidence   # student/ begun, never finished

    _, a = ckpt_lib.load_model(str(ref / "student"))
    _, b = ckpt_lib.load_model(str(workdir / "student"))
    assert np.array_equal(_flat(a), _flat(b)), "the resumed student differs"
    _, a = ckpt_lib.load_model(str(ref / "student_best"))
    _, b = ckpt_lib.load_model(str(workdir / "student_best"))
    assert np.array_equal(_flat(a), _flat(b)), "the resumed best student differs"
    read = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl")]
    assert _without_timing(read(ref)) == _without_timing(read(workdir))
    ra = json.loads((ref / "results.json").read_text())
    rb = json.loads((workdir / "results.json").read_text())
    assert _without_timing(ra["history"]) == _without_timing(rb["history"])
    assert rb["elapsed_s"] > ra["elapsed_s"] * 0.5   # killed invocations' time is counted too
    assert not [p for p in (workdir / "checkpoints").iterdir()
                if ".orbax-checkpoint-tmp" in p.name], "torn checkpoint left behind"


def test_sigterm_mid_epoch_saves_that_iteration_and_resumes_bit_identically(tmp_path,
                                                                         digits_teacher,
                                                                         reference_run):
    """SIGTERM (a preemption notice) mid epoch: the run saves the iteration it is at, exits 143,
    and the re-run continues from there; the end equals an uninterrupted run."""
    workdir = tmp_path / "preempted"
    r = _launch(workdir, digits_teacher, "sigterm:6")   # iteration 6 of 12: mid epoch 2
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    assert "SIGTERM" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "saved iteration 5 of 12" in r.stdout, r.stdout[-2000:]
    assert 5 in ckpt_lib.RunCheckpointer(str(workdir / "checkpoints")).all_steps()
    done = _launch(workdir, digits_teacher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from iteration 5" in done.stdout
    ref = reference_run()
    _, a = ckpt_lib.load_model(str(ref / "student"))
    _, b = ckpt_lib.load_model(str(workdir / "student"))
    assert np.array_equal(_flat(a), _flat(b)), "the resumed student differs"
    read = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl")]
    assert _without_timing(read(ref)) == _without_timing(read(workdir))


def test_sigterm_during_compilation_saves_the_first_iteration_and_resumes(tmp_path,
                                                                          digits_teacher,
                                                                          reference_run):
    """A notice while XLA compiles: the run finishes that first iteration, saves it, exits
    143; the re-run resumes from iteration 1 and ends like an uninterrupted run."""
    import signal
    workdir = tmp_path / "early"
    env = without_compilation_cache(dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                                         XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    proc = subprocess.Popen([sys.executable, "-m", "cpsc_jax.cli.train", *ARGS,
                             f"--workdir={workdir}", f"--config.teacher.checkpoint={digits_teacher}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(REPO))
    try:
        for line in proc.stdout:
            if line.startswith("compiling the iteration"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "saved iteration 1 of 12" in out, out[-2000:]
    done = _launch(workdir, digits_teacher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from iteration 1" in done.stdout
    _, a = ckpt_lib.load_model(str(reference_run() / "student"))
    _, b = ckpt_lib.load_model(str(workdir / "student"))
    assert np.array_equal(_flat(a), _flat(b)), "the resumed student differs"
