#!/usr/bin/env python
"""Train a teacher classifier on real data (the released recipe), resumable.

    python scripts/train_teacher.py --config configs/teachers/mnist.py \
        --config.data.dir=/path/to/mnist --workdir workdirs/mnist_teacher

Any config field can be overridden (`--config.epochs=2`, `--config.data.protocol=holdout`).
Writes WORKDIR/teacher (the model checkpoint `--config.teacher.checkpoint` of a distillation run
takes), WORKDIR/teacher_metrics.jsonl and WORKDIR/teacher_state (resume: re-run the command).
"""
import os
import sys

try:
    import cpsc_jax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging
from ml_collections import config_flags

from cpsc_jax.data import DataError
from cpsc_jax.teacher_training import train_teacher

_CONFIG = config_flags.DEFINE_config_file("config", None, "teacher config file (configs/teachers/)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; re-use it to resume)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        path = train_teacher(_CONFIG.value, _WORKDIR.value, log=lambda s: print(s, flush=True))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    app.run(main)
