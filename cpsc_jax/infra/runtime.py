"""The training runtime shared by distillation (`cpsc_jax.method.trainer`) and teacher training
(`cpsc_jax.teachers.training`): processes and devices, the data-parallel step wrapper, the run
directory (lock, recorded config, resume check, elapsed time), the non-finite guard and
periodic actions.

Data parallelism is `jax.pmap` SPMD with axis `AXIS` over every device of every process: the
train state goes in and out unreplicated (`in_axes=None`, `out_axes=None`), per-device inputs
are mapped over their leading axis, and inside a step `jax.lax.axis_index(AXIS)` is the device's
global index (0 .. num_devices - 1 across all processes), from which it takes its share of the
global batch. N processes x M devices therefore compute what one process with N*M devices does.

Several processes (one per host): call `initialize_distributed` before any other JAX call.
Process 0 alone writes files other than checkpoints; every process takes part in checkpoint
saves and restores (orbax coordinates them; the primary process writes).
"""
import dataclasses
import datetime
import errno
import fcntl
import json
import math
import os
import socket
import sys
import time
from typing import Any, Callable, Dict, Iterable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpsc_jax.errors import UserError

AXIS = "batch"


class RunError(UserError, RuntimeError):
    """A run cannot start or go on; the message says why and what to do (printed as is)."""


class NonFiniteError(RunError):
    """Training produced a NaN/inf; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------- processes

def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, auto: bool = False,
                           cpu_collectives: str = "gloo") -> bool:
    """Joins a multi-process run (one process per host) before any other JAX call.

    Explicit: `coordinator_address` (host:port of process 0), `num_processes` and `process_id`.
    `auto`: JAX's own cluster detection (SLURM, Open MPI, Cloud TPU pods). Neither: a single
    process, nothing to do. On CPU, collectives across processes use `cpu_collectives` (gloo).
    Returns whether a distributed runtime was started."""
    explicit = bool(coordinator_address or num_processes or process_id >= 0)
    if not explicit and not auto:
        return False
    if explicit and not (coordinator_address and num_processes >= 1 and process_id >= 0):
        raise RunError("a multi-process run needs all three of --coordinator_address=HOST:PORT, "
                       "--num_processes=N and --process_id=I (0 <= I < N), or --distributed=auto "
                       "on a SLURM/Open MPI/TPU cluster")
    if explicit and not 0 <= process_id < num_processes:
        raise RunError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    try:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except Exception:  # noqa: BLE001 - an older jaxlib without the option: GPU/TPU still work
        pass
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where a run's computation happens."""

    process_index: int
    process_count: int
    local_devices: tuple
    num_devices: int           # across all processes

    @property
    def num_local(self) -> int:
        return len(self.local_devices)

    @property
    def is_writer(self) -> bool:
        """Process 0 writes metrics, samples, results and logs."""
        return self.process_index == 0

    @property
    def platform(self) -> str:
        return self.local_devices[0].platform

    def device_ids(self) -> np.ndarray:
        """The mapped argument of a `data_parallel` function: one entry per local device (pmap
        needs one mapped argument; steps take their index from `jax.lax.axis_index`)."""
        return np.arange(self.num_local, dtype=np.int32) + self.process_index * self.num_local

    def local_slice(self, global_array: np.ndarray) -> np.ndarray:
        """Rows [process_index * num_local, ...) of an array with one row per global device."""
        start = self.process_index * self.num_local
        return global_array[start:start + self.num_local]

    def describe(self) -> str:
        where = f"{self.num_devices} {self.platform} device(s)"
        if self.process_count > 1:
            where += f" in {self.process_count} processes"
        return where


def topology(max_devices: Optional[int] = None) -> Topology:
    """Every device of every process; `max_devices` (one process only) keeps the first few
    local devices, e.g. to compare one device with several in tests."""
    devices = tuple(jax.local_devices())
    if max_devices is not None:
        if jax.process_count() > 1:
            raise RunError("max_devices selects local devices of a single-process run only")
        devices = devices[:max_devices]
        return Topology(0, 1, devices, len(devices))
    if jax.device_count() != len(devices) * jax.process_count():
        raise RunError(f"every process must have the same number of devices: this one has "
                       f"{len(devices)}, all together {jax.device_count()}")
    return Topology(jax.process_index(), jax.process_count(), devices, jax.device_count())


