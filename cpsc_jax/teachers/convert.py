"""Bring your own teacher: PyTorch state_dicts <-> cpsc-jax model checkpoints.

    load_torch_state_dict(path)               .pt/.pth/.th -> {pytorch key: numpy array}
    torch_to_flax(state_dict, arch, K)        -> {"params": ..., "batch_stats": ...}
    flax_to_torch(variables)                  -> {pytorch key: numpy array} (PyTorch layouts)
    convert_teacher(input, output, arch, K)   writes a model checkpoint (cpsc_jax.infra.checkpoint)
    export_student(checkpoint, output)        writes a PyTorch state_dict (+ a side JSON)

Naming rule (the networks in cpsc_jax.models are built for it): a PyTorch key is its module path
with every numeric segment joined to the previous one by "_" (`layer1.0.conv1.weight` ->
params/layer1_0/conv1/kernel, `block1.layer.0.bn1.running_mean` -> batch_stats/block1/layer_0/bn1/
mean). Layouts: conv OIHW <-> HWIO, linear (out, in) <-> (in, out), BN weight/bias/running_mean/
running_var <-> scale/bias/mean/var, `num_batches_tracked` dropped (export adds it back as 0).
The expected keys and shapes come from the Flax architecture itself, so every registered
classifier converts without a per-architecture table.

torch is imported lazily, inside the functions that read or write .pt files: `import cpsc_jax`
and the training core never need it. Checkpoints are read with `weights_only=True`: no pickled
code is ever run.
"""
import functools
import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cpsc_jax.data import registry
from cpsc_jax.errors import UserError

# Datasets whose normalisation (and image size) a converted teacher can take by name.
DATASETS = ("cifar10", "cifar100", "mnist", "tiny_imagenet", "svhn")

# Keys under which training scripts nest the model's state_dict (CMI/Fast: "state_dict" next to
# "best_acc1"/"optimizer"; option-A ResNets: "state_dict" + "best_prec1"; others below).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
# Names the classifiers give their last Dense layer (used to explain a wrong --num-classes).
_HEAD_NAMES = ("linear", "fc", "classifier", "fc2")

_FLAX_TO_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                       ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                       ("batch_stats", "var"): "running_var",
                       # the conditional BatchNorm's per-class tables (nn.Embedding weights)
                       ("params", "gamma"): "gamma.weight", ("params", "beta"): "beta.weight"}
_TORCH_TO_FLAX_LEAF = {"running_mean": ("batch_stats", "mean"),
                       "running_var": ("batch_stats", "var"), "bias": ("params", "bias")}


class ConversionError(UserError, ValueError):
    """A user-facing conversion problem; its message is meant to be printed as is."""


# --------------------------------------------------------------------------------------------
# Reading PyTorch checkpoints
# --------------------------------------------------------------------------------------------

def _import_torch():
    try:
        import torch  # noqa: F401  (lazy: only the converter needs it)
    except ImportError as e:
        raise ConversionError("PyTorch is needed to read or write .pt files; install it "
                              "(the CPU build is enough): pip install torch") from e
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:  # torch's weights_only error is a page of advice around this one fact
        return found.group(0)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if found:  # not a pickle at all, e.g. "Unsupported operand 118"
        return found.group(1).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if len(line) < 40 else line


def _is_tensor(v) -> bool:
    return hasattr(v, "detach") and hasattr(v, "shape") and hasattr(v, "dtype")


def _to_numpy(v) -> np.ndarray:
    if _is_tensor(v):
        v = v.detach().cpu()
        if v.is_floating_point() and v.dtype != _import_torch().float32:
            v = v.float()  # fp16/bf16/fp64 checkpoints: the networks run in fp32
        return v.numpy()
    return np.asarray(v)


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and (_is_tensor(v) or isinstance(v, np.ndarray)) for k, v in obj.items())


