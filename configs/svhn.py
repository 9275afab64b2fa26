"""SVHN (cropped digits, 32x32): ResNet-34 teacher -> ResNet-18 student, the released command
(spec section 5) with MSE-form IKD (released for every dataset but CIFAR-10). The teacher is
trained beforehand:

    python scripts/train_teacher.py --config configs/teachers/svhn_resnet34.py \
        --config.data.dir=/path/to/svhn --workdir workdirs/svhn
    python scripts/train.py --config configs/svhn.py --workdir workdirs/svhn \
        --config.data.dir=/path/to/svhn

data.dir: a folder with train_32x32.mat / test_32x32.mat; empty reads TFDS svhn_cropped.
"""
from cpsc_jax.config_defaults import distillation_config
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    c = distillation_config("svhn", teacher="resnet34", student="resnet18")
    c.teacher.training = default_teacher_config(
        arch="resnet34", mean=NORMALIZATION["svhn"][0], std=NORMALIZATION["svhn"][1],
        batch_size=128, epochs=50, lr=0.1, crop_padding=4, flip=False)
    c.teacher.training.data = c.data
    return c
