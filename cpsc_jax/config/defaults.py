"""Config defaults: a distillation run with the released command's values (docs/method.md §5),
and a teacher-training run with the released recipe per dataset.

Every `configs/*.py` starts from `distillation_config(...)` and changes only what differs, so
every config has every field (command-line overrides such as `--config.data.protocol=holdout`
need the field to exist) and the released values are written once.

Every field is described in docs/CONFIG.md.
"""
import ml_collections

from cpsc_jax.data import dataset_info

# Teacher recipes per dataset: the released one (SGD 0.1, momentum 0.9, weight decay 5e-4,
# cosine, crops after 4-pixel padding, flips) where the literature uses it; smaller settings
# for the digit datasets (no flips: digits are not mirror-symmetric).
TEACHER_RECIPES = {
    "digits": dict(arch="small_cnn", batch_size=64, epochs=30, lr=0.05, crop_padding=1, flip=False),
    "mnist": dict(arch="lenet5_bn", batch_size=128, epochs=6, lr=0.05, crop_padding=2, flip=False),
    "cifar10": dict(arch="resnet34", batch_size=128, epochs=200, lr=0.1, crop_padding=4, flip=True),
    "cifar100": dict(arch="resnet34", batch_size=128, epochs=200, lr=0.1, crop_padding=4, flip=True),
    "svhn": dict(arch="resnet34", batch_size=128, epochs=50, lr=0.1, crop_padding=4, flip=False),
    "tiny_imagenet": dict(arch="resnet34", batch_size=128, epochs=200, lr=0.1, crop_padding=4,
                          flip=True),
}