def _torch_load(path: str):
    torch = _import_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (anything torch.load raises means "not loadable")
        first = e
    # Some training scripts store numpy scalars next to the weights (e.g. best_acc1 as
    # np.float64). Those are plain data: allow exactly numpy's scalar/dtype reconstructors.
    if "numpy" in str(first):
        try:
            allowed = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
                       type(np.dtype(np.int64)), type(np.dtype(np.int32))]
            try:
                from numpy._core.multiarray import scalar  # numpy >= 2
            except ImportError:  # pragma: no cover
                from numpy.core.multiarray import scalar
            allowed.append(scalar)
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            pass
    msg = _first_line(first)
    if "Unsupported global" in msg:
        raise ConversionError(
            f"{path} holds pickled Python objects, not just tensors ({msg}); it cannot be read "
            "safely. Load it with the code that wrote it and re-save the weights only: "
            "torch.save(model.state_dict(), 'teacher.pt')")
    raise ConversionError(f"{path} is not a PyTorch checkpoint (torch.load failed: {msg}); "
                          "expected a .pt/.pth/.th file written by torch.save holding a "
                          "state_dict or a dict with a 'state_dict' entry")


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):  # nn.DataParallel / DistributedDataParallel
        key = key[len("module."):]
    return key


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into {pytorch key: numpy array} (float tensors as float32).

    Accepts a raw state_dict, or a dict holding one under 'state_dict' (CMI/Fast/option-A style,
    next to 'best_acc1', 'optimizer', ...), 'model_state_dict', 'model' or 'net'. Strips
    `module.` prefixes and drops `num_batches_tracked`. Never runs pickled code.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ConversionError(f"{path} is a directory; expected a PyTorch checkpoint file "
                              "(.pt/.pth/.th written by torch.save)")
    obj = _torch_load(path)
    state = None
    if _is_tensor_dict(obj):
        state = obj
    elif isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if _is_tensor_dict(obj.get(key)):
                state = obj[key]
                break
    if state is None:
        if isinstance(obj, Mapping):
            keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
            what = f"a dict without a tensor dict under {'/'.join(_NESTED_KEYS[:2])} " \
                   f"(top-level keys: {keys or 'none'})"
        else:
            what = f"a {type(obj).__name__}"
        raise ConversionError(f"{path} holds {what}, not a state_dict; expected "
                              "torch.save(model.state_dict()) or {'state_dict': ...}")
    out: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        key = _strip_prefix(key)
        if key.endswith("num_batches_tracked"):
            continue
        if key in out:
            raise ConversionError(f"{path}: key {key!r} appears twice (with and without "
                                  "'module.')")
        out[key] = _to_numpy(value)
    return out


# --------------------------------------------------------------------------------------------
# Name and layout mapping
# --------------------------------------------------------------------------------------------

def _torch_module_path(flax_path: Sequence[str]) -> str:
    # "layer1_0" -> "layer1.0", "layer_10" -> "layer.10", "shortcut_0" -> "shortcut.0"
    return ".".join(re.sub(r"_(\d+)(?=_|$)", r".\1", seg) for seg in flax_path)


def _leaf_items(tree, prefix=()) -> Iterable[Tuple[Tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for k in sorted(tree):
            yield from _leaf_items(tree[k], prefix + (str(k),))
    else:
        yield prefix, tree


def _torch_key(collection: str, path: Tuple[str, ...]) -> str:
    leaf = _FLAX_TO_TORCH_LEAF.get((collection, path[-1]))
    if leaf is None:
        raise ConversionError(f"{collection}/{'/'.join(path)} has no PyTorch counterpart "
                              "(only conv/linear kernels, biases and BatchNorm are mapped)")
    return f"{_torch_module_path(path[:-1])}.{leaf}" if len(path) > 1 else leaf


def _to_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))  # HWIO -> OIHW
    if name == "kernel" and array.ndim == 2:
        return np.transpose(array)  # (in, out) -> (out, in)
    return array


def _to_flax_layout(name: str, array: np.ndarray) -> np.ndarray:
    if name == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    if name == "kernel" and array.ndim == 2:
        return np.transpose(array)
    return array


