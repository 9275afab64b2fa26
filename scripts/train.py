"""Distil a student from a teacher with CPSC-DFKD.

    python scripts/train.py --config configs/digits.py --workdir /tmp/digits
    python scripts/train.py --config configs/cifar10.py --workdir W --config.batch_size=256
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cpsc_jax.config_validation import ConfigError
from cpsc_jax.trainer import NonFiniteLossError, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and results.")
flags.DEFINE_integer("stop_after_epochs", None,
                     "End this invocation after N epochs (resumable: re-run with the same workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_after_epochs=FLAGS.stop_after_epochs)
    except (ConfigError, FileNotFoundError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
