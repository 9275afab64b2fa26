"""The teacher a distillation receives: a frozen classifier plus what the run must know of it.

Distillation (`cpsc_jax.trainer`) never trains or finds its teacher; the caller hands it one:
loaded from a model checkpoint (`load_teacher`: converted from PyTorch, trained by
`cpsc_jax.teacher_training`, or a registered architecture of the user's), or any Flax module
through `from_flax` (see `cpsc_jax.flax_teacher`).
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax

from cpsc_jax import checkpoint as ckpt_lib
from cpsc_jax.models import get_model


@dataclasses.dataclass
class Teacher:
    """`build(axis_name, dtype)` gives the network as distillation calls it:
    `apply(variables, x, train=False, features=True) -> (logits, pooled feature)`, with the
    moments of every BatchNorm input stored in the `bn_moments` collection when it is mutable.
    """

    variables: Dict[str, Any]        # {"params": ..., "batch_stats": ...}
    num_classes: int
    image_size: int
    channels: int
    mean: Tuple[float, ...]          # the input normalisation the teacher expects
    std: Tuple[float, ...]
    arch: Optional[str] = None       # registry name, when it is one
    path: Optional[str] = None       # the checkpoint it was read from
    builder: Optional[Callable[..., Any]] = None   # (axis_name, dtype) -> module, for others

    @property
    def name(self) -> str:
        return self.arch or "custom Flax teacher"

    def build(self, axis_name: Optional[str] = None, dtype: Any = None):
        if self.builder is not None:
            return self.builder(axis_name, dtype)
        return get_model(self.arch, self.num_classes, axis_name=axis_name, dtype=dtype)

    def has_batchnorm(self) -> bool:
        return bool(jax.tree.leaves(self.variables.get("batch_stats", {})))

    def spec(self) -> ckpt_lib.ModelSpec:
        return ckpt_lib.ModelSpec(self.arch or "custom", self.num_classes, self.image_size,
                                  self.channels, self.mean, self.std)


def load_teacher(path: str) -> Teacher:
    """A teacher from a model checkpoint directory (model.json + variables)."""
    spec, variables = ckpt_lib.load_model(path)
    return Teacher(variables, spec.num_classes, spec.image_size, spec.channels, tuple(spec.mean),
                   tuple(spec.std), arch=spec.arch, path=path)


def resolve_teacher(config, workdir: str, log: Callable[[str], None] = print) -> Teacher:
    """The command line's teacher: `config.teacher.checkpoint`, else WORKDIR/teacher, trained
    there first when the config allows it (`teacher.train_if_missing`, the embedded default)."""
    import os

    from cpsc_jax.config_validation import ConfigError
    path = config.teacher.checkpoint or os.path.join(workdir, "teacher")
    if ckpt_lib.is_model_checkpoint(path):
        return load_teacher(path)
    train_if_missing = config.teacher.get("train_if_missing", False)
    if config.teacher.checkpoint and not train_if_missing:
        raise ConfigError(f"config.teacher.checkpoint={path!r} is not a model checkpoint (no "
                          "model.json): point it at the output of cpsc-convert-teacher or "
                          "cpsc-train-teacher")
    if not train_if_missing:
        raise ConfigError("no teacher: set --config.teacher.checkpoint=DIR to a checkpoint written "
                          "by cpsc-convert-teacher or cpsc-train-teacher")
    from cpsc_jax.teacher_training import train_teacher
    log(f"no teacher checkpoint at {path}: training {config.teacher.training.arch} first")
    return load_teacher(train_teacher(config.teacher.training, workdir, log=log))
