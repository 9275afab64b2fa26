"""Teacher: resnet34 on tiny_imagenet, released recipe (SGD 0.1, momentum 0.9, wd 5e-4, cosine,
crop with 4-pixel padding, flips).

64x64 images, ImageNet normalisation. data.dir: the tiny-imagenet-200 folder (JPEG decoding
needs Pillow) or a folder with train.npz/test.npz made by `python -m cpsc_jax.data.tiny_imagenet`.

    python scripts/train_teacher.py --config configs/teachers/tiny_imagenet_resnet34.py \
        --config.data.dir=/path/to/tiny_imagenet --workdir workdirs/tiny_imagenet_resnet34_teacher
"""
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    return default_teacher_config(
        arch="resnet34", data=dict(name="tiny_imagenet"),
        mean=NORMALIZATION["tiny_imagenet"][0], std=NORMALIZATION["tiny_imagenet"][1],
        batch_size=128, epochs=200, lr=0.1, crop_padding=4, flip=True)
