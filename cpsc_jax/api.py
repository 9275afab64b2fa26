"""The Python API: a trained Flax classifier in, a distilled student out, no training data.

    import cpsc_jax
    out = cpsc_jax.distill(model, variables, num_classes=10, input_shape=(32, 32, 3),
                           mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
                           student="resnet18", eval_data=(test_images, test_labels))
    out.module, out.variables          # the student (out.module.apply(out.variables, x, ...))
    out.results["student_accuracy"], out.history

The teacher is any `flax.linen` classifier (or `apply_fn(variables, x)`), wrapped by
`cpsc_jax.teachers.flax_wrap`; the student is a registry name or another Flax module, which `distill`
registers under `student_name` so that the student checkpoint records it. The run itself is
`cpsc_jax.method.trainer.train_and_evaluate`: everything it writes lands in `workdir`.
"""
import contextlib
import dataclasses
import tempfile
from typing import Any, Callable, Dict, Optional, Tuple

import ml_collections
import numpy as np

from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax.teachers import flax_wrap
from cpsc_jax import models as models_lib
from cpsc_jax.config.validation import ConfigError
from cpsc_jax.teachers.teacher import Teacher

# The registry name a run's config gives an in-memory teacher (registered only while it runs).
TEACHER_NAME = "flax_teacher"
# Teachers with fewer BatchNorm layers get the small adversarial weight (docs/method.md §7).
FEW_BN_LAYERS = 8


@dataclasses.dataclass
class Distilled:
    """A distilled student and the run that made it."""

    module: Any                 # the student: the user's Flax module, or the registry network
    variables: Dict[str, Any]   # its {"params", "batch_stats"}, in the module's own layout
    network: Any                # the student as distillation calls it (features=, moments)
    arch: str                   # the registry name its checkpoint records
    mean: Tuple[float, ...]     # the input normalisation it expects (the teacher's)
    std: Tuple[float, ...]
    results: Dict[str, Any]     # WORKDIR/results.json
    config: ml_collections.ConfigDict
    workdir: str

    @property
    def history(self):
        """One entry per epoch: step, accuracies (when evaluated), faithfulness, time."""
        return self.results.get("history", [])

    @property
    def checkpoint(self) -> str:
        return self.results["student_checkpoint"]

    def predict(self, images, batch_size: int = 500) -> np.ndarray:
        """Predicted classes of un-normalised images (uint8, or float in [0, 1]; NHWC)."""
        from cpsc_jax.training.evaluation import predict_labels
        return predict_labels(self.network, self.variables, _as_uint8(images), self.mean,
                              self.std, batch_size)


def default_config(num_classes: int, input_shape, student: str = "resnet18",
                   teacher_bn_layers: Optional[int] = None,
                   preset: str = "") -> ml_collections.ConfigDict:
    """The config `distill` uses when given none, adapted to the classes and input shape.

    preset: "released" or "conditioned" (`config_defaults.PRESETS`) to override the choice
    below; empty keeps it (small inputs: the digits config's default; larger: released).

    - inputs of at most 16x16 pixels: the embedded digits settings (`configs/digits.py`: batch
      128, 8 epochs x 50 iterations, one generator step, small generator, alpha 0.1, log IKD),
      the only small-image setting the project has measured;
    - larger inputs: the released command (`config_defaults.distillation_config`: batch 512,
      600 epochs x 50 iterations, G 6, S 5, alpha 5, beta 1, gamma 0.7, eta 0.7) with MSE-form
      IKD (the released choice for every dataset but CIFAR-10); with a teacher of fewer than
      `FEW_BN_LAYERS` BatchNorm layers alpha is 0.1, as in configs/mnist.py, because the
      released alpha lets the adversarial game run away there (docs/method.md §7).
    The generator starts at 8x8 where the size allows (released) and doubles up to the input
    side. The released schedule is long (30,000 iterations): set `epochs` for a shorter run.
    """
    size, channels = flax_wrap.input_spec(input_shape)
    if size <= 16:
        from cpsc_jax.configs import digits
        c = digits.get_config()
        del c.teacher["training"]
        c.teacher.train_if_missing = False
        c.student.arch = student
    else:
        from cpsc_jax.config.defaults import distillation_config
        c = distillation_config("cifar100", teacher=TEACHER_NAME, student=student)
        c.loss.ikd_form = "mse"
        if teacher_bn_layers is not None and teacher_bn_layers < FEW_BN_LAYERS:
            c.loss.alpha = 0.1
    c.data.name = "custom"
    c.num_classes, c.image_size, c.channels = int(num_classes), size, channels
    c.teacher.arch = TEACHER_NAME
    c.generator.num_upsamples = generator_upsamples(size)
    if preset:
        from cpsc_jax.config.defaults import apply_preset
        apply_preset(c, preset)
    return c


