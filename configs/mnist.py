"""MNIST (resized to 32x32), LeNet-5 with BatchNorm teacher -> LeNet-5-half student, sized for a CPU.

The teacher has only 3 BatchNorm layers, so, as for the digits default (docs/method.md §7), the
adversarial IKD weight is small; MSE-form IKD as in the released code for non-CIFAR-10 data.

    python scripts/train.py --config configs/mnist.py --workdir W \
        --config.teacher.checkpoint=TEACHER_DIR --config.data.dir=PATH/mnist
"""
from cpsc_jax.config_defaults import apply_preset, distillation_config


def get_config(preset: str = "conditioned"):
    # "conditioned" at 30 epochs (~10 min on 2 cores) with the label's weight eta = 1.5 instead of
    # the preset's 2: the teacher sees the requested class in 95% of the images and the student
    # ends at 96.7 +- 1.1; eta = 2 gave 0.97 / 93.4 +- 2.4, eta = 1 0.93 / 96.2 +- 2.1, the
    # released iteration 0.23 / 62.9 +- 46.3 at 12 epochs (a dead student in one seed; 3 seeds
    # each, docs/RESULTS.md). `mnist:released` is the authors' iteration.
    c = distillation_config("mnist", teacher="lenet5_bn", student="lenet5_half")
    # A quarter-width generator: at ngf=64 the generator is ~95% of the FLOPs of an iteration and
    # a CPU manages ~0.1 it/s; MNIST digits need far less capacity.
    c.generator.ngf = 16
    c.batch_size = 128
    c.epochs = 30
    c.g_steps = 1
    c.warmup_epochs = 1
    c.loss.alpha = 0.1
    apply_preset(c, preset)
    if preset == "conditioned":
        c.loss.eta = 1.5
    return c
