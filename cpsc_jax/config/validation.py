"""Checks a run config before anything is built, with messages that say what would be right."""
import math

from cpsc_jax.errors import UserError
from cpsc_jax.models import available_models

# The choices of the string-valued fields that the method implements (losses.py, replay.py).
CE_FORMS = ("double_softmax", "plain", "disagreeing")
STUDENT_DATA = ("fresh", "replay", "fresh+replay")


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field, the value and what is allowed."""


def _check(cond: bool, message: str):
    if not cond:
        raise ConfigError(message)


def validate_config(config, num_devices: int = 1) -> None:
    models = available_models()
    for field in ("teacher", "student"):
        arch = config[field].arch
        _check(arch in models, f"config.{field}.arch: unknown model {arch!r}; valid names: {', '.join(models)}")
    _check(isinstance(config.num_classes, int) and config.num_classes >= 2,
           f"config.num_classes must be an integer >= 2, got {config.num_classes!r}")
    for field in ("batch_size", "epochs", "epoch_itrs", "g_steps", "s_steps", "image_size",
                  "channels", "eval_batch_size", "log_every", "sample_columns"):
        value = config[field]
        _check(isinstance(value, int) and value >= 1,
               f"config.{field} must be an integer >= 1, got {value!r}")
    _check(config.batch_size % num_devices == 0,
           f"config.batch_size={config.batch_size} is not divisible by the {num_devices} devices "
           f"(all processes); use a multiple of {num_devices}")
    _check(config.warmup_epochs >= 0 and config.warmup_epochs <= config.epochs,
           f"config.warmup_epochs must be in [0, epochs={config.epochs}], got {config.warmup_epochs!r}")
    for field in ("lr_student", "lr_generator"):
        _check(config[field] > 0, f"config.{field} must be > 0, got {config[field]!r}")
    _check(0 <= config.momentum < 1, f"config.momentum must be in [0, 1), got {config.momentum!r}")
    _check(config.weight_decay >= 0, f"config.weight_decay must be >= 0, got {config.weight_decay!r}")
    for field in ("adam_b1", "adam_b2"):
        _check(0 <= config[field] < 1, f"config.{field} must be in [0, 1), got {config[field]!r}")
    _check(config.adam_eps > 0, f"config.adam_eps must be > 0, got {config.adam_eps!r}")
    _check(config.generator_optimizer in ("reset", "persistent"),
           f"config.generator_optimizer must be 'reset' (released) or 'persistent', got {config.generator_optimizer!r}")
    _check(config.generator_schedule in ("constant", "cosine"),
           f"config.generator_schedule must be 'constant' or 'cosine', got {config.generator_schedule!r}")
    _check(config.student_schedule in ("per_epoch", "per_step"),
           f"config.student_schedule must be 'per_epoch' (released) or 'per_step', got {config.student_schedule!r}")
    _check(config.adapter_optimizer in ("frozen", "sgd"),
           f"config.adapter_optimizer must be 'frozen' (released) or 'sgd', got {config.adapter_optimizer!r}")
    _check(config.student_data in STUDENT_DATA,
           f"config.student_data must be 'fresh' (released), 'replay' or 'fresh+replay', got "
           f"{config.student_data!r}")
    _check(isinstance(config.replay_size, int) and not isinstance(config.replay_size, bool)
           and config.replay_size >= 0,
           f"config.replay_size must be 0 (one epoch of generator output) or a positive number "
           f"of images, got {config.replay_size!r}")
    _check(isinstance(config.replay_batch, int) and not isinstance(config.replay_batch, bool)
           and config.replay_batch >= 0 and config.replay_batch % num_devices == 0,
           f"config.replay_batch must be 0 (batch_size) or a positive multiple of the device "
           f"count {num_devices}, got {config.replay_batch!r}")
    _check(config.student_grad_clip >= 0,
           f"config.student_grad_clip must be >= 0 (0: no clipping), got {config.student_grad_clip!r}")
    _check(isinstance(config.generator_reinit_every, int)
           and not isinstance(config.generator_reinit_every, bool)
           and config.generator_reinit_every >= 0,
           f"config.generator_reinit_every must be an integer >= 0 (epochs; 0: never), got "
           f"{config.generator_reinit_every!r}")
    _check(config.checkpoint_every_minutes >= 0,
           f"config.checkpoint_every_minutes must be >= 0 (0: at epoch ends only), got "
           f"{config.checkpoint_every_minutes!r}")
    aug = config.student_augment
    _check(isinstance(aug.crop_padding, int) and not isinstance(aug.crop_padding, bool)
           and 0 <= aug.crop_padding <= config.image_size,
           f"config.student_augment.crop_padding must be an integer in [0, image_size="
           f"{config.image_size}], got {aug.crop_padding!r}")
    _check(isinstance(aug.flip, bool),
           f"config.student_augment.flip must be True or False, got {aug.flip!r}")
    _check(aug.mixup >= 0, f"config.student_augment.mixup must be >= 0 (Beta(a, a)'s a; 0: no "
           f"mixup), got {aug.mixup!r}")
    loss = config.loss
    _check(loss.student_kd_temperature > 0, "config.loss.student_kd_temperature must be > 0 "
           f"(1: the released KD), got {loss.student_kd_temperature!r}")
    for field in ("kd", "alpha", "beta", "gamma", "eta", "student_eta", "student_ikd_scale"):
        _check(loss[field] >= 0, f"config.loss.{field} is a loss weight and must be >= 0 "
                                 f"(0 switches the term off), got {loss[field]!r}")
    _check(loss.ikd_form in ("log", "mse"), f"config.loss.ikd_form must be 'log' or 'mse', got {loss.ikd_form!r}")
    for field in ("ce_form", "student_ce_form"):
        _check(loss[field] in CE_FORMS,
               f"config.loss.{field} must be one of {', '.join(CE_FORMS)} (released: "
               f"double_softmax), got {loss[field]!r}")
    _check(loss.temperature > 0 and loss.base_temperature > 0,
           "config.loss.temperature and base_temperature must be > 0")
    gen = config.generator
    _check(gen.nz >= 1 and gen.ngf >= 1 and gen.num_upsamples >= 1,
           "config.generator.nz, ngf and num_upsamples must be >= 1")
    _check(config.image_size % (2 ** gen.num_upsamples) == 0,
           f"config.image_size={config.image_size} must be divisible by 2**generator.num_upsamples="
           f"{2 ** gen.num_upsamples}")
    from cpsc_jax.data import check_protocol
    check_protocol(config.data.name, config.data.protocol)
    _check(config.scan_unroll in (0, 1, 2),
           f"config.scan_unroll must be 0 (auto), 1 (lax.scan) or 2 (unrolled), got {config.scan_unroll!r}")
    _check(config.conv_gradients in ("auto", "stock", "custom"),
           f"config.conv_gradients must be 'auto', 'stock' or 'custom', got {config.conv_gradients!r}")
    _check(config.bn_sync in ("global", "local"),
           f"config.bn_sync must be 'global' or 'local', got {config.bn_sync!r}")
    profile_steps = config.get("profile_steps", 0)
    _check(isinstance(profile_steps, int) and not isinstance(profile_steps, bool)
           and profile_steps >= 0,
           f"config.profile_steps must be an integer >= 0 (0: no profile), got {profile_steps!r}")


def validate_teacher(config, teacher) -> None:
    """The teacher (a `cpsc_jax.teachers.teacher.Teacher`) must match the run: classes, input size and
    channels, BatchNorm when the BN-statistics term is on, finite weights."""
    _check(teacher.num_classes == config.num_classes,
           f"class count mismatch: the teacher has {teacher.num_classes} classes but "
           f"config.num_classes={config.num_classes}")
    _check(teacher.image_size == config.image_size and teacher.channels == config.channels,
           f"the teacher expects {teacher.image_size}x{teacher.image_size}x{teacher.channels} "
           f"inputs but the config says {config.image_size}x{config.image_size}x{config.channels}")
    if config.loss.beta > 0 and not teacher.has_batchnorm():
        raise ConfigError(f"config.loss.beta={config.loss.beta} needs BatchNorm layers in the "
                          f"teacher, but {teacher.name!r} has none: use a BN variant (e.g. "
                          "lenet5_bn) or set --config.loss.beta=0")
    if teacher.arch is not None:
        _check(teacher.arch == config.teacher.arch,
               f"the teacher checkpoint is a {teacher.arch!r} but config.teacher.arch="
               f"{config.teacher.arch!r}; set --config.teacher.arch={teacher.arch}")
    import jax
    import numpy as np
    finite = all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(teacher.variables))
    _check(finite, f"the teacher ({teacher.path or teacher.name}) has non-finite (NaN/inf) "
                   "weights: train or convert it again")
    check_input_size(config.student.arch, config.num_classes, config.image_size, config.channels)


def check_input_size(arch: str, num_classes: int, image_size: int, channels: int) -> None:
    """Refuses a network too deep for the input size, naming the smallest size it takes (the
    initialisers would otherwise fail inside with e.g. a ZeroDivisionError)."""
    from cpsc_jax.models import min_input_size
    smallest = min_input_size(arch, num_classes, channels)
    _check(image_size >= smallest,
           f"{arch} needs inputs of at least {smallest}x{smallest} pixels; this data is "
           f"{image_size}x{image_size} (choose a smaller network, e.g. small_cnn for 8x8 digits)")


def validate_teacher_config(config, spec, num_train: int, topology) -> None:
    """A teacher-training config against its data and devices (cpsc_jax.teachers.training)."""
    models = available_models()
    _check(config.arch in models,
           f"config.arch: unknown model {config.arch!r}; valid names: {', '.join(models)}")
    for field in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
        value = config[field]
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               f"config.{field} must be an integer >= 1, got {value!r}")
    _check(config.batch_size % topology.num_devices == 0,
           f"config.batch_size={config.batch_size} is not divisible by the "
           f"{topology.describe()}; use a multiple of {topology.num_devices}")
    _check(config.batch_size <= num_train,
           f"config.batch_size={config.batch_size} exceeds the {num_train} training images; use "
           f"at most {num_train}")
    _check(_finite(config.lr) and config.lr > 0,
           f"config.lr must be a number > 0, got {config.lr!r}")
    _check(_finite(config.momentum) and 0 <= config.momentum < 1,
           f"config.momentum must be in [0, 1), got {config.momentum!r}")
    _check(_finite(config.weight_decay) and config.weight_decay >= 0,
           f"config.weight_decay must be >= 0, got {config.weight_decay!r}")
    _check(isinstance(config.crop_padding, int) and 0 <= config.crop_padding <= spec.image_size,
           f"config.crop_padding must be an integer in [0, {spec.image_size}], got "
           f"{config.crop_padding!r}")
    _check(isinstance(config.steps_per_call, int) and config.steps_per_call >= 0,
           f"config.steps_per_call must be an integer >= 0 (0: automatic), got "
           f"{config.steps_per_call!r}")
    _check(len(spec.mean) == spec.channels and len(spec.std) == spec.channels,
           f"config.mean/std have {len(spec.mean)}/{len(spec.std)} values; the "
           f"{config.data.name} images have {spec.channels} channel(s)")
    _check(all(_finite(s) and s > 0 for s in spec.std), f"config.std must be > 0, got {spec.std}")
    check_input_size(spec.arch, spec.num_classes, spec.image_size, spec.channels)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
