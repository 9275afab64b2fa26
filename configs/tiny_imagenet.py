"""Tiny-ImageNet-200 (64x64, ImageNet normalisation): ResNet-34 teacher -> ResNet-18 student.

Weights and schedule are those of the released command (spec section 5: alpha 5, beta 1,
gamma 0.7, eta 0.7; batch 512, 600 epochs of 50 iterations, G_steps 6, S_steps 5). The released
code uses the MSE form of the logit distance for every dataset but CIFAR-10, hence ikd_form="mse".
The teacher is trained beforehand (train_if_missing=False):

    python scripts/train_teacher.py --config configs/teachers/tiny_imagenet_resnet34.py \
        --config.data.dir=/path/to/tiny-imagenet-200 --workdir workdirs/tiny_imagenet

data.dir: the tiny-imagenet-200 folder (JPEG decoding needs Pillow) or a folder with
train.npz/test.npz (`python -m cpsc_jax.data.tiny_imagenet SRC DST` makes them once); there is
no TFDS source. The generator upsamples 8 -> 64 with three nearest-upsample + conv stages (the
released code's 64x64 generator uses transposed convs, slow in XLA; spec section 2). The CIFAR
ResNets work unchanged at 64x64 (global average pooling).
"""
import ml_collections

from cpsc_jax.data import NORMALIZATION
from cpsc_jax.teacher_training import default_teacher_config


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="tiny_imagenet", dir="", protocol="standard",
                                            extra_eval="", tfds_dir=""))
    c.num_classes = 200
    c.image_size = 64
    c.channels = 3

    c.teacher = ml_collections.ConfigDict()
    c.teacher.arch = "resnet34"
    c.teacher.checkpoint = ""          # empty: WORKDIR/teacher
    c.teacher.train_if_missing = False
    c.teacher.training = default_teacher_config(
        arch="resnet34", mean=NORMALIZATION["tiny_imagenet"][0],
        std=NORMALIZATION["tiny_imagenet"][1], batch_size=128, epochs=200, lr=0.1,
        crop_padding=4, flip=True)
    c.teacher.training.data = c.data

    c.student = ml_collections.ConfigDict(dict(arch="resnet18"))
    c.generator = ml_collections.ConfigDict(dict(nz=256, ngf=64, num_upsamples=3))

    c.batch_size = 512
    c.epochs = 600
    c.epoch_itrs = 50
    c.g_steps = 6
    c.s_steps = 5

    c.lr_student = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.warmup_epochs = 10
    c.lr_generator = 1e-3
    c.adam_b1 = 0.5
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.generator_optimizer = "reset"     # released: a new Adam every step; or "persistent"
    c.generator_schedule = "constant"   # for "persistent" only: "constant" or "cosine"

    c.loss = ml_collections.ConfigDict(dict(
        kd=1.0, alpha=5.0, beta=1.0, gamma=0.7, eta=0.7,
        ikd_form="mse",                # released: "log" for CIFAR-10 only, "mse" otherwise
        ce_form="double_softmax",      # released (softmax fed to CE) or "plain"
        temperature=0.07, base_temperature=0.07))

    c.mixed_precision = False
    c.eval_batch_size = 500
    c.log_every = 25
    c.sample_columns = 8
    return c
