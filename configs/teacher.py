"""Teacher training, one config for every dataset and architecture: the released recipe (SGD 0.1,
momentum 0.9, weight decay 5e-4, cosine, 4-pixel crops, flips) where the literature uses it,
smaller recipes for digits and MNIST (cpsc_jax.config.defaults.TEACHER_RECIPES). The argument
after the colon is "DATASET[,ARCH]" (default architecture per dataset):

    python scripts/train_teacher.py --config configs/teacher.py:mnist \
        --config.data.dir=/path/to/mnist --workdir workdirs/mnist_teacher
    python scripts/train_teacher.py --config configs/teacher.py:cifar10,wrn_40_2 \
        --config.data.dir=/path/to/cifar-10-batches-py --workdir workdirs/c10_wrn40_2 \
        --config.data.protocol=holdout --config.data.extra_eval=/path/to/test_batch_first1017.npz

Datasets: digits (small_cnn), mnist (lenet5_bn: LeNet-5 with a BN after each conv, since the
BN-statistics loss needs BN layers), cifar10, cifar100, svhn, tiny_imagenet (resnet34).
"""
from cpsc_jax.config.defaults import teacher_config


def get_config(arg: str = "cifar10,resnet34"):
    dataset, _, arch = arg.partition(",")
    return teacher_config(dataset.strip(), arch.strip())
