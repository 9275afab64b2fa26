"""Teacher: resnet34 on svhn, released recipe (SGD 0.1, momentum 0.9, wd 5e-4, cosine,
crop with 4-pixel padding).

No flips (digits); fewer epochs, as usual for SVHN.

    python scripts/train_teacher.py --config configs/teachers/svhn_resnet34.py \
        --config.data.dir=/path/to/svhn --workdir workdirs/svhn_resnet34_teacher
"""
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    return default_teacher_config(
        arch="resnet34", data=dict(name="svhn"),
        mean=NORMALIZATION["svhn"][0], std=NORMALIZATION["svhn"][1],
        batch_size=128, epochs=50, lr=0.1, crop_padding=4, flip=False)