def generator_upsamples(size: int) -> int:
    """How many x2 stages the generator needs to reach `size`: from 8x8 when `size` is 8 times
    a power of two (the released generator), else from the smallest side it can start at."""
    if size % 2:
        raise ConfigError(f"the generator makes images by doubling, so the input side must be "
                          f"even; got {size}")
    n = 0
    while size % (2 ** (n + 1)) == 0 and size // 2 ** (n + 1) >= 8:
        n += 1
    if n == 0:   # sides under 16: 8x8 digits start at 2x2, as configs/digits.py does
        while size % (2 ** (n + 1)) == 0 and n < 2:
            n += 1
    return n


def as_eval_split(data, num_classes: int, input_shape, name: str = "test") -> data_lib.Split:
    """(images, labels) -> a `data.Split`: images NHWC (or NHW for one channel), uint8 or float
    in [0, 1] (quantised to uint8, as stored images are), labels integers in [0, K)."""
    size, channels = flax_wrap.input_spec(input_shape)
    if isinstance(data, data_lib.Split):
        images, labels, name = data.images, data.labels, data.name
    else:
        try:
            images, labels = data
        except (TypeError, ValueError):
            raise ConfigError("eval_data must be (images, labels), a cpsc_jax.data.Split or a "
                              "dict of them") from None
    images = _as_uint8(images)
    if images.ndim == 3 and channels == 1:
        images = images[..., None]
    if images.shape[1:] != (size, size, channels):
        raise ConfigError(f"eval_data images have shape {images.shape[1:]}; the teacher takes "
                          f"{(size, size, channels)} (NHWC)")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"eval_data labels must be a 1-D integer array, got {labels.dtype} "
                          f"{labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"eval_data labels must be in [0, {num_classes}), got "
                          f"[{labels.min()}, {labels.max()}]")
    return data_lib.Split(images, labels.astype(np.int32), num_classes, name)


def _as_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ConfigError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ConfigError(f"float images must be un-normalised, in [0, 1]; these span "
                          f"[{lo:.3g}, {hi:.3g}] (mean/std are applied by the evaluation)")
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def _eval_sets(eval_data, num_classes, input_shape) -> Optional[Dict[str, data_lib.Split]]:
    if eval_data is None:
        return None
    if isinstance(eval_data, dict):
        return {k: as_eval_split(v, num_classes, input_shape, k) for k, v in eval_data.items()}
    return {"test": as_eval_split(eval_data, num_classes, input_shape)}


def _bn_layers(variables) -> int:
    import jax
    return len(jax.tree.leaves((variables or {}).get("batch_stats", {}))) // 2


@contextlib.contextmanager
def _registered(name: str, constructor: Callable[..., Any]):
    """`name` registered for the duration (the run's config names the teacher)."""
    previous = models_lib._REGISTERED.get(name)
    models_lib.register_model(name, constructor, replace=True)
    try:
        yield name
    finally:
        if previous is None:
            models_lib.unregister_model(name)
        else:
            models_lib.register_model(name, previous, replace=True)


def _student(student, student_name, num_classes, input_shape, train_arg):
    """(registry name, the module the user sees, the network as distillation calls it)."""
    if isinstance(student, str):
        if student not in models_lib.available_models():
            raise ConfigError(f"unknown student {student!r}; valid names: "
                              f"{', '.join(models_lib.available_models())}, or pass a Flax module")
        network = models_lib.get_model(student, num_classes)
        return student, network, network
    network = flax_wrap.wrap(student, train_arg=train_arg)
    if not isinstance(network, flax_wrap.FlaxClassifier):
        raise ConfigError("the student must be a registry name or a flax.linen Module (it is "
                          "trained, so an apply function will not do)")
    name = student_name or type(network.module).__name__
    if name in models_lib.BUILT_IN:
        raise ConfigError(f"the student's name {name!r} is a built-in architecture; pass "
                          "student_name='...'")
    flax_wrap.check_classifier(network, None, num_classes, input_shape, "the student")
    models_lib.register_model(name, flax_wrap.constructor(network, num_classes), replace=True)
    return name, network.module, network