def _torch_shape(name: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if name == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if name == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def expected_torch_layout(arch: str, num_classes: int, image_size: int = 32,
                          channels: Optional[int] = None):
    """{pytorch key: (collection, flax path, torch shape, dtype)} for a registered classifier."""
    return dict(_layout(arch, int(num_classes), int(image_size),
                        int(channels or default_channels(arch))))


@functools.lru_cache(maxsize=64)
def _layout(arch: str, num_classes: int, image_size: int, channels: int):
    from cpsc_jax.infra.checkpoint import ModelSpec  # local: keeps this module import-light
    spec = ModelSpec(arch, num_classes, image_size, channels, (0.0,) * channels,
                     (1.0,) * channels)
    abstract = spec.abstract_variables()
    layout = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in _leaf_items(abstract.get(collection, {})):
            layout[_torch_key(collection, path)] = (
                collection, path, _torch_shape(path[-1], tuple(leaf.shape)), leaf.dtype)
    return layout


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _list(items: List[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _head_key(layout, num_classes: int) -> Optional[str]:
    """The PyTorch key of the classifier's output weight (the last Dense: num_classes outputs)."""
    candidates = [k for k, (c, p, shape, _) in layout.items()
                  if c == "params" and p[-1] == "kernel" and len(shape) == 2
                  and shape[0] == num_classes]
    named = [k for k in candidates if k.split(".")[0] in _HEAD_NAMES and k.count(".") == 1]
    pick = named or candidates
    return pick[-1] if pick else None


def guess_arch(state_dict: Mapping[str, Any]) -> List[str]:
    """Registered classifiers whose keys and shapes fit the checkpoint (the head's width aside)."""
    from cpsc_jax.models import available_models
    matches = []
    for arch in available_models():
        try:
            layout = expected_torch_layout(arch, 10)
        except Exception:  # noqa: BLE001  (a guess must never mask the real error)
            continue
        if set(layout) != set(state_dict):
            continue
        head = _head_key(layout, 10)
        skip = {head, head[:-len("weight")] + "bias"} if head else set()
        if all(tuple(np.shape(state_dict[k])) == shape
               for k, (_, _, shape, _) in layout.items() if k not in skip):
            matches.append(arch)
    return matches


def torch_to_flax(state_dict: Mapping[str, Any], arch: str, num_classes: int,
                  image_size: int = 32, channels: Optional[int] = None) -> Dict[str, Any]:
    """A PyTorch state_dict (tensors or arrays) -> Flax variables {"params", "batch_stats"}.

    Every key and shape is checked against the named architecture; a mismatch raises a
    ConversionError naming the missing, unexpected and mis-shaped PyTorch keys (or, when only the
    classifier's width differs, one line about --num-classes).
    """
    layout = expected_torch_layout(arch, num_classes, image_size, channels)
    state = {_strip_prefix(k): v for k, v in state_dict.items()
             if not k.endswith("num_batches_tracked")}
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    mismatched = [k for k, (_, _, shape, _) in layout.items()
                  if k in state and tuple(np.shape(state[k])) != shape]

    head = _head_key(layout, num_classes)
    if head and head in mismatched and not missing and not unexpected:
        shape = tuple(np.shape(state[head]))
        exp = layout[head][2]
        others = [k for k in mismatched if k not in (head, head[:-len("weight")] + "bias")]
        if not others and len(shape) == 2 and shape[1] == exp[1]:
            raise ConversionError(
                f"checkpoint has {shape[0]} classes ({head} is {_fmt_shape(shape)}) but "
                f"--num-classes {num_classes} was given")

    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not match {arch} ({num_classes} classes, "
                 f"{len(layout)} tensors expected, {len(state)} found):"]
        if missing:
            lines.append(f"  missing {len(missing)}: " + _list(
                [f"{k} {_fmt_shape(layout[k][2])}" for k in missing]))
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)}: " + _list(
                [f"{k} {_fmt_shape(np.shape(state[k]))}" for k in unexpected]))
        if mismatched:
            lines.append(f"  shape mismatch {len(mismatched)}: " + _list(
                [f"{k} is {_fmt_shape(np.shape(state[k]))}, expected "
                 f"{_fmt_shape(layout[k][2])}" for k in mismatched]))
        if missing or unexpected:
            guesses = [g for g in guess_arch(state) if g != arch]
            if guesses:
                lines.append(f"  the keys match --arch {' or '.join(guesses)}")
        raise ConversionError("\n".join(lines))

    variables: Dict[str, Any] = {}
    for key, (collection, path, _, dtype) in layout.items():
        array = _to_numpy(state[key])
        if not np.issubdtype(array.dtype, np.floating):
            raise ConversionError(f"{key} has dtype {array.dtype}; expected floating point")
        if not np.all(np.isfinite(array)):
            raise ConversionError(f"{key} contains NaN or Inf values")
        if path[-1] == "var" and np.any(array < 0):
            raise ConversionError(f"{key} has negative entries; it is not a BatchNorm "
                                  "running variance")
        node = variables.setdefault(collection, {})
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax_layout(path[-1], array), dtype=dtype)
    return variables


