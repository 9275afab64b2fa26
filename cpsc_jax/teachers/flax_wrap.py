"""Any Flax classifier as distillation calls it.

Distillation calls every network as `apply(variables, x, train=False, features=False)` and
reads the moments of each BatchNorm input of the teacher from the `bn_moments` collection
(`cpsc_jax.models`). A stock `flax.linen` classifier does neither: it takes no `features`
argument, and `nn.BatchNorm` records nothing. `FlaxClassifier` wraps such a module without
changing its variables (it shares the module's scope, so `params`/`batch_stats` keep the user's
own tree layout) and, through `nn.intercept_methods`, sees every submodule call:

- the pooled feature: by default the input of the last `nn.Dense` called (the classifier head;
  its input is the penultimate feature of nearly every classifier), or the output of the
  submodule named by `feature_layer` ("Dense_0", "backbone/pool": the path below the
  classifier, '/'-separated), or `feature_fn(module, x, train) -> (logits, feature)`. A
  spatial output is averaged over its spatial axes.
- with `bn_moments` mutable, the per-channel mean and biased variance of the input of every
  `flax.linen.BatchNorm`, stored at that layer's path, the layout of `batch_stats`; global
  means over devices when `axis_name` is set (inside the pmapped step), as the project's own
  BatchNorm does (`cpsc_jax.models.layers.batch_moments`).

`ApplyFnClassifier` does the same for a bare function `fn(variables, x) -> logits` (or
`(logits, feature)`), e.g. `functools.partial(model.apply, train=False)`: teacher use only.

Limits: BatchNorm layers inside lifted transforms (`nn.scan`, `nn.remat`, `nn.vmap`) are not
seen; the user's module gets no dropout RNG (distillation runs it deterministically); a module
declaring an `axis_name` (or `dtype`) field receives the run's device axis (or compute dtype),
otherwise its own `nn.BatchNorm` layers use per-device batch statistics in a multi-device
student (set their `axis_name` to `cpsc_jax.infra.runtime.AXIS` for global ones).
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax.errors import UserError
from cpsc_jax.models.layers import BN_MOMENTS, batch_moments

# Collections that are outputs of a forward pass, never inputs of the network.
_OUTPUT_COLLECTIONS = (BN_MOMENTS, "intermediates")


class WrapError(UserError, ValueError):
    """A user's network does not fit distillation; the message says what to change."""


def pool_feature(feature: jax.Array) -> jax.Array:
    """[B, D] as is; [B, ..., C] averaged over the axes between batch and channels."""
    feature = jnp.asarray(feature)
    if feature.ndim == 2:
        return feature
    if feature.ndim < 2:
        raise WrapError(f"the feature must have a batch axis and a channel axis, got shape "
                        f"{feature.shape}")
    return jnp.mean(feature, axis=tuple(range(1, feature.ndim - 1)))


def bn_input_moments(bn: nn.BatchNorm, x: jax.Array, axis_name: Optional[str]):
    """Mean and biased variance of a stock BatchNorm's input over its reduction axes."""
    if not isinstance(bn.axis, int):
        raise WrapError(f"BatchNorm at {'/'.join(bn.path)} normalises over axes {bn.axis}; "
                        "only one feature axis is supported")
    return batch_moments(jnp.moveaxis(x, bn.axis, -1), axis_name)


def _first_argument(args, kwargs):
    return args[0] if args else kwargs.get("x", next(iter(kwargs.values()), None))


class _Recorder:
    """The interceptor of one forward pass: what it saw, by path below the classifier."""

    def __init__(self, prefix: Tuple[str, ...], feature_layer: Optional[str],
                 capture_moments: bool, axis_name: Optional[str], store_in_layer: bool):
        self.prefix, self.feature_layer = prefix, feature_layer
        self.capture_moments, self.axis_name = capture_moments, axis_name
        # True: each BatchNorm writes its moments into its own scope (a wrapped module shares
        # the collections of the apply call); False: they are collected in `moments`.
        self.store_in_layer = store_in_layer
        self.head_input = None          # input of the last nn.Dense called
        self.layer_output = None        # output of `feature_layer`
        self.moments: Dict[Tuple[str, ...], Tuple[jax.Array, jax.Array]] = {}
        self.seen = []                  # paths called, for the error on a wrong feature_layer

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        path = tuple(module.path[len(self.prefix):])
        x = _first_argument(args, kwargs)
        if self.capture_moments and isinstance(module, nn.BatchNorm):
            mean, var = bn_input_moments(module, x, self.axis_name)
            if self.store_in_layer:
                module.put_variable(BN_MOMENTS, "mean", mean)
                module.put_variable(BN_MOMENTS, "var", var)
            else:
                self.moments[path] = (mean, var)
        if isinstance(module, nn.Dense):
            self.head_input = x
        out = next_fun(*args, **kwargs)
        if path:
            self.seen.append("/".join(path))
        if self.feature_layer is not None and "/".join(path) == self.feature_layer:
            self.layer_output = out
        return out

    def feature(self, what: str):
        if self.feature_layer is not None:
            if self.layer_output is None:
                called = ", ".join(dict.fromkeys(self.seen))
                raise WrapError(f"feature_layer={self.feature_layer!r} was not called in {what}'s "
                                f"forward pass; its submodules: {called}")
            return pool_feature(self.layer_output)
        if self.head_input is None:
            raise WrapError(f"{what} calls no nn.Dense layer, so its penultimate feature is "
                            "unknown: give feature_layer='<submodule path>' or feature_fn")
        return pool_feature(self.head_input)

    def moments_tree(self) -> Dict[str, Any]:
        """{path...: {"mean", "var"}}, nested like `batch_stats`."""
        tree: Dict[str, Any] = {}
        for path, (mean, var) in self.moments.items():
            node = tree
            for segment in path:
                node = node.setdefault(segment, {})
            node["mean"], node["var"] = mean, var
        return tree


