"""CIFAR-10, ResNet-34 teacher -> ResNet-18 student: the released command (docs/method.md §5) with
the CIFAR-10 log-form IKD.

    python scripts/train.py --config configs/cifar10.py --workdir W \
        --config.teacher.checkpoint=TEACHER_DIR --config.data.dir=PATH/cifar-10-batches-py

With a copy lacking the official test set ("cifar10-holdout": teacher trained on data_batch_1..4),
add `--config.data.protocol=holdout --config.data.extra_eval=PATH/test_batch_first1017.npz`:
the student is then evaluated on data_batch_5 and on the extra set, and results.json says
"protocol": "cifar10-holdout".
"""
from cpsc_jax.config.defaults import apply_preset, distillation_config


def get_config(preset: str = "released"):
    # "released" by default: no run at this scale has shown that "conditioned" does better here
    # (docs/conditioning.md); `--config cifar10:conditioned` switches.
    c = distillation_config("cifar10", teacher="resnet34", student="resnet18")
    return apply_preset(c, preset)
