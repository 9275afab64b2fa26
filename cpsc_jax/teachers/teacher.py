"""The teacher a distillation receives: a frozen classifier plus what the run must know of it.

Distillation (`cpsc_jax.method.trainer`) never trains or finds its teacher; the caller hands it one:
loaded from a model checkpoint (`load_teacher`: converted from PyTorch, trained by
`cpsc_jax.teachers.training`, or a registered architecture of the user's), or any Flax module
or apply function through `Teacher.from_flax` (see `cpsc_jax.teachers.flax_wrap`).
"""
import dataclasses
import hashlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax.infra import runtime
from cpsc_jax.errors import UserError
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
    label: Optional[str] = None      # how logs name a teacher that is not in the registry

    @property
    def name(self) -> str:
        return self.arch or self.label or "custom Flax teacher"

    @classmethod
    def from_flax(cls, network, variables: Dict[str, Any], *, num_classes: int, input_shape,
                  mean, std, feature_layer: Optional[str] = None,
                  feature_fn: Optional[Callable[..., Any]] = None,
                  train_arg: Optional[str] = "train",
                  check_bn_moments: bool = True) -> "Teacher":
        """A teacher from any `flax.linen` classifier (or `apply_fn(variables, x)`) and its
        variables, wrapped by `cpsc_jax.teachers.flax_wrap` (feature_layer, feature_fn, train_arg: see
        there). `input_shape` is (H, W, C) of the normalised input, `mean`/`std` the
        normalisation the teacher was trained with (one value or one per channel).

        The network is traced once: its logits must have `num_classes` columns and, when it has
        `batch_stats` and `check_bn_moments` is on, every BatchNorm input's moments must be
        seen (the BN-statistics term reads them); turn the check off only with loss.beta = 0.
        """
        from cpsc_jax.teachers import flax_wrap
        classifier = flax_wrap.wrap(network, variables, feature_layer=feature_layer,
                                    feature_fn=feature_fn, train_arg=train_arg)
        variables = {k: v for k, v in dict(variables).items()
                     if k not in flax_wrap._OUTPUT_COLLECTIONS}
        variables = jax.tree.map(jax.numpy.asarray, variables)
        image_size, channels = flax_wrap.input_spec(input_shape)
        has_bn = bool(jax.tree.leaves(variables.get("batch_stats", {})))
        flax_wrap.check_classifier(classifier, variables, num_classes, input_shape,
                                   "the teacher", need_moments=has_bn and check_bn_moments)
        inner = getattr(classifier, "module", None)
        label = type(inner).__name__ if inner is not None else "teacher apply function"
        return cls(variables, num_classes, image_size, channels,
                   per_channel(mean, channels, "mean"), per_channel(std, channels, "std"),
                   builder=lambda axis_name=None, dtype=None: classifier.for_run(axis_name, dtype),
                   label=label)

    def build(self, axis_name: Optional[str] = None, dtype: Any = None):
        if self.builder is not None:
            return self.builder(axis_name, dtype)
        return get_model(self.arch, self.num_classes, axis_name=axis_name, dtype=dtype)

    def has_batchnorm(self) -> bool:
        return bool(jax.tree.leaves(self.variables.get("batch_stats", {})))

    def identity(self) -> Dict[str, Any]:
        """What makes this teacher itself: its network, input and a SHA-256 of its variables
        (names, shapes, dtypes and values), so a run can refuse to resume with another."""
        h = hashlib.sha256()
        leaves = jax.tree_util.tree_flatten_with_path(self.variables)[0]
        for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
            value = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
            h.update(value.tobytes())
        return {"name": self.name, "num_classes": self.num_classes,
                "input": [self.image_size, self.image_size, self.channels],
                "mean": list(self.mean), "std": list(self.std), "sha256": h.hexdigest(),
                "path": self.path}

    def spec(self) -> ckpt_lib.ModelSpec:
        return ckpt_lib.ModelSpec(self.arch or "custom", self.num_classes, self.image_size,
                                  self.channels, self.mean, self.std)


def per_channel(values, channels: int, what: str) -> Tuple[float, ...]:
    """One float per channel from a scalar or a sequence (a single value is repeated)."""
    import numpy as np
    values = tuple(float(v) for v in np.atleast_1d(np.asarray(values, np.float64)))
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(np.isfinite(values)):
        raise ValueError(f"{what} must be one finite value or {channels} (one per channel), got "
                         f"{values}")
    if what == "std" and min(values) <= 0:
        raise ValueError(f"std must be > 0, got {values}")
    return values


def load_teacher(path: str) -> Teacher:
    """A teacher from a model checkpoint directory (model.json + variables)."""
    spec, variables = ckpt_lib.load_model(path)
    return Teacher(variables, spec.num_classes, spec.image_size, spec.channels, tuple(spec.mean),
                   tuple(spec.std), arch=spec.arch, path=path)


TEACHER_RECORD = "teacher.json"


class TeacherChanged(UserError, ValueError):
    """A run directory is resumed with a teacher other than the one it was distilled from."""


def check_teacher_identity(workdir: str, teacher: Teacher, resuming: bool,
                           write: bool = True) -> None:
    """Records the teacher's identity in WORKDIR/teacher.json; on resume, a different teacher
    (other variables, network or input) is refused: the run would go on distilling from it."""
    path = os.path.join(workdir, TEACHER_RECORD)
    now = teacher.identity()
    if resuming:
        before = runtime.read_record(path)
        if before is not None:
            changed = [k for k in ("sha256", "name", "num_classes", "input", "mean", "std")
                       if before.get(k) != now[k]]
            if changed:
                raise TeacherChanged(
                    f"{workdir} was distilled from another teacher ({before.get('name')} "
                    f"{before.get('path') or 'given in memory'}, sha256 "
                    f"{str(before.get('sha256'))[:12]}) than this one ({now['name']} "
                    f"{now['path'] or 'given in memory'}, sha256 {now['sha256'][:12]}; "
                    f"differs in {', '.join(changed)}): use a fresh workdir, or the original "
                    "teacher to resume")
    if write:
        runtime.write_record(path, now, indent=1)