def _with_fields(module: nn.Module, **values) -> nn.Module:
    """`module` with those of `values` that it declares as fields (and that are set)."""
    declared = {f.name for f in dataclasses.fields(module)}
    chosen = {k: v for k, v in values.items() if k in declared and
              (v is not None or k == "axis_name")}
    return module.clone(**chosen) if chosen else module


class FlaxClassifier(nn.Module):
    """A user's `flax.linen` classifier under distillation's calling convention.

    Attributes:
      module: the user's classifier; called as `module(x, **{train_arg: train})`.
      feature_layer: path of the submodule whose output is the feature (see module docstring).
      feature_fn: `(bound module, x, train) -> (logits, feature)`; overrides feature_layer.
      train_arg: the name of the module's training-mode argument; None: it takes none.
      axis_name: the device axis for global BN-input moments (set by `for_run`).
    """

    module: nn.Module
    feature_layer: Optional[str] = None
    feature_fn: Optional[Callable[..., Any]] = None
    train_arg: Optional[str] = "train"
    axis_name: Optional[str] = None

    def setup(self):
        # The module's variables live at this wrapper's level: the user's own tree layout.
        nn.share_scope(self, self.module)

    def __call__(self, x, train: bool = False, features: bool = False):
        recorder = _Recorder(tuple(self.path), self.feature_layer,
                             self.is_mutable_collection(BN_MOMENTS) and not self.is_initializing(),
                             self.axis_name, store_in_layer=True)
        with nn.intercept_methods(recorder):
            if self.feature_fn is not None:
                logits, feature = self.feature_fn(self.module, x, train)
                feature = pool_feature(feature)
            else:
                kwargs = {self.train_arg: train} if self.train_arg else {}
                logits = self.module(x, **kwargs)
                feature = recorder.feature(type(self.module).__name__) if features else None
        return (logits, feature) if features else logits

    def for_run(self, axis_name: Optional[str] = None, dtype: Any = None) -> "FlaxClassifier":
        """This classifier as a run builds it: the device axis for the BN moments, and the axis
        and compute dtype for the user's module when it declares such fields."""
        return self.clone(module=_with_fields(self.module, axis_name=axis_name, dtype=dtype),
                          axis_name=axis_name)


VariableLayout = Tuple[Tuple[str, Tuple[str, ...], Tuple[int, ...], str], ...]


def variable_layout(variables: Dict[str, Any]) -> VariableLayout:
    """A hashable description (collection, path, shape, dtype) of every leaf."""
    out = []
    for collection in sorted(variables):
        if collection in _OUTPUT_COLLECTIONS:
            continue
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables[collection]):
            path = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)
            out.append((collection, path, tuple(np.shape(leaf)), str(jnp.asarray(leaf).dtype)))
    return tuple(out)


class ApplyFnClassifier(nn.Module):
    """A teacher given as a function `apply_fn(variables, x) -> logits or (logits, feature)`.

    The variables are declared here with the layout of the ones the function was given
    (`variable_layout`), so they pass through `apply` unchanged; `init` gives zeros (shape
    tracing only: a teacher is never trained). Features and BN moments as in `FlaxClassifier`.
    """

    apply_fn: Callable[..., Any]
    layout: VariableLayout
    feature_layer: Optional[str] = None
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        del train   # a bare function has no training mode: teacher use only
        variables = self._declared_variables()
        recorder = _Recorder((), self.feature_layer,
                             self.is_mutable_collection(BN_MOMENTS) and not self.is_initializing(),
                             self.axis_name, store_in_layer=False)
        with nn.intercept_methods(recorder):
            out = self.apply_fn(variables, x)
        logits, feature = out if isinstance(out, tuple) else (out, None)
        if features:
            feature = pool_feature(feature) if feature is not None else recorder.feature("apply_fn")
        moments = recorder.moments_tree()
        for name, subtree in moments.items():
            self.put_variable(BN_MOMENTS, name, subtree)
        return (logits, feature) if features else logits

    def _declared_variables(self) -> Dict[str, Any]:
        trees: Dict[str, Dict[str, Any]] = {}
        for collection, path, shape, dtype in self.layout:
            node = trees.setdefault(collection, {})
            for segment in path[:-1]:
                node = node.setdefault(segment, {})
            node[path[-1]] = (shape, dtype)
        zeros = lambda t: jax.tree.map(lambda sd: jnp.zeros(sd[0], sd[1]), t,
                                       is_leaf=lambda v: isinstance(v, tuple) and len(v) == 2
                                       and isinstance(v[1], str))
        variables = {}
        for collection, tree in trees.items():
            variables[collection] = {}
            for name, subtree in tree.items():
                if collection == "params":
                    value = self.param(name, lambda rng, t=subtree: zeros(t))
                else:
                    value = self.variable(collection, name, lambda t=subtree: zeros(t)).value
                variables[collection][name] = value
        return variables

    def for_run(self, axis_name: Optional[str] = None, dtype: Any = None) -> "ApplyFnClassifier":
        del dtype   # the function computes in its own dtype
        return self.clone(axis_name=axis_name)


