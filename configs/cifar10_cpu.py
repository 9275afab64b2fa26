"""CIFAR-10 at CPU scale: a public ResNet-20 teacher -> WRN-16-1, about 30 minutes on 2 cores
whichever preset.

The nearest thing to the method's GPU runs that a laptop can do: the released iteration on a
small teacher (`../shared/teachers`, converted with cpsc-convert-teacher) and a small student,
evaluated on the first 1,017 CIFAR-10 test images (a single .npz as data.dir serves as the test
split; distillation reads no training image).

    cpsc-convert-teacher --arch resnet20 --num-classes 10 --input cifar10_resnet20.th \\
        --output teachers/cifar10_resnet20 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    cpsc-train --config cifar10_cpu --workdir W --config.teacher.checkpoint=teachers/cifar10_resnet20 \\
        --config.data.dir=PATH/test_batch_first1017.npz
"""
from cpsc_jax.config.defaults import apply_preset, distillation_config


# Epochs that fill about 30 minutes of a quiet 2-core CPU with each preset's iteration (the
# replayed half-batch of `improved` doubles the student's work): docs/RESULTS.md, "CIFAR-10 at
# CPU scale".
EPOCHS_IN_30_MINUTES = {"released": 25, "conditioned": 22, "improved": 13}


def get_config(preset: str = "released"):
    c = distillation_config("cifar10", teacher="resnet20", student="wrn_16_1")
    c.batch_size = 64
    c.g_steps = 1
    c.s_steps = 5
    c.generator.ngf = 32
    c.warmup_epochs = 1
    apply_preset(c, preset)
    c.epochs = EPOCHS_IN_30_MINUTES[preset]
    return c
