"""Teacher: wrn_40_2 on cifar10, released recipe (SGD 0.1, momentum 0.9, wd 5e-4, cosine,
crop with 4-pixel padding, flips).

For the "cifar10-holdout" protocol (a copy without the official test set), add
    --config.data.protocol=holdout --config.data.extra_eval=/path/to/test_batch_first1017.npz
and label every number "cifar10-holdout".

    python scripts/train_teacher.py --config configs/teachers/cifar10_wrn40_2.py \
        --config.data.dir=/path/to/cifar10 --workdir workdirs/cifar10_wrn40_2_teacher
"""
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    return default_teacher_config(
        arch="wrn_40_2", data=dict(name="cifar10"),
        mean=NORMALIZATION["cifar10"][0], std=NORMALIZATION["cifar10"][1],
        batch_size=128, epochs=200, lr=0.1, crop_padding=4, flip=True)
