"""Metrics as JSON lines in the workdir, and a console progress line with an ETA."""
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class JsonlWriter:
    """Appends one JSON object per record to a file (process 0 only: `enabled=False` on the
    others).

    On resume (`resume_step` set) records past the restored step are dropped, so that a run
    resumed after a crash leaves the same file as an uninterrupted one (the epoch record is
    written before the checkpoint that follows it, so a kill in between only repeats it); a
    line torn by a kill is dropped too. A fresh run (`resume_step` None) starts a new file."""

    def __init__(self, path: str, resume_step: Optional[int] = None, enabled: bool = True,
                 step_key: str = "step"):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is not None and os.path.exists(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue   # torn by a kill mid-write
                    if record.get(step_key, 0) <= resume_step:
                        kept.append(json.dumps(record) + "\n")
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, step: int, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Iterations per second and ETA measured from the first iteration timed in this process
    (so compilation and a resumed run's earlier iterations do not distort them)."""

    def __init__(self, total: int, start: int, stream=sys.stdout, enabled: bool = True):
        self.total, self.start, self.stream, self.enabled = total, start, stream, enabled
        self.t0: Optional[float] = None
        self.i0 = start

    def mark(self, step: int):
        if self.t0 is None:
            self.t0, self.i0 = time.time(), step

    def line(self, step: int, text: str) -> str:
        rate = (step - self.i0) / max(time.time() - self.t0, 1e-9) if self.t0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        msg = f"[{step:>6d}/{self.total}] {text} | {rate:.1f} it/s, ETA {format_duration(eta)}"
        if self.enabled:
            print(msg, file=self.stream, flush=True)
        return msg
