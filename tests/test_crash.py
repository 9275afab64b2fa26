"""Nothing is lost on a crash: one tiny distillation stopped in every way a run can stop —
SIGTERM while XLA compiles and mid epoch (save the iteration it is at, exit 143), Ctrl-C (save,
exit 130, say how to resume), SIGKILL mid epoch, in a half-written metrics line, during a
run-checkpoint write and during the final student's write — and re-run after each, ends
bit-identical to an uninterrupted run, with the same metrics.jsonl apart from timing fields.

Each run is `cpsc-train` in a subprocess started through `conftest.KILL_LAUNCHER`, which stops
its own process at a planned point. One chain of runs in one directory, so every resume starts
from what the previous stop left (the stops are the test, the runs between them are shared).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import KILL_LAUNCHER, REPO, without_compilation_cache, xla_flags
from cpsc_jax.infra import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow


# A replay memory in the state, mixup and a generator re-initialised every epoch: everything a
# resume has to restore. The uninterrupted run of these is `reference_run`.
ARGS = ["--config", "digits", "--config.batch_size=16", "--config.epochs=3",
        "--config.epoch_itrs=4", "--config.g_steps=1", "--config.s_steps=1",
        "--config.generator.nz=8", "--config.generator.ngf=4", "--config.log_every=1",
        "--config.sample_columns=2", "--config.warmup_epochs=1",
        "--config.student_data=fresh+replay", "--config.replay_size=64",
        "--config.student_augment.mixup=1.0", "--config.generator_reinit_every=1"]
TIMING = {"elapsed_s"}


def _start(workdir, teacher, plan="", cached=True):
    """`cpsc-train ARGS` through the kill launcher; `cached=False`: without the compilation
    cache, so that it really compiles."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", CPSC_TEST_KILL=plan, PYTHONUNBUFFERED="1",
               XLA_FLAGS=xla_flags(1))
    if not cached:
        env = without_compilation_cache(env)
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
    """The uninterrupted run of ARGS, started at once (it runs beside the first stopped runs);
    call it for its directory once the comparison is due."""
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


def _launch_and_sigterm_while_compiling(workdir, teacher):
    """A run without the compilation cache, sent SIGTERM once it says it compiles."""
    import signal
    proc = _start(workdir, teacher, cached=False)
    for line in proc.stdout:
        if line.startswith("compiling the iteration"):
            proc.send_signal(signal.SIGTERM)
            break
    return _finish(proc)


def test_stopped_every_way_and_resumed_equals_uninterrupted(tmp_path, digits_teacher,
                                                            reference_run):
    # 12 iterations (3 epochs of 4), run checkpoints after 4, 8, 12 and wherever a notice saves;
    # metrics lines: one per iteration + per epoch. A plan's N counts this process's iterations.
    workdir = tmp_path / "crashed"

    # A notice while XLA compiles: the first iteration is finished and saved, exit 143.
    r = _launch_and_sigterm_while_compiling(workdir, digits_teacher)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "saved iteration 1 of 12" in r.stdout, r.stdout[-2000:]

    # SIGTERM mid epoch 2 (before the 5th iteration of this process: global 6): iteration 5 saved.
    r = _launch(workdir, digits_teacher, "sigterm:5")
    assert "resuming from iteration 1" in r.stdout, r.stdout[-2000:]
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    assert "SIGTERM" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "saved iteration 5 of 12" in r.stdout, r.stdout[-2000:]
    assert 5 in ckpt_lib.RunCheckpointer(str(workdir / "checkpoints")).all_steps()

    # Ctrl-C before global iteration 7: iteration 6 saved once, exit 130, how to go on.
    r = _launch(workdir, digits_teacher, "sigint:2")
    assert "resuming from iteration 5" in r.stdout, r.stdout[-2000:]
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "re-run the same command to continue" in r.stderr.strip().splitlines()[-1]
    saved = [l for l in r.stdout.splitlines() if l.startswith("saved iteration")]
    assert len(saved) == 1 and saved[0].startswith("saved iteration 6 of 12"), saved
    assert (workdir / "checkpoints" / "6").is_dir()

    evidence = []
    for plan, resumes_from in (
            ("iteration:2", 6),   # SIGKILL before global iteration 8: mid epoch, nothing saved
            ("metrics:3", 6),     # a torn metrics line
            ("commit:2", None),   # the second orbax commit of this process: a run checkpoint
            ("student", None)):   # during the final student's write
        r = _launch(workdir, digits_teacher, plan)
        assert r.returncode == -9, (plan, r.returncode, r.stderr[-3000:])
        if resumes_from:
            assert f"resuming from iteration {resumes_from}" in r.stdout, (plan, r.stdout[-2000:])
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