def flax_to_torch(variables: Mapping[str, Any],
                  num_batches_tracked: bool = False) -> Dict[str, np.ndarray]:
    """Flax variables -> {pytorch key: numpy array} in PyTorch layouts (inverse of
    torch_to_flax). With num_batches_tracked, every BatchNorm gets that entry as int64 0, so
    `load_state_dict(strict=True)` accepts the result."""
    out: Dict[str, np.ndarray] = {}
    items = []
    for collection in ("params", "batch_stats"):
        for path, leaf in _leaf_items(variables.get(collection, {})):
            items.append((path[:-1], collection, path))
    order = {("params", "kernel"): 0, ("params", "scale"): 0, ("params", "bias"): 1,
             ("batch_stats", "mean"): 2, ("batch_stats", "var"): 3}
    items.sort(key=lambda t: (t[0], order.get((t[1], t[2][-1]), 9)))
    for module, collection, path in items:
        node = variables[collection]
        for seg in path:
            node = node[seg]
        out[_torch_key(collection, path)] = np.ascontiguousarray(
            _to_torch_layout(path[-1], np.asarray(node)))
        if num_batches_tracked and collection == "batch_stats" and path[-1] == "var":
            out[f"{_torch_module_path(module)}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


# --------------------------------------------------------------------------------------------
# Whole-checkpoint operations (what the scripts call)
# --------------------------------------------------------------------------------------------

def load_flax_variables(module, variables, strict: bool = True):
    """Copies Flax `{"params", "batch_stats"}` of the same network into `module` (in its dtype),
    through the converter's key mapping; returns the module."""
    torch = _import_torch()
    current = module.state_dict()
    state = {}
    for key, value in flax_to_torch(variables, num_batches_tracked=True).items():
        target = current.get(key)
        dtype = target.dtype if target is not None else None
        state[key] = torch.as_tensor(np.array(value)).to(dtype=dtype)
    module.load_state_dict(state, strict=strict)
    return module


def default_channels(arch: str) -> int:
    return 1 if arch.startswith("lenet") else 3


def _floats(value, name: str) -> Tuple[float, ...]:
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ConversionError(f"--{name} must be comma-separated numbers, got {value!r}")
    elif isinstance(value, (int, float)):
        value = [value]
    value = tuple(float(v) for v in value)
    if not value or not all(math.isfinite(v) for v in value):
        raise ConversionError(f"--{name} must be finite numbers, got {value!r}")
    return value


def resolve_normalisation(arch: str, dataset: Optional[str] = None, mean=None, std=None,
                          image_size: Optional[int] = None, channels: Optional[int] = None):
    """(mean, std, image_size, channels, dataset) from the flags; explicit values win.

    One of --dataset or --mean/--std is required for 3-channel networks: a PyTorch state_dict
    does not record the normalisation its network was trained with, and a wrong one silently
    costs accuracy. 1-channel networks (LeNet) default to MNIST, the only such dataset.
    """
    channels = int(channels or default_channels(arch))
    if dataset is None and (mean is None or std is None) and channels == 1:
        dataset = "mnist"
    if dataset is not None:
        if dataset not in DATASETS:
            raise ConversionError(f"unknown dataset {dataset!r}; choose one of "
                                  f"{', '.join(DATASETS)} or give --mean/--std")
        d = registry.get(dataset)
        mean = d.mean if mean is None else mean
        std = d.std if std is None else std
        image_size = image_size or d.image_size
    if mean is None or std is None:
        raise ConversionError(
            "give --dataset (" + ", ".join(DATASETS) + ") or both --mean and --std: the "
            "checkpoint does not record the input normalisation its network was trained with")
    mean, std = _floats(mean, "mean"), _floats(std, "std")
    if len(mean) == 1 and channels > 1:
        mean = mean * channels
    if len(std) == 1 and channels > 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise ConversionError(f"{arch} takes {channels}-channel images but mean has {len(mean)} "
                              f"and std {len(std)} values")
    if any(s <= 0 for s in std):
        raise ConversionError(f"--std must be positive, got {std}")
    image_size = int(image_size or 32)
    if image_size < 8:
        raise ConversionError(f"--image-size must be at least 8, got {image_size}")
    return mean, std, image_size, channels, dataset


def convert_teacher(input: str, output: str, arch: str, num_classes: int, mean=None, std=None,
                    image_size: Optional[int] = None, channels: Optional[int] = None,
                    dataset: Optional[str] = None):
    """Converts a PyTorch checkpoint to a cpsc-jax model checkpoint directory; returns
    (spec, variables). The result is what `--config.teacher.checkpoint=DIR` expects."""
    from cpsc_jax.infra.checkpoint import ModelSpec, save_model
    from cpsc_jax.models import available_models
    if arch not in available_models():  # before reading the file: the cheap error first
        raise ConversionError(f"unknown model {arch!r}; valid names: "
                              f"{', '.join(available_models())}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConversionError(f"--num-classes must be an integer >= 2, got {num_classes!r}")
    mean, std, image_size, channels, dataset = resolve_normalisation(
        arch, dataset, mean, std, image_size, channels)
    state = load_torch_state_dict(input)
    variables = torch_to_flax(state, arch, num_classes, image_size, channels)
    extra = {"source": os.path.abspath(os.path.expanduser(str(input))),
             "converted_from": "pytorch"}
    if dataset is not None:
        extra["dataset"] = dataset
    spec = ModelSpec(arch, num_classes, image_size, channels, mean, std, extra)
    save_model(output, spec, variables)
    return spec, variables


def export_student(checkpoint: str, output: str, meta_json: Optional[str] = "auto",
                   num_batches_tracked: bool = True):
    """Writes a model checkpoint as a PyTorch state_dict (torch tensors, PyTorch key layout).

    meta_json: "auto" writes OUTPUT with its suffix replaced by .json (arch, classes, image
    size, channels, mean, std, and under "pytorch" the class to import and the lines that load
    the state_dict); None writes none. Returns (spec, state_dict of numpy arrays).
    """
    from cpsc_jax.infra.checkpoint import load_model
    torch = _import_torch()
    spec, variables = load_model(checkpoint)
    arrays = flax_to_torch(variables, num_batches_tracked=num_batches_tracked)
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
    output = os.path.abspath(os.path.expanduser(str(output)))
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = output + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):   # a failed write leaves nothing behind
            os.remove(tmp)
    if meta_json == "auto":
        meta_json = os.path.splitext(output)[0] + ".json"
    if meta_json:
        meta = {"arch": spec.arch, "num_classes": spec.num_classes,
                "image_size": spec.image_size, "channels": spec.channels,
                "mean": list(spec.mean), "std": list(spec.std), "input_layout": "NCHW",
                "state_dict": os.path.basename(output),
                "source": os.path.abspath(os.path.expanduser(str(checkpoint))),
                "pytorch": pytorch_loading(spec, os.path.basename(output))}
        with open(meta_json, "w") as f:
            json.dump(meta, f, indent=2)
    return spec, arrays


def pytorch_loading(spec, state_dict_file: str) -> Dict[str, Any]:
    """How to load an exported state_dict in PyTorch: the class of `cpsc_jax.pytorch.models`
    that holds exactly its keys, and the lines that build it and load the weights."""
    from cpsc_jax.pytorch import models as torch_models
    if spec.arch not in torch_models.available_models():
        return {"class": None,
                "note": f"{spec.arch!r} has no PyTorch definition in cpsc_jax.pytorch.models; "
                        "load the state_dict into a module with the same keys (see "
                        "cpsc_jax.teachers.convert for the key and layout rules)"}
    net = torch_models.get_model(spec.arch, spec.num_classes, spec.channels)
    build = f"get_model({spec.arch!r}, {spec.num_classes}, channels={spec.channels})"
    return {
        "class": f"{type(net).__module__}.{type(net).__qualname__}",
        "build": f"cpsc_jax.pytorch.models.{build}",
        "load": ["import torch", "from cpsc_jax.pytorch.models import get_model",
                 f"net = {build}",
                 f"net.load_state_dict(torch.load({state_dict_file!r}, weights_only=True), "
                 "strict=True)",
                 "net.eval()"],
        "input": f"NCHW float32, {spec.channels}x{spec.image_size}x{spec.image_size}, "
                 "(x / 255 - mean) / std per channel",
        "output": "logits; net(x, features=True) -> (logits, pooled feature)",
    }
