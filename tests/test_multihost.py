"""Several processes (jax.distributed on 127.0.0.1, CPU collectives over gloo): a tiny
distillation (2 x 2 processes x devices, preempted, resumed as 1 x 4) and a tiny teacher
training (2 x 1, killed after a checkpoint and resumed) end with the parameters of one process
with as many devices on the same global batch; process 0 alone writes.

Processes are launched with explicit PIDs, ports on loopback only, and are killed in `finally`.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import KILL_LAUNCHER, xla_flags
from cpsc_jax.infra import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
# A tiny digits run: 3 epochs x 3 iterations; a large Adam eps keeps the generator's update
# smooth in its gradient, so float rounding of a different reduction order stays small.
DISTIL = ["--config", "digits", "--config.batch_size=16", "--config.epochs=3",
          "--config.epoch_itrs=3", "--config.g_steps=1", "--config.s_steps=2",
          "--config.generator.nz=8", "--config.generator.ngf=4", "--config.log_every=1",
          "--config.sample_columns=2", "--config.adam_eps=1e-3", "--config.warmup_epochs=1"]
TEACH = ["--config", "teacher:digits", "--config.epochs=2", "--config.batch_size=64",
         "--config.checkpoint_min_interval_s=0", "--config.log_every_s=1e9"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(devices))
    env.pop("CPSC_TRACEBACK", None)
    return env


def _launch(module, args, processes: int, devices: int, cwd, plans=None):
    """Starts `processes` processes of `python -m module args` (a multi-process run when more
    than one); returns the Popen objects. `plans`: {process index: CPSC_TEST_KILL plan} to run
    those processes of cpsc-train through conftest.KILL_LAUNCHER."""
    port = _free_port()
    procs = []
    for i in range(processes):
        extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                  f"--process_id={i}"] if processes > 1 else [])
        env, program = _env(devices), ["-m", module]
        if plans and i in plans:
            assert module == "cpsc_jax.cli.train"
            env["CPSC_TEST_KILL"], program = plans[i], ["-c", KILL_LAUNCHER]
        procs.append(subprocess.Popen([sys.executable, *program, *args, *extra],
                                      env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _run(module, args, processes, devices, cwd):
    """Runs to completion; returns [(returncode, stdout, stderr)] per process."""
    procs = _launch(module, args, processes, devices, cwd)
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        _kill(procs)
    results = [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"process {i} failed ({code}):\n{out[-2000:]}\n{err[-3000:]}"
    return results


def _run_until_checkpoint(module, args, processes, devices, cwd, state_dir, step=None):
    """Starts the processes and SIGKILLs them all once checkpoint `step` (None: any) is in
    `state_dir`."""
    procs = _launch(module, args, processes, devices, cwd)
    saved = lambda: (os.path.isdir(os.path.join(state_dir, str(step))) if step is not None else
                     os.path.isdir(state_dir) and any(n.isdigit() for n in os.listdir(state_dir)))
    try:
        deadline = time.time() + TIMEOUT_S
        while not saved():
            assert time.time() < deadline, "no checkpoint in time"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
    finally:
        _kill(procs)


def _flat(variables):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(variables)])


def _own_lines(text):
    """Lines the program printed (gloo's C++ layer prints connection notes on its own)."""
    return [l for l in text.splitlines() if l.strip() and not l.startswith("[Gloo]")]


def _records(path):
    return [json.loads(l) for l in open(path)]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, digits_teacher):
    """The reference: the tiny distillation in one process with four devices."""
    cwd = tmp_path_factory.mktemp("single4")
    _run("cpsc_jax.cli.train", DISTIL + [f"--config.teacher.checkpoint={digits_teacher}",
                                         f"--workdir={cwd / 'run'}"], 1, 4, cwd)
    return cwd / "run"


# One process of two (2 devices each) gets SIGTERM mid epoch 2; JAX's preemption service tells
# both, they save the same iteration (not the last epoch's) and exit 143; the run resumes as one
# process of four devices (a checkpoint, the sharded replay memory included, does not depend on
# the process count; the reference's compiled program serves it) and ends with the parameters
# of the reference. A multi-process run to the end: the teacher-training test below.
def test_distillation_over_processes_equals_one_process(tmp_path, digits_teacher,
                                                        one_process_run):
    args = DISTIL + [f"--config.teacher.checkpoint={digits_teacher}"]
    single = one_process_run

    multi = tmp_path / "multi"
    margs = args + [f"--workdir={multi}"]
    procs = _launch("cpsc_jax.cli.train", margs, 2, 2, tmp_path, plans={1: "sigterm:5"})
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        _kill(procs)
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for _, e in outs]
    assert _own_lines(outs[1][0]) == [], outs[1][0]   # one writer: the other prints nothing
    saved = [l for l in outs[0][0].splitlines() if l.startswith("saved iteration")]
    assert len(saved) == 1, outs[0][0][-2000:]
    at = int(saved[0].split()[2])
    assert 4 <= at < 9, saved        # after the signal, before the end
    assert (multi / "checkpoints" / str(at)).is_dir()
    results = _run("cpsc_jax.cli.train", margs, 1, 4, tmp_path)
    assert f"resuming from iteration {at}" in results[0][1]

    _, a = ckpt_lib.load_model(str(single / "student"))
    _, b = ckpt_lib.load_model(str(multi / "student"))
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=2e-4, atol=2e-5)
    ra = json.loads((single / "results.json").read_text())
    rb = json.loads((multi / "results.json").read_text())
    assert ra["student_accuracy"] == pytest.approx(rb["student_accuracy"], abs=0.6)
    assert rb["iterations"] == 9

    recs = _records(multi / "metrics.jsonl")
    keys = [(r["step"], tuple(sorted(r))) for r in recs]
    assert len(keys) == len(set(keys)), "duplicate metrics records"
    assert [r["step"] for r in recs if "epoch" in r] == [3, 6, 9]
    assert sorted(p.name for p in multi.iterdir() if p.name.startswith("metrics")) == ["metrics.jsonl"]


def test_teacher_training_over_processes_equals_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run("cpsc_jax.cli.train_teacher", TEACH + [f"--workdir={single}"], 1, 2, tmp_path)
    margs = TEACH + [f"--workdir={multi}"]
    _run_until_checkpoint("cpsc_jax.cli.train_teacher", margs, 2, 1, tmp_path,
                          str(multi / "teacher_state"))   # steps, after epoch 1
    results = _run("cpsc_jax.cli.train_teacher", margs, 2, 1, tmp_path)
    assert "resuming" in results[0][1] and _own_lines(results[1][1]) == []
    _, a = ckpt_lib.load_model(str(single / "teacher"))
    _, b = ckpt_lib.load_model(str(multi / "teacher"))
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=2e-4, atol=2e-5)
    assert [r["epoch"] for r in _records(multi / "teacher_metrics.jsonl")] == [1, 2]