def check_batch(batch_size: int, topo: Topology, field: str = "config.batch_size") -> None:
    if batch_size % topo.num_devices:
        raise RunError(f"{field}={batch_size} is not divisible by the {topo.describe()}; use a "
                       f"multiple of {topo.num_devices}")


def replicate(tree, topo: Topology):
    """Places a pytree the way a data-parallel function returns its unreplicated outputs (a
    freshly made or restored tree would otherwise make the second call recompile)."""
    mesh = Mesh(np.array(topo.local_devices), (AXIS,))
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_local(array: np.ndarray, topo: Topology):
    """[num_local, ...] host array -> one slice resident on each local device (placed once, so
    a data-parallel function reads it without a transfer per call)."""
    mesh = Mesh(np.array(topo.local_devices), (AXIS,))
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec(AXIS)))


def data_parallel(fn: Callable, num_unmapped: int, num_mapped: int = 1,
                  num_outputs: int = 2, donate_state: bool = False) -> Callable:
    """`jax.pmap(fn)` over axis `AXIS`: the first `num_unmapped` arguments (state, teacher,
    ...) unreplicated, the next `num_mapped` mapped over their leading (local device) axis; every
    output unreplicated. `donate_state` donates argument 0 (its buffers are consumed; the test
    suite runs this branch on CPU, where jaxlib 0.10.2 honours it too).

    In a single process the pmap is wrapped in a `jax.jit` (pmap is jit(shard_map) underneath,
    so this compiles to the same program): that jit carries the XLA:CPU compiler options of
    `cpsc_jax.models.conv.xla_cpu_conv_options` (convolutions off YNNPACK, per executable;
    none off CPU or where the jaxlib does not know them), and is what `jax.export` exports.
    Several processes keep the bare pmap, which turns each process's local arrays into global
    ones itself."""
    from cpsc_jax.models.conv import xla_cpu_conv_options
    in_axes = (None,) * num_unmapped + (0,) * num_mapped
    donate = (0,) if donate_state else ()
    mapped = jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, out_axes=(None,) * num_outputs,
                      donate_argnums=donate)
    if jax.process_count() > 1:
        return mapped

    def step(*args):   # a plain function: jit would copy pmap's own `lower` onto its wrapper
        return mapped(*args)
    return jax.jit(step, donate_argnums=donate, compiler_options=xla_cpu_conv_options() or None)


# ----------------------------------------------------------------------------- stopping

_STOP = {"requested": False, "signal": None}


def request_stop(signum: Optional[int] = None) -> None:
    """Asks the training loops to save their current state and stop at their next step (the
    command-line tools' Ctrl-C and SIGTERM; `signum` says which)."""
    _STOP["requested"] = True
    _STOP["signal"] = signum


def stop_requested() -> bool:
    return _STOP["requested"]


def stop_signal() -> Optional[int]:
    """The signal behind the last stop request (None: none, or asked from Python)."""
    return _STOP["signal"]


def stop_if_requested(on_stop: Optional[Callable[[], None]] = None) -> None:
    """Called by the training loops once per step: a requested stop runs `on_stop` (which saves
    the current state) and raises KeyboardInterrupt there, between steps."""
    if _STOP["requested"]:
        _STOP["requested"] = False
        if on_stop is not None:
            on_stop()
        raise KeyboardInterrupt


def preemption_sync_point(step: int) -> bool:
    """In a multi-process run, JAX's preemption service: True on every process at the same
    step once any of them got a preemption notice (SIGTERM), so that all save that step.
    Must be called at every step by every process; False in a single process."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils
    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:   # the service is not running (jax_enable_preemption_service off)
        return False


# ----------------------------------------------------------------------------- periodic actions

def is_time(step: int, every: int, total: Optional[int] = None) -> bool:
    """True every `every` steps and at the last one (big_vision's `itstime`)."""
    return (every > 0 and step % every == 0) or (total is not None and step == total)


# ----------------------------------------------------------------------------- non-finite guard

def all_finite(tree) -> bool:
    return bool(all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
                    if np.issubdtype(np.asarray(x).dtype, np.floating)))


