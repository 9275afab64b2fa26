"""Tiny-ImageNet-200 (64x64, ImageNet normalisation): ResNet-34 teacher -> ResNet-18 student, the
released command (spec section 5) with MSE-form IKD. The teacher is trained beforehand:

    python scripts/train_teacher.py --config configs/teachers/tiny_imagenet_resnet34.py \
        --config.data.dir=/path/to/tiny-imagenet-200 --workdir workdirs/tiny_imagenet
    python scripts/train.py --config configs/tiny_imagenet.py --workdir workdirs/tiny_imagenet \
        --config.data.dir=/path/to/tiny-imagenet-200

data.dir: the tiny-imagenet-200 folder (JPEG decoding needs Pillow) or a folder with
train.npz/test.npz (`python -m cpsc_jax.data.tiny_imagenet SRC DST` makes them once); there is
no TFDS source. The generator upsamples 8 -> 64 with three nearest-upsample + conv stages (the
released code's 64x64 generator uses transposed convs, slow in XLA; spec section 2). The CIFAR
ResNets work unchanged at 64x64 (global average pooling).
"""
from cpsc_jax.config_defaults import distillation_config
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    c = distillation_config("tiny_imagenet", teacher="resnet34", student="resnet18")
    c.generator.num_upsamples = 3
    c.teacher.training = default_teacher_config(
        arch="resnet34", mean=NORMALIZATION["tiny_imagenet"][0],
        std=NORMALIZATION["tiny_imagenet"][1], batch_size=128, epochs=200, lr=0.1,
        crop_padding=4, flip=True)
    c.teacher.training.data = c.data
    return c
