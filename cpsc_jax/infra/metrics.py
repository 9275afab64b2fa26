"""What a run reports, through one `MetricWriter` (`create_default_writer`): metrics as JSON
lines in the workdir, TensorBoard event files (when tensorboardX, or torch with tensorboard, is
installed) and lines on the console; plus a progress line with an ETA and an optional profiler
trace of a few iterations."""
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class Closing:
    """A context manager that calls `close()` on exit, however the block ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


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

    def __init__(self, total: int, start: int, stream=sys.stdout, enabled: bool = True,
                 emit: Optional[Callable[[str], None]] = None):
        self.total, self.start, self.stream, self.enabled = total, start, stream, enabled
        self.emit = emit   # where lines go (default: printed to `stream`)
        self.t0: Optional[float] = None
        self.i0 = start

    def mark(self, step: int):
        if self.t0 is None:
            self.t0, self.i0 = time.time(), step

    def format(self, step: int, text: str) -> str:
        """The progress line of `step`: `text`, the rate and the ETA."""
        rate = (step - self.i0) / max(time.time() - self.t0, 1e-9) if self.t0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        return f"[{step:>6d}/{self.total}] {text} | {rate:.1f} it/s, ETA {format_duration(eta)}"

    def line(self, step: int, text: str) -> str:
        """Emits (or prints) the progress line of `step`."""
        msg = self.format(step, text)
        if self.enabled and self.emit is not None:
            self.emit(msg)
        elif self.enabled:
            print(msg, file=self.stream, flush=True)
        return msg


# ------------------------------------------------------------------------------ TensorBoard

# The metrics the HParams dashboard pairs with a run's hyper-parameters (scalar tags).
HPARAM_METRICS = ("student_accuracy", "best_student_accuracy")


@contextlib.contextmanager
def _torch_hidden():
    """tensorboardX imports torch, when installed, only to name torch.Tensor in its type hints
    (2-3 s at every run start); we pass it floats and NumPy arrays, so while tensorboardX is
    first imported, `import torch` fails as if torch were absent. An already imported torch is
    left alone."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _summary_backend():
    """(SummaryWriter class, hparams summary function) of tensorboardX, else of
    torch.utils.tensorboard (needs the tensorboard package), else None."""
    try:
        with _torch_hidden():
            import tensorboardX
            from tensorboardX.summary import hparams
        return tensorboardX.SummaryWriter, hparams
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        return SummaryWriter, hparams
    except ImportError:   # torch absent, or present without tensorboard
        return None


def _image_hwc_uint8(image) -> Any:
    import numpy as np
    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = np.round(np.clip(x.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be HxW or HxWxC with C in 1, 3, 4; got {x.shape}")
    return x


class TensorBoardWriter(Closing):
    """Scalars, images and hyper-parameters as TensorBoard event files in `logdir`.

    `write(step, record)` takes the same records as `JsonlWriter` (every loss term, teacher
    agreement, learning rates, accuracies): each number becomes a scalar named by its key;
    None, strings and lists are skipped. On resume (`resume_step`) TensorBoard is told to drop
    the events past that step (`purge_step`), so a repeated stretch is not shown twice.
    """

    enabled = True

    def __init__(self, logdir: str, resume_step: Optional[int] = None, backend=None,
                 flush_secs: int = 30):
        backend = backend or _summary_backend()
        if backend is None:
            raise ImportError("TensorBoard output needs tensorboardX: pip install tensorboardX")
        writer_class, self._hparams = backend
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        self._writer = writer_class(logdir, purge_step=None if resume_step is None
                                    else int(resume_step) + 1, flush_secs=flush_secs)

    def write(self, step: int, record: Dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, bool) or value is None or isinstance(value, str):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue   # lists, dicts: not a scalar
            self._writer.add_scalar(key, number, int(step))

    def write_image(self, step: int, tag: str, image) -> None:
        """An HxW or HxWxC image, uint8 or float in [0, 1] (e.g. the labelled sample grid)."""
        self._writer.add_image(tag, _image_hwc_uint8(image), int(step), dataformats="HWC")

    def write_hparams(self, config, metrics: Sequence[str] = HPARAM_METRICS) -> None:
        """The config as hyper-parameters (HParams dashboard, paired with the scalar `metrics`)
        and as text (the whole config, readable)."""
        from cpsc_jax.infra.runtime import flatten_config
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                for k, v in flatten_config(config).items()}
        for summary in self._hparams(flat, {m: 0.0 for m in metrics}):
            self._file_writer().add_summary(summary)
        text = json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config),
                          indent=2, default=str)
        self._writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def _file_writer(self):
        writer = getattr(self._writer, "file_writer", None)   # tensorboardX
        return writer if writer is not None else self._writer._get_file_writer()   # torch

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NullSummaryWriter(Closing):
    """Same interface, writes nothing: TensorBoard absent, or not the writing process."""

    enabled = False

    def __init__(self, reason: str = ""):
        self.reason = reason

    def write(self, step: int, record: Dict[str, Any]) -> None:
        pass

    def write_image(self, step: int, tag: str, image) -> None:
        pass

    def write_hparams(self, config, metrics: Sequence[str] = HPARAM_METRICS) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def summary_writer(logdir: str, resume_step: Optional[int] = None, enabled: bool = True):
    """A `TensorBoardWriter` when TensorBoard output is possible here, else a
    `NullSummaryWriter` whose `reason` says why not."""
    if not enabled:
        return NullSummaryWriter("not the writing process")
    backend = _summary_backend()
    if backend is None:
        return NullSummaryWriter("no TensorBoard writer installed (pip install tensorboardX)")
    return TensorBoardWriter(logdir, resume_step, backend)


