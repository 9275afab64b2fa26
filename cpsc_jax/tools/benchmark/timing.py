"""Timing: synchronised calls, interleaved round-robin across variants (a change in the
machine's load hits all of them alike), median and quartiles."""
import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, List

import numpy as np


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of timed calls (after warm-up)."""

    times_s: List[float]

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times_s)

    def summary(self) -> Dict[str, float]:
        ms = sorted(1e3 * t for t in self.times_s)
        q = np.percentile(ms, [25, 75]) if len(ms) > 1 else (ms[0], ms[0])
        return {"median_ms": round(self.median_ms, 3), "min_ms": round(ms[0], 3),
                "p25_ms": round(float(q[0]), 3), "p75_ms": round(float(q[1]), 3),
                "mean_ms": round(float(np.mean(ms)), 3), "n": len(ms)}


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
    """Seconds of one synchronised call."""
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def time_interleaved(variants: Dict[str, Callable[[], float]], iters: int,
                     warmup: int) -> Dict[str, Timing]:
    """`variants` maps a name to a zero-argument function returning the seconds of one
    synchronised call. Every variant is warmed up, then timed `iters` times round-robin."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(iters):
        for name, run in variants.items():
            times[name].append(run())
    return {name: Timing(t) for name, t in times.items()}


