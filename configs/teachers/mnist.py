"""LeNet-5 with BatchNorm on MNIST resized to 32x32 (the DAFL/DFAD teacher setting).

BatchNorm after each conv is a project addition (spec section 2): the BN-statistics loss needs
BN layers in the teacher. No flips (digits are not mirror-symmetric); 2-pixel random crops.
data.dir: a folder with the MNIST IDX files; empty reads TFDS (see cpsc_jax/data/tfds_source.py).

    python scripts/train_teacher.py --config configs/teachers/mnist.py \
        --config.data.dir=/path/to/mnist --workdir workdirs/mnist_teacher
"""
from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    return default_teacher_config(
        arch="lenet5_bn", data=dict(name="mnist"),
        mean=NORMALIZATION["mnist"][0], std=NORMALIZATION["mnist"][1],
        batch_size=128, epochs=6, lr=0.05, crop_padding=2, flip=False, log_every_s=20.0)
