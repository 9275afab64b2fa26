"""MNIST (resized to 32x32), LeNet-5 with BatchNorm teacher -> LeNet-5-half student, sized for a CPU.

The teacher has only 3 BatchNorm layers, so, as for the digits default (spec section 7), the
adversarial IKD weight is small; MSE-form IKD as in the released code for non-CIFAR-10 data.

    python scripts/train.py --config configs/mnist.py --workdir W \
        --config.teacher.checkpoint=TEACHER_DIR --config.data.dir=PATH/mnist
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="mnist", dir=""))
    c.num_classes = 10
    c.image_size = 32
    c.channels = 1

    c.teacher = ml_collections.ConfigDict(dict(
        arch="lenet5_bn", checkpoint="", train_if_missing=False))
    c.student = ml_collections.ConfigDict(dict(arch="lenet5_half"))
    # A quarter-width generator: at ngf=64 the generator is ~95% of the FLOPs of an iteration and
    # a CPU manages ~0.1 it/s; MNIST digits need far less capacity.
    c.generator = ml_collections.ConfigDict(dict(nz=256, ngf=16, num_upsamples=2))

    c.batch_size = 128
    c.epochs = 12
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
    c.generator_optimizer = "reset"
    c.generator_schedule = "constant"

    c.loss = ml_collections.ConfigDict(dict(
        kd=1.0, alpha=0.1, beta=1.0, gamma=0.7, eta=0.7, ikd_form="mse",
        ce_form="double_softmax", temperature=0.07, base_temperature=0.07))

    c.mixed_precision = False
    c.scan_unroll = 0
    c.eval_batch_size = 500
    c.log_every = 10
    c.sample_columns = 8
    return c