# The behaviours a shipped config can take (`--config NAME:released`, `NAME:conditioned`,
# `NAME:improved`;
# each config says which is its default and why). "released" is the authors' code exactly
# (docs/method.md §4, oddities included; tests/test_parity.py holds it). "conditioned" is what
# makes the generator honour its label (docs/conditioning.md). Keys are dotted config fields;
# "=loss.eta" copies another field.
PRESETS = {
    "released": {
        "generator_optimizer": "reset", "generator_schedule": "constant",
        "student_schedule": "per_epoch", "adapter_optimizer": "frozen",
        "loss.ce_form": "double_softmax", "loss.student_ce_form": "double_softmax",
        "loss.student_eta": "=loss.eta", "loss.student_ikd_scale": 1.0,
        "loss.student_kd_temperature": 1.0,
        "student_data": "fresh", "student_augment.crop_padding": 0, "student_augment.flip": False,
        "student_augment.mixup": 0.0, "student_grad_clip": 0.0, "generator_reinit_every": 0,
    },
    # Measured on digits and MNIST (docs/conditioning.md, docs/RESULTS.md).
    "conditioned": {
        "loss.ce_form": "plain", "loss.eta": 2.0,     # a non-saturating CE that steers the CBNs
        "loss.student_eta": 0.0,                      # the student learns from the teacher's logits
        "generator_optimizer": "persistent",          # Adam moments kept: magnitudes, not sign votes
        "student_schedule": "per_step",               # warm-up from 0, cosine to 0 at the last step
        "adapter_optimizer": "sgd",                   # a trained adapter, not a random projection
    },
    # "conditioned" plus what the student-phase ablations support (docs/RESULTS.md, issue 24).
    "improved": {
        "=preset": "conditioned",
        "student_grad_clip": 1.0,                     # no dead student from one outsized step
        "student_data": "fresh+replay",               # every image seen again from a pool
        "replay_size": 65536, "replay_batch": 0,
    },
}


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """`config` with the fields of PRESETS[preset] set (in place; returned for chaining)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    for key, value in PRESETS[preset].items():
        if key == "=preset":   # built on another preset, applied first
            apply_preset(config, value)
            continue
        if isinstance(value, str) and value.startswith("="):
            value = get_field(config, value[1:])
        parent, _, leaf = key.rpartition(".")
        get_field(config, parent)[leaf] = value
    return config


def get_field(config, dotted: str):
    """config["a"]["b"] for "a.b" (the config itself for ""); KeyError if a part is missing."""
    for part in filter(None, dotted.split(".")):
        config = config[part]
    return config


def data_config(dataset: str) -> ml_collections.ConfigDict:
    """The `data` block of every run config (see cpsc_jax.data)."""
    dataset_info(dataset)
    return ml_collections.ConfigDict(dict(name=dataset, dir="", protocol="standard",
                                          extra_eval="", tfds_dir=""))


def teacher_config(dataset: str, arch: str = "", **overrides) -> ml_collections.ConfigDict:
    """A teacher-training run (cpsc_jax.teachers.training) on `dataset`'s train split.

    Fields: arch, data (see data_config), mean/std (the dataset's normalisation), batch_size
    (global), epochs, lr, momentum, weight_decay, crop_padding (random crop after zero
    padding; 0: none), flip, seed, eval_every (epochs), eval_batch_size, steps_per_call (train
    steps per device call; 0: auto), log_every_s, checkpoint_min_interval_s (tiny runs do not
    save after every epoch), checkpoint_every_minutes (mid-epoch saves; 0: none).
    """
    info = dataset_info(dataset)
    recipe = TEACHER_RECIPES[dataset]
    c = ml_collections.ConfigDict()
    c.arch = arch or recipe["arch"]
    c.data = data_config(dataset)
    c.mean, c.std = tuple(info.mean), tuple(info.std)
    c.batch_size = recipe["batch_size"]
    c.epochs = recipe["epochs"]
    c.lr = recipe["lr"]
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.crop_padding = recipe["crop_padding"]
    c.flip = recipe["flip"]
    c.seed = 0
    c.eval_every = 1
    c.eval_batch_size = 500
    c.steps_per_call = 0
    c.log_every_s = 30.0
    c.checkpoint_min_interval_s = 10.0
    c.checkpoint_every_minutes = 0.0   # also save mid-epoch this often (0: never)
    for k, v in overrides.items():
        c[k] = v
    return c


def distillation_config(dataset: str, teacher: str = "resnet34",
                        student: str = "resnet18") -> ml_collections.ConfigDict:
    info = dataset_info(dataset)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config(dataset)
    c.num_classes = info.num_classes
    c.image_size = info.image_size
    c.channels = info.channels

    c.teacher = ml_collections.ConfigDict(dict(arch=teacher, checkpoint="",
                                               train_if_missing=False))
    c.student = ml_collections.ConfigDict(dict(arch=student))
    c.generator = ml_collections.ConfigDict(dict(nz=256, ngf=64, num_upsamples=2))

    c.batch_size = 512
    c.epochs = 600
    c.epoch_itrs = 50
    c.g_steps = 6
    c.s_steps = 5

    c.lr_student = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.warmup_epochs = 10
    c.student_schedule = "per_epoch"
    c.lr_generator = 1e-3
    c.adam_b1 = 0.5
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.generator_optimizer = "reset"
    c.generator_schedule = "constant"
    c.adapter_optimizer = "frozen"
    c.student_data = "fresh"
    c.replay_size = 0
    c.replay_batch = 0
    c.student_augment = ml_collections.ConfigDict(dict(crop_padding=0, flip=False, mixup=0.0))
    c.student_grad_clip = 0.0
    c.generator_reinit_every = 0

    c.loss = ml_collections.ConfigDict(dict(
        kd=1.0, alpha=5.0, beta=1.0, gamma=0.7, eta=0.7, student_eta=0.7, student_ikd_scale=1.0,
        student_kd_temperature=1.0,
        ikd_form="log" if dataset == "cifar10" else "mse",
        ce_form="double_softmax", student_ce_form="double_softmax",
        temperature=0.07, base_temperature=0.07))

    c.mixed_precision = False
    c.scan_unroll = 0
    c.conv_gradients = "auto"
    c.bn_sync = "global"
    c.eval_batch_size = 500
    c.log_every = 10
    c.checkpoint_every_minutes = 0.0   # also save mid-epoch this often (0: at epoch ends only)
    c.sample_columns = 8
    c.log_conditioning = False
    c.profile_steps = 0
    return c
