"""Checks a run config before anything is built, with messages that say what would be right."""
from cpsc_jax.models import available_models


class ConfigError(ValueError):
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
           f"config.batch_size={config.batch_size} is not divisible by the {num_devices} local "
           f"devices; use a multiple of {num_devices}")
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
    loss = config.loss
    for field in ("kd", "alpha", "beta", "gamma", "eta"):
        _check(loss[field] >= 0, f"config.loss.{field} is a loss weight and must be >= 0 "
                                 f"(0 switches the term off), got {loss[field]!r}")
    _check(loss.ikd_form in ("log", "mse"), f"config.loss.ikd_form must be 'log' or 'mse', got {loss.ikd_form!r}")
    _check(loss.ce_form in ("double_softmax", "plain"),
           f"config.loss.ce_form must be 'double_softmax' (released) or 'plain', got {loss.ce_form!r}")
    _check(loss.temperature > 0 and loss.base_temperature > 0,
           "config.loss.temperature and base_temperature must be > 0")
    gen = config.generator
    _check(gen.nz >= 1 and gen.ngf >= 1 and gen.num_upsamples >= 1,
           "config.generator.nz, ngf and num_upsamples must be >= 1")
    _check(config.image_size % (2 ** gen.num_upsamples) == 0,
           f"config.image_size={config.image_size} must be divisible by 2**generator.num_upsamples="
           f"{2 ** gen.num_upsamples}")
    _check(config.scan_unroll in (0, 1, 2),
           f"config.scan_unroll must be 0 (auto), 1 (lax.scan) or 2 (unrolled), got {config.scan_unroll!r}")


def validate_teacher(config, spec) -> None:
    """The teacher checkpoint must match the run: classes, image size, channels."""
    _check(spec.num_classes == config.num_classes,
           f"class count mismatch: the teacher checkpoint has {spec.num_classes} classes but "
           f"config.num_classes={config.num_classes}")
    _check(spec.image_size == config.image_size and spec.channels == config.channels,
           f"the teacher expects {spec.image_size}x{spec.image_size}x{spec.channels} inputs but the "
           f"config says {config.image_size}x{config.image_size}x{config.channels}")
    if config.loss.beta > 0 and not spec.has_batchnorm():
        raise ConfigError(f"config.loss.beta={config.loss.beta} needs BatchNorm layers in the teacher, "
                          f"but {spec.arch!r} has none: use a BN variant (e.g. lenet5_bn) or set "
                          "--config.loss.beta=0")
    _check(spec.arch == config.teacher.arch,
           f"the teacher checkpoint is a {spec.arch!r} but config.teacher.arch={config.teacher.arch!r}")
