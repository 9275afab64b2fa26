"""Test setup: two simulated CPU devices and cheaper XLA compilation (set before JAX is
imported), one compilation cache for the session, and tiny shared configs."""
import atexit
import os
import shutil
import tempfile

# The suite is mostly XLA compilation, and XLA:CPU's older loop emitters compile faster than its
# fusion emitters (docs/RESULTS.md, "the suite's time"). Users' runs keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process of the tests with `devices` simulated CPU devices."""
    return (os.environ.get("CPSC_TEST_BASE_XLA_FLAGS", "") + f" {TEST_XLA_FLAGS}"
            f" --xla_force_host_platform_device_count={devices}").strip()


# Compile options that give one program XLA's default emitters back: the WRN programs of the
# parity tests compile faster with them, and parity is about the numerics users' runs get.
USERS_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


os.environ.setdefault("CPSC_TEST_BASE_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = xla_flags(2)

# One persistent XLA compilation cache for the whole session, the tests' subprocesses included
# (they inherit the environment): the tiny configs compile the same programs in many tests and
# in every restarted run. A fresh directory per session, so no run sees another's entries.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cpsc_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def without_compilation_cache(env):
    """`env` for a subprocess that must compile for real (a test of what happens meanwhile)."""
    return {k: v for k, v in env.items() if not k.startswith(("JAX_COMPILATION_CACHE",
                                                                "JAX_PERSISTENT_CACHE"))}


# `python -c KILL_LAUNCHER ARGS` runs `cpsc-train ARGS` and, as CPSC_TEST_KILL plans, SIGKILLs
# its own process: `iteration:N` before the N-th iteration of this process, `metrics:N` half-way
# through writing the N-th metrics line, `commit:N` during the N-th orbax commit (after the data,
# before the rename that makes it visible), `student` during the final student's commit; or
# `sigterm:N` / `sigint:N` sends SIGTERM (what a cluster scheduler sends first) / SIGINT (Ctrl-C)
# before the N-th iteration.
KILL_LAUNCHER = r"""
import os, signal, sys
plan = os.environ.get("CPSC_TEST_KILL", "")
kind, _, n = plan.partition(":")
n = int(n or 0)
count = {"iteration": 0, "metrics": 0, "commit": 0}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind in ("iteration", "sigterm", "sigint"):
    from cpsc_jax.infra import runtime
    original = runtime.stop_if_requested
    def stop_if_requested(*args, **kwargs):
        count["iteration"] += 1
        if count["iteration"] == n:
            if kind in ("sigterm", "sigint"):
                os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
            else:
                die()
        original(*args, **kwargs)
    runtime.stop_if_requested = stop_if_requested
if kind == "metrics":
    from cpsc_jax.infra import metrics
    write = metrics.JsonlWriter.write
    def torn_write(self, step, record):
        count["metrics"] += 1
        if count["metrics"] == n:
            with open(self.path, "a") as f:
                f.write('{"step": %d, "half' % step)
            die()
        write(self, step, record)
    metrics.JsonlWriter.write = torn_write
if kind in ("commit", "student"):
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.on_commit_callback
    async def on_commit(tmp_dir, **kw):
        count["commit"] += 1
        final = str(tmp_dir.get_final())
        if (kind == "commit" and count["commit"] == n) or (
                kind == "student" and "/student/" in final + "/"):
            die()
        return await commit(tmp_dir, **kw)
    atomicity.on_commit_callback = on_commit
from cpsc_jax.cli.train import main
main(sys.argv)
"""


def load_config(name: str, *args):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def tiny_digits_config(*preset):
    """The digits config (its default preset, or the one named) shrunk for unit tests: small
    generator, few iterations."""
    c = load_config("digits", *preset)
    c.batch_size = 16
    c.epochs = 2
    c.epoch_itrs = 2
    c.g_steps = 2
    c.s_steps = 2
    c.warmup_epochs = 1
    c.generator.nz = 8
    c.generator.ngf = 4
    c.log_every = 1
    c.sample_columns = 2
    c.teacher.training.epochs = 2
    c.replay_size = 8 * c.batch_size   # the improved preset's pool, small (used or not)
    return c


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A digits teacher checkpoint (its path), trained once per test session (two epochs)."""
    from cpsc_jax.teachers.training import train_teacher
    workdir = tmp_path_factory.mktemp("digits_teacher")
    return train_teacher(tiny_digits_config().teacher.training, str(workdir), log=lambda *a: None)


@pytest.fixture(scope="session")
def digits_teacher_model(digits_teacher):
    """The same teacher as a `cpsc_jax.teachers.teacher.Teacher`."""
    from cpsc_jax.teachers.teacher import load_teacher
    return load_teacher(digits_teacher)


def run_iterations(config, num_devices, n_iters=2, **iteration_options):
    """`n_iters` iterations of `config` on a randomly initialised teacher over `num_devices`
    simulated devices: (final state, per-iteration metrics), on the host."""
    import jax
    from cpsc_jax.infra import runtime
    from cpsc_jax.method import steps
    from cpsc_jax.infra.checkpoint import ModelSpec, init_variables
    spec = ModelSpec(config.teacher.arch, config.num_classes, config.image_size, config.channels,
                     (0.3,), (0.4,))
    topo = runtime.topology(max_devices=num_devices)
    teacher = runtime.replicate(init_variables(spec, jax.random.PRNGKey(7)), topo)
    nets = steps.build_networks(config, spec.arch)
    state = runtime.replicate(steps.init_state(nets, config, jax.random.PRNGKey(0)), topo)
    iteration = steps.make_train_iteration(nets, config, num_devices, donate=False,
                                           **iteration_options)
    history = []
    for _ in range(n_iters):
        state, metrics = iteration(state, teacher, topo.device_ids())
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history