def check_finite(values: Dict[str, float], where: str, advice: str) -> None:
    bad = ", ".join(f"{k}={v}" for k, v in values.items()
                    if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise NonFiniteError(f"non-finite values {where}: {bad}. {advice}")


# ----------------------------------------------------------------------------- the run directory

def prepare_workdir(workdir: str) -> str:
    """Creates `workdir` and checks that it is a writable directory, before any work."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunError(f"--workdir {workdir} is a file; give a directory (it is created if absent)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RunError(f"--workdir {workdir} is not writable ({e.strerror}); give a directory "
                       "you can write to") from None
    return workdir


class WorkdirLock:
    """An exclusive lock on WORKDIR/.lock for the life of the run (process 0 only): a second
    run in the same directory stops at once, naming the process that holds it."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, ".lock")
        self._file = None
        if not enabled:
            return
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunError(f"{workdir} is in use by {holder}; wait for it to finish, stop it, or "
                           "use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()} (started "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)})")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def flatten_config(config) -> Dict[str, Any]:
    """{'loss.alpha': 0.1, ...} of a ConfigDict (or nested dict), JSON values."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                out[key] = list(v) if isinstance(v, tuple) else v
    walk(tree, "")
    return out


def read_record(path: str) -> Optional[Dict[str, Any]]:
    """A run's recorded JSON file (config, teacher identity), or None when absent or torn by a
    crash during its first write (the caller then writes it again)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_record(path: str, record: Dict[str, Any], **dump_kw) -> None:
    """Writes a run's JSON record atomically (a reader never sees half of it)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, **dump_kw)
    os.replace(tmp, path)


def check_run_config(workdir: str, config, harmless: Iterable[str], extendable: Iterable[str] = (),
                     resuming: bool = True, write: bool = True,
                     log: Callable[[str], None] = print, name: str = "config.json") -> None:
    """Records the run's config in WORKDIR/config.json, and on resume compares it with the
    recorded one: a change in a field outside `harmless` (entries ending in "." are prefixes)
    and outside `extendable` (which may only grow) refuses to resume, listing every
    difference; harmless changes go on with a warning."""
    path = os.path.join(workdir, name)
    now = flatten_config(config)
    if resuming:
        before = read_record(path)
        if before is not None:
            harmless, extendable = set(harmless), set(extendable)
            refused, warned = [], []
            for key in sorted(set(before) | set(now)):
                a, b = before.get(key, "<absent>"), now.get(key, "<absent>")
                if a == b:
                    continue
                change = f"{key}: {a!r} -> {b!r}"
                grows = (key in extendable and isinstance(a, (int, float))
                         and isinstance(b, (int, float)) and b > a)
                minor = (key in harmless or any(key.startswith(p) for p in harmless
                                                if p.endswith("."))
                         # a field added or removed by another version of cpsc-jax
                         or key not in before or key not in now)
                (warned if minor or grows else refused).append(change)
            if refused:
                raise RunError(f"{workdir} holds a run with another config ({path}); changed: "
                               + "; ".join(refused) + ". Re-run with the recorded values, or use "
                               "a fresh --workdir")
            if warned:
                log("warning: resuming with changed settings: " + "; ".join(warned))
    if write:
        write_record(path, now, indent=1, sort_keys=True)


class Elapsed:
    """Wall time of a run across invocations, killed ones included: the total so far is kept in
    WORKDIR/`name`, refreshed at every `tick` (each progress line)."""

    def __init__(self, workdir: str, fresh: bool, enabled: bool = True,
                 name: str = "elapsed.json"):
        self.path = os.path.join(workdir, name)
        self.enabled = enabled
        self.prior = 0.0
        if not fresh and os.path.isfile(self.path):
            try:
                with open(self.path) as f:
                    self.prior = float(json.load(f)["elapsed_s"])
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                self.prior = 0.0
        self.start = time.time()

    def total(self) -> float:
        return self.prior + time.time() - self.start

    def tick(self) -> float:
        total = self.total()
        if self.enabled:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"elapsed_s": round(total, 3)}, f)
            os.replace(tmp, self.path)
        return total