# ------------------------------------------------------------------------------ one writer

class MetricWriter(Closing):
    """Every record of a run through one writer (as clu's `create_default_writer`): each
    `write(step, record)` goes to the JSON lines file and to TensorBoard; `line`, when given, is
    that record's console line."""

    def __init__(self, jsonl: JsonlWriter, tensorboard, console: Optional[Callable[[str], None]]):
        self.jsonl, self.tensorboard, self.console = jsonl, tensorboard, console

    def write(self, step: int, record: Dict[str, Any], line: Optional[str] = None) -> None:
        self.jsonl.write(step, record)
        self.tensorboard.write(step, record)
        if line is not None and self.console is not None:
            self.console(line)

    def write_image(self, step: int, tag: str, image) -> None:
        self.tensorboard.write_image(step, tag, image)

    def write_hparams(self, config) -> None:
        self.tensorboard.write_hparams(config)

    def flush(self) -> None:
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()


def create_default_writer(workdir: str, resume_step: Optional[int] = None, enabled: bool = True,
                          console: Optional[Callable[[str], None]] = None,
                          jsonl: str = "metrics.jsonl", tensorboard: Optional[str] = "tensorboard",
                          step_key: str = "step") -> MetricWriter:
    """WORKDIR/`jsonl`, WORKDIR/`tensorboard` (None: none) and `console`, resumed at
    `resume_step` (None: a fresh run). Only the writing process writes (`enabled`)."""
    tb = (summary_writer(os.path.join(workdir, tensorboard), resume_step, enabled)
          if tensorboard else NullSummaryWriter("not asked for"))
    return MetricWriter(JsonlWriter(os.path.join(workdir, jsonl), resume_step, enabled, step_key),
                        tb, console if enabled else None)


# ------------------------------------------------------------------------------ profiler

class ProfileWindow(Closing):
    """A `jax.profiler` trace of `num_steps` iterations into `logdir`, started once iteration
    `start_after` has finished (the first one of an invocation compiles: not worth tracing).

    Call `after_iteration(step, state)` after every iteration and `close()` at the end (or use
    it as a context manager). `state` is waited for at both edges, so the trace holds exactly
    the traced iterations' device work. Open the result with TensorBoard's profile plugin
    (`pip install tensorboard-plugin-profile`) or Perfetto (the `*.trace.json.gz` file).
    """

    def __init__(self, logdir: str, num_steps: int, start_after: int, enabled: bool = True):
        self.logdir, self.num_steps, self.start_after = logdir, int(num_steps), int(start_after)
        self.enabled = enabled and self.num_steps > 0
        self.active = False
        self.stop_at: Optional[int] = None
        self.done = False

    def after_iteration(self, step: int, state: Any = None) -> None:
        if not self.enabled or self.done:
            return
        import jax
        if not self.active and step >= self.start_after:
            jax.block_until_ready(state)
            os.makedirs(self.logdir, exist_ok=True)
            jax.profiler.start_trace(self.logdir)
            self.active, self.stop_at = True, step + self.num_steps
        elif self.active and step >= self.stop_at:
            jax.block_until_ready(state)
            self._stop()

    def _stop(self) -> None:
        import jax
        jax.profiler.stop_trace()
        self.active, self.done = False, True

    def close(self) -> None:
        """Ends a trace still running (the run ended or failed inside the window)."""
        if self.active:
            self._stop()