def distill(teacher, teacher_variables: Optional[Dict[str, Any]] = None, *,
            num_classes: Optional[int] = None, input_shape=None, mean=None, std=None,
            student="resnet18", config: Optional[ml_collections.ConfigDict] = None,
            eval_data=None, workdir: Optional[str] = None, student_name: Optional[str] = None,
            feature_layer: Optional[str] = None, train_arg: Optional[str] = "train",
            log: Any = print) -> Distilled:
    """Distils `teacher` into a student without training data; returns a `Distilled`.
    `log` receives every progress line (False or None: silent).

    teacher: a `flax.linen` classifier (called `teacher(x, train=False)`, see `train_arg`), an
      `apply_fn(variables, x)`, a `cpsc_jax.teachers.flax_wrap.FlaxClassifier` (for `feature_layer` or
      `feature_fn` options) or a `cpsc_jax.teachers.teacher.Teacher` (then the four below are its own).
    teacher_variables: its variables ({"params", "batch_stats", ...}).
    num_classes, input_shape (H, W, C), mean, std: the classes, and the normalised input the
      teacher takes (mean/std: the normalisation it was trained with).
    student: a registry name (`cpsc_jax.models.available_models()`) or a Flax module, registered
      under `student_name` (default: its class name; an earlier registration of that name is
      replaced) so that its checkpoint loads again once the name is registered.
    config: a distillation config (see `default_config`, the default); its num_classes,
      image_size, channels, teacher.arch and student.arch are set here. Not modified.
    eval_data: None (data-free: nothing is evaluated), (images, labels) with images uint8 or
      float in [0, 1], a `data.Split`, or a dict {name: one of those} ("test" is the headline).
    workdir: where the run writes (checkpoints, metrics, samples, student); None: a fresh
      temporary directory, kept afterwards. Calling again with the same workdir resumes.
    feature_layer: the teacher's submodule whose output is its feature (default: the input of
      its last nn.Dense); train_arg: the name of both modules' training-mode argument.
    """
    if isinstance(teacher, Teacher):
        t = teacher
        num_classes = t.num_classes if num_classes is None else num_classes
        if input_shape is None:
            input_shape = (t.image_size, t.image_size, t.channels)
        if (num_classes, flax_wrap.input_spec(input_shape)) != (t.num_classes,
                                                                (t.image_size, t.channels)):
            raise ConfigError(f"the Teacher has {t.num_classes} classes and "
                              f"{t.image_size}x{t.image_size}x{t.channels} inputs; num_classes / "
                              "input_shape say otherwise")
        teacher_variables = t.variables
    elif num_classes is None or input_shape is None or mean is None or std is None:
        raise ConfigError("distill needs num_classes, input_shape, mean and std with a Flax "
                          "teacher (the normalised input it takes and its class count)")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if teacher_variables is None:
        raise ConfigError("teacher_variables are missing: pass the teacher's "
                          "{'params': ..., 'batch_stats': ...}")
    size, channels = flax_wrap.input_spec(input_shape)

    if config is None:
        config = default_config(num_classes, input_shape, teacher_bn_layers=_bn_layers(
            teacher_variables))
    config = ml_collections.ConfigDict(config.to_dict())   # the caller's stays untouched
    beta = config.loss.beta
    if beta > 0 and not _bn_layers(teacher_variables):
        raise ConfigError(
            f"the teacher has no BatchNorm layers (its variables hold no batch_stats), but "
            f"config.loss.beta={beta} weights the BN-statistics term, which matches the "
            "teacher's BN running statistics on generated images. Distil without it: "
            "config = cpsc_jax.default_config(num_classes, input_shape); config.loss.beta = 0.0")
    if not isinstance(teacher, Teacher):
        teacher = Teacher.from_flax(teacher, teacher_variables, num_classes=num_classes,
                                    input_shape=input_shape, mean=mean, std=std,
                                    feature_layer=feature_layer, train_arg=train_arg,
                                    check_bn_moments=beta > 0)
    arch, module, network = _student(student, student_name, num_classes, input_shape, train_arg)
    config.num_classes, config.image_size, config.channels = num_classes, size, channels
    config.student.arch = arch
    eval_sets = _eval_sets(eval_data, num_classes, input_shape)
    workdir = workdir or tempfile.mkdtemp(prefix="cpsc_jax_")

    from cpsc_jax.method.trainer import train_and_evaluate   # imported late: the heaviest module
    with contextlib.ExitStack() as stack:
        if teacher.arch is None:   # an in-memory network: the config names it while it runs
            build = teacher.build
            config.teacher.arch = stack.enter_context(_registered(
                TEACHER_NAME, lambda k=None, axis_name=None, dtype=None: build(axis_name, dtype)))
        else:
            config.teacher.arch = teacher.arch
        results = train_and_evaluate(config, workdir, teacher, log=log or (lambda *_: None),
                                     eval_sets=eval_sets)
    _, variables = ckpt_lib.load_model(results["student_checkpoint"])
    return Distilled(module, variables, network, arch, tuple(teacher.mean), tuple(teacher.std),
                     results, config, workdir)
