"""Checkpoints: model checkpoints (teacher/student, one format for every producer) and the
resumable training state of a run.

A model checkpoint is a directory:
    model.json   {"format", "arch", "num_classes", "image_size", "channels", "mean", "std", ...}
    variables/   an orbax checkpoint of {"params": ..., "batch_stats": ...}
`scripts/train.py` (teacher and final student), the PyTorch converter and the teacher trainer all
write it; training, evaluation and export read it. `mean`/`std` are the input normalisation the
network expects: whoever feeds it real images applies them.
"""
import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cpsc_jax.errors import UserError
from cpsc_jax.models import compiled_init, get_model

MODEL_FORMAT = "cpsc_jax.model/1"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model checkpoint says about its network and its expected input."""

    arch: str
    num_classes: int
    image_size: int
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, axis_name=None, dtype=None):
        return get_model(self.arch, self.num_classes, axis_name=axis_name, dtype=dtype)

    def has_batchnorm(self) -> bool:
        return bool(jax.tree.leaves(self.abstract_variables().get("batch_stats", {})))

    def abstract_variables(self):
        model = self.build()
        x = jnp.zeros((1, self.image_size, self.image_size, self.channels), jnp.float32)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
        return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def init_variables(spec: ModelSpec, rng) -> Dict[str, Any]:
    """Freshly initialised `params` (and `batch_stats`) of the network a spec names."""
    x = jnp.zeros((1, spec.image_size, spec.image_size, spec.channels), jnp.float32)
    variables = compiled_init(spec.build(), rng, x)
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def save_model(path: str, spec: ModelSpec, variables: Dict[str, Any]) -> None:
    """Writes a model checkpoint; refuses to overwrite one silently half-written."""
    path = _abs(path)
    os.makedirs(path, exist_ok=True)
    if jax.process_index() == 0:   # a save that a crash interrupted leaves these behind
        for name in os.listdir(path):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    ckpt = ocp.StandardCheckpointer()   # every process takes part; the primary one writes
    ckpt.save(os.path.join(path, "variables"), jax.device_get(variables), force=True)
    ckpt.wait_until_finished()
    if jax.process_index() != 0:
        return
    meta = {"format": MODEL_FORMAT, "arch": spec.arch, "num_classes": spec.num_classes,
            "image_size": spec.image_size, "channels": spec.channels,
            "mean": list(map(float, spec.mean)), "std": list(map(float, spec.std)), **spec.extra}
    tmp = os.path.join(path, "model.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(path, "model.json"))  # model.json last: its presence marks done


def is_model_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(_abs(path), "model.json"))


def load_model_spec(path: str) -> ModelSpec:
    path = _abs(path)
    meta_path = os.path.join(path, "model.json")
    if not os.path.isfile(meta_path):
        raise CheckpointNotFound(
            f"{path} is not a cpsc-jax model checkpoint (no model.json); expected a directory "
            "written by cpsc-train, cpsc-train-teacher or cpsc-convert-teacher")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected "
                                  f"{MODEL_FORMAT!r}")
        known = {"format", "arch", "num_classes", "image_size", "channels", "mean", "std"}
        return ModelSpec(meta["arch"], int(meta["num_classes"]), int(meta["image_size"]),
                         int(meta["channels"]), tuple(meta["mean"]), tuple(meta["std"]),
                         {k: v for k, v in meta.items() if k not in known})
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); the checkpoint is damaged: "
                              "write it again") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{meta_path} lacks a valid {e} entry; the checkpoint is "
                              "damaged: write it again") from None


def load_model(path: str) -> Tuple[ModelSpec, Dict[str, Any]]:
    """Reads a model checkpoint, checking every array's shape against the named architecture."""
    spec = load_model_spec(path)
    try:
        target = spec.abstract_variables()
    except ValueError as e:   # an architecture name this installation does not know
        raise CheckpointError(f"{_abs(path)}/model.json names {e}") from None
    try:
        raw = ocp.StandardCheckpointer().restore(os.path.join(_abs(path), "variables"))
    except Exception as e:  # noqa: BLE001 - a missing or torn variables/ directory
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{_abs(path)}/variables cannot be read ({text[:200]}); the "
                              "checkpoint is damaged: write it again") from None
    problems = _tree_mismatch(target, raw)
    if problems:
        raise CheckpointError(f"model checkpoint {path} does not fit the {spec.arch} with "
                              f"{spec.num_classes} classes its model.json describes: "
                              + "; ".join(problems[:6]))
    variables = jax.tree.map(lambda t, a: jnp.asarray(a, t.dtype), target,
                             {k: raw[k] for k in target})
    return spec, variables


def _tree_mismatch(target, raw) -> Sequence[str]:
    flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
    flat_r = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(raw)}
    out = [f"missing {k}" for k in flat_t if k not in flat_r]
    out += [f"unexpected {k}" for k in flat_r if k not in flat_t]
    out += [f"shape of {k}: {tuple(np.shape(flat_r[k]))} != expected {tuple(v.shape)}"
            for k, v in flat_t.items() if k in flat_r and tuple(np.shape(flat_r[k])) != tuple(v.shape)]
    return out


class RunCheckpointer:
    """Orbax CheckpointManager for the resumable state of a run (state pytree + JSON metadata).

    Saves are synchronous so a crash right after `save` can never leave a torn latest step;
    older steps are pruned to `max_to_keep`. Every process of a multi-process run calls `save`
    and `restore` (orbax coordinates them; the primary process writes). Leftovers of a save
    that a crash interrupted (`*.orbax-checkpoint-tmp*`) are removed on opening.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = _abs(directory)
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_get(state)), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_latest_intact(self, abstract_state: Any, log=print) -> Tuple[Any, Dict[str, Any], int]:
        """The newest checkpoint that restores; an unreadable newer one (torn by a crash,
        corrupted) is skipped with a warning."""
        errors = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - orbax raises many types for a torn step
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                errors.append(f"step {step}: {text[:200]}")
                log(f"warning: checkpoint {self.directory}/{step} is unreadable ({text[:160]}); "
                    "trying an older one")
                continue
            return state, meta, step
        raise CheckpointError(f"no checkpoint in {self.directory} can be restored ("
                              + "; ".join(errors) + "); if it holds a run of another network or "
                              "config use a fresh --workdir, else remove the directory")

    def close(self):
        self._manager.close()


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used; the message says what is wrong and what to do."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The path holds no model checkpoint."""

