"""Embedded default: scikit-learn's 8x8 digits, no download, a few minutes on a laptop CPU.

The teacher (small_cnn, 3 BatchNorm layers) is trained on the digits train split when its
checkpoint is absent; distillation itself never reads a training image. Weights differ from the
released CIFAR command on purpose: with a 3-BN teacher the BN-statistics term has little grip and
the released alpha=5 log-IKD lets the adversarial game run away (spec section 7), so alpha is small.
"""
import ml_collections

from cpsc_jax.data import NORMALIZATION


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="digits", dir=""))
    c.num_classes = 10
    c.image_size = 8
    c.channels = 1

    c.teacher = ml_collections.ConfigDict()
    c.teacher.arch = "small_cnn"
    c.teacher.checkpoint = ""          # empty: WORKDIR/teacher
    c.teacher.train_if_missing = True
    c.teacher.training = ml_collections.ConfigDict(dict(
        arch="small_cnn", data=c.data, mean=NORMALIZATION["digits"][0],
        std=NORMALIZATION["digits"][1], batch_size=64, epochs=30, lr=0.05, momentum=0.9,
        weight_decay=5e-4, crop_padding=1, flip=False, seed=0))

    c.student = ml_collections.ConfigDict(dict(arch="small_cnn_half"))
    c.generator = ml_collections.ConfigDict(dict(nz=64, ngf=32, num_upsamples=2))

    c.batch_size = 128
    c.epochs = 8
    c.epoch_itrs = 50
    c.g_steps = 1
    c.s_steps = 5

    c.lr_student = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.warmup_epochs = 1
    c.lr_generator = 1e-3
    c.adam_b1 = 0.5
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.generator_optimizer = "reset"     # released: a new Adam every step; or "persistent"
    c.generator_schedule = "constant"   # for "persistent" only: "constant" or "cosine"

    c.loss = ml_collections.ConfigDict(dict(
        kd=1.0, alpha=0.1, beta=1.0, gamma=0.7, eta=0.7,
        ikd_form="log",                # "log" (released for CIFAR-10) or "mse"
        ce_form="double_softmax",      # released (softmax fed to CE) or "plain"
        temperature=0.07, base_temperature=0.07))

    c.mixed_precision = False
    c.scan_unroll = 0                   # 0 auto (unrolled on CPU, lax.scan on GPU/TPU), 1 scan, 2 unrolled
    c.eval_batch_size = 500
    c.log_every = 25
    c.sample_columns = 8
    return c
