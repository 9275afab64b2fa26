"""The set-up every training loop shares: a writable run directory, its lock, the checkpointer,
the recorded config (a resume with other values is refused, harmless changes warn), the run's
wall time across invocations, a finished run recognised, and one metrics writer."""
import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterable, Optional

from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax.infra import runtime
from cpsc_jax.infra.metrics import MetricWriter, create_default_writer


def _quiet(*_):
    pass


@dataclasses.dataclass
class Run:
    workdir: str
    topo: runtime.Topology
    say: Callable[[str], None]          # the log on the writing process, silent elsewhere
    checkpointer: ckpt_lib.RunCheckpointer
    latest: Optional[int]               # the newest checkpoint's step; None: a fresh run
    elapsed: runtime.Elapsed
    finished: Any                       # what `finished` found (None: there is work to do)
    outputs: contextlib.ExitStack       # closed when the run ends, however it ends

    @property
    def resuming(self) -> bool:
        return self.latest is not None

    def writer(self, resume_step: Optional[int], jsonl: str = "metrics.jsonl",
               tensorboard: Optional[str] = "tensorboard", step_key: str = "step") -> MetricWriter:
        """The run's metrics writer (JSON lines, TensorBoard, console), closed with the run."""
        return self.outputs.enter_context(create_default_writer(
            self.workdir, resume_step, self.topo.is_writer, self.say, jsonl, tensorboard,
            step_key))


@contextlib.contextmanager
def open_run(config, workdir: str, log: Callable[[str], None], checkpoints: str,
             config_record: str, harmless: Iterable[str], extendable: Iterable[str] = (),
             elapsed_record: str = "elapsed.json",
             finished: Callable[[str, Optional[int]], Any] = lambda workdir, latest: None):
    """The run in `workdir` (created), locked for its life: checkpoints in WORKDIR/`checkpoints`,
    the config recorded in WORKDIR/`config_record` and checked on resume, and
    `finished(workdir, latest)` (not None: the run is complete; the caller returns it)."""
    topo = runtime.topology()
    workdir = runtime.prepare_workdir(workdir)
    say = log if topo.is_writer else _quiet
    with runtime.WorkdirLock(workdir, enabled=topo.is_writer), contextlib.ExitStack() as outputs:
        checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, checkpoints))
        outputs.callback(checkpointer.close)
        latest = checkpointer.latest_step()
        runtime.check_run_config(workdir, config, harmless, extendable, resuming=latest is not None,
                                 write=topo.is_writer, log=say, name=config_record)
        elapsed = runtime.Elapsed(workdir, fresh=latest is None, enabled=topo.is_writer,
                                  name=elapsed_record)
        yield Run(workdir, topo, say, checkpointer, latest, elapsed, finished(workdir, latest),
                  outputs)