Classifier = Any   # FlaxClassifier | ApplyFnClassifier


def wrap(network, variables: Optional[Dict[str, Any]] = None, *, feature_layer=None,
         feature_fn=None, train_arg: Optional[str] = "train") -> Classifier:
    """A Flax module or an apply function (which needs `variables`, for their layout) as a
    classifier distillation can call; an already wrapped one is returned as is."""
    if isinstance(network, (FlaxClassifier, ApplyFnClassifier)):
        return network
    if isinstance(network, nn.Module):
        return FlaxClassifier(network, feature_layer=feature_layer, feature_fn=feature_fn,
                              train_arg=train_arg)
    if callable(network):
        if variables is None:
            raise WrapError("an apply function needs its variables: wrap(apply_fn, variables)")
        if feature_fn is not None:
            raise WrapError("feature_fn is for modules; an apply function may return "
                            "(logits, feature) itself")
        return ApplyFnClassifier(network, variable_layout(variables), feature_layer=feature_layer)
    raise WrapError(f"expected a flax.linen Module or an apply function, got "
                    f"{type(network).__name__}")


def constructor(classifier: Classifier, num_classes: Optional[int] = None):
    """`(num_classes, axis_name=None, dtype=None) -> module` for `register_model` and
    `Teacher.builder`: the classifier as a run builds it (its class count is fixed; a request
    for another one is refused)."""

    def build(requested_classes: Optional[int] = None, axis_name: Optional[str] = None,
              dtype: Any = None):
        if num_classes is not None and requested_classes not in (None, num_classes):
            raise ValueError(f"this registered network has {num_classes} classes, not "
                             f"{requested_classes}")
        return classifier.for_run(axis_name, dtype)
    return build


def input_spec(input_shape) -> Tuple[int, int]:
    """(image_size, channels) of an NHWC input shape (H, W, C) with H == W."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or shape[0] != shape[1] or min(shape) < 1:
        raise WrapError(f"input_shape must be (height, width, channels) of square images "
                        f"(the generator makes square ones), got {tuple(input_shape)}")
    return shape[0], shape[2]


def check_classifier(classifier: Classifier, variables: Optional[Dict[str, Any]],
                     num_classes: int, input_shape, what: str = "the network",
                     need_moments: bool = False) -> int:
    """Traces `classifier` on one input (shapes only) and checks what distillation needs:
    logits [B, num_classes], a 2-D feature and, with `need_moments`, BN-input moments in the
    layout of `variables["batch_stats"]`. Returns the feature width."""
    size, channels = input_spec(input_shape)
    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    try:
        if variables is None:
            (logits, feature), _ = jax.eval_shape(
                lambda x: classifier.init_with_output(jax.random.PRNGKey(0), x, features=True), x)
        else:
            (logits, feature), cols = jax.eval_shape(
                lambda v, x: classifier.apply(v, x, train=False, features=True,
                                              mutable=[BN_MOMENTS]), variables, x)
    except WrapError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward pass
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WrapError(f"{what} cannot run on {size}x{size}x{channels} inputs with "
                        f"`train` and the given variables: {type(e).__name__}: {text[:300]}"
                        ) from e
    if logits.ndim != 2 or logits.shape[-1] != num_classes:
        raise WrapError(f"{what} returns logits of shape {logits.shape}; expected "
                        f"(batch, {num_classes})")
    if need_moments:
        stats = (variables or {}).get("batch_stats", {})
        moments = cols.get(BN_MOMENTS, {})
        if jax.tree.structure(moments) != jax.tree.structure(stats):
            have = sorted(jax.tree_util.keystr(k) for k, _ in
                          jax.tree_util.tree_leaves_with_path(moments))
            want = sorted(jax.tree_util.keystr(k) for k, _ in
                          jax.tree_util.tree_leaves_with_path(stats))
            missing = [k for k in want if k not in have]
            raise WrapError(
                f"{what}'s batch_stats hold {len(want)} entries but its forward pass reports the "
                f"input moments of {len(have)} (only flax.linen.BatchNorm layers and "
                f"cpsc_jax.models.BatchNorm are seen); not seen: {', '.join(missing[:6])}. Set "
                "config.loss.beta = 0 to distil without the BN-statistics term")
    return int(feature.shape[-1])
