"""Teacher: wrn_40_2 on cifar100, released recipe (SGD 0.1, momentum 0.9, wd 5e-4, cosine,
crop with 4-pixel padding, flips).

    python scripts/train_teacher.py --config configs/teachers/cifar100_wrn40_2.py \
        --config.data.dir=/path/to/cifar100 --workdir workdirs/cifar100_wrn40_2_teacher
"""
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    return default_teacher_config(
        arch="wrn_40_2", data=dict(name="cifar100"),
        mean=NORMALIZATION["cifar100"][0], std=NORMALIZATION["cifar100"][1],
        batch_size=128, epochs=200, lr=0.1, crop_padding=4, flip=True)
