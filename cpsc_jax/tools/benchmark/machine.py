"""Machine hygiene: the load average (a comparison is refused or flagged when the machine is
busy) and PyTorch's OpenMP workers, waited for until they sleep so that they are passive
whenever a JAX call is timed (libgomp has no run-time switch for their spinning)."""
import os
import statistics
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from cpsc_jax.errors import UserError


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LoadTooHigh(UserError, RuntimeError):
    """The machine is busier than it has cores: timings would measure the other jobs."""


def check_load(force: bool = False, cores: Optional[int] = None,
               load: Optional[List[float]] = None) -> Optional[List[float]]:
    """The 1/5/15-min load now; raises `LoadTooHigh` when the 1-min load exceeds the core
    count, unless `force`."""
    cores = cores or cpu_cores()
    load = load_average() if load is None else load
    if load is not None and load[0] > cores and not force:
        raise LoadTooHigh(f"the 1-min load average is {load[0]} on {cores} cores: timings taken "
                          "now measure the other jobs too. Wait for a quieter machine, or pass "
                          "--force to time anyway (the result is then flagged)")
    return load


def flag_load(result: Dict[str, Any], cores: Optional[int] = None) -> Dict[str, Any]:
    """`result` with `cores`, `load_above_cores` and, when the 1-min load at the start or at
    the end exceeded the cores, a "WARNING" as its first key."""
    cores = cores or cpu_cores()
    ends = [l[0] for l in (result.get("load_avg_start"), result.get("load_avg_end")) if l]
    above = any(l > cores for l in ends)
    result = dict(result, cores=cores, load_above_cores=above)
    if above:
        result = {"WARNING": f"1-min load {result.get('load_avg_start')} -> "
                             f"{result.get('load_avg_end')} above the {cores} cores: these "
                             "timings are not comparable", **result}
    return result


def thread_ids() -> Optional[FrozenSet[int]]:
    """This process's thread ids (Linux), or None."""
    try:
        return frozenset(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return None


def running_threads(tids) -> List[int]:
    """Those of `tids` that are running or runnable (state R: e.g. an OpenMP thread spinning)."""
    running = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue   # the thread has ended
        if stat[stat.rindex(")") + 2] == "R":
            running.append(tid)
    return running


def wait_until_asleep(tids, timeout_s: float = 0.5, poll_s: float = 2e-4) -> Tuple[bool, float]:
    """Waits until none of `tids` runs (libgomp's workers spin up to GOMP_SPINCOUNT iterations
    after a parallel region, then sleep); returns (asleep, seconds waited)."""
    start = time.perf_counter()
    while True:
        if not running_threads(tids):
            return True, time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            return False, time.perf_counter() - start
        time.sleep(poll_s)


class ParkedThreads:
    """Calls that, after each timed call, wait (untimed) until `tids` sleep: PyTorch's OpenMP
    workers, so that they are passive while the next variant (JAX's) is timed."""

    def __init__(self, tids):
        self.tids = frozenset(tids or ())
        self.waits_s: List[float] = []
        self.timeouts = 0

    def wrap(self, run: Callable[[], float]) -> Callable[[], float]:
        def parked() -> float:
            seconds = run()
            if self.tids:
                asleep, waited = wait_until_asleep(self.tids)
                self.waits_s.append(waited)
                self.timeouts += not asleep
            return seconds
        return parked

    def summary(self) -> Dict[str, Any]:
        return {"torch_threads_parked": len(self.tids),
                "torch_park_wait_ms_median": (round(1e3 * statistics.median(self.waits_s), 3)
                                              if self.waits_s else None),
                "torch_park_timeouts": self.timeouts}
