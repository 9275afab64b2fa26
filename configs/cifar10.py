"""CIFAR-10, ResNet-34 teacher -> ResNet-18 student, the released command's hyper-parameters
(spec section 5) with the CIFAR-10 log-form IKD.

    python scripts/train.py --config configs/cifar10.py --workdir W \
        --config.teacher.checkpoint=TEACHER_DIR --config.data.dir=PATH/cifar-10-batches-py
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(name="cifar10", dir=""))
    c.num_classes = 10
    c.image_size = 32
    c.channels = 3

    c.teacher = ml_collections.ConfigDict(dict(
        arch="resnet34", checkpoint="", train_if_missing=False))
    c.student = ml_collections.ConfigDict(dict(arch="resnet18"))
    c.generator = ml_collections.ConfigDict(dict(nz=256, ngf=64, num_upsamples=2))

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
    c.generator_optimizer = "reset"
    c.generator_schedule = "constant"

    c.loss = ml_collections.ConfigDict(dict(
        kd=1.0, alpha=5.0, beta=1.0, gamma=0.7, eta=0.7, ikd_form="log",
        ce_form="double_softmax", temperature=0.07, base_temperature=0.07))

    c.mixed_precision = False
    c.scan_unroll = 0
    c.eval_batch_size = 500
    c.log_every = 10
    c.sample_columns = 8
    return c
