r"""cpsc-train: distil a student from a teacher with CPSC-DFKD.

    cpsc-train --config digits --workdir runs/digits
    cpsc-train --config cifar10 --workdir W --config.teacher.checkpoint=TEACHER \
        --config.data.dir=PATH/cifar-10-batches-py --config.batch_size=256

Re-running the same command resumes; a finished run reports its results at once.
"""
from cpsc_jax.cli import common

def define(F):
    from absl import flags
    common.define_config_flag(F)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and "
                        "results (created; re-use it to resume).", flag_values=F)
    flags.DEFINE_integer("stop_after_epochs", None, "End this invocation after N epochs "
                         "(resumable: re-run with the same workdir).", flag_values=F)
    common.define_distributed_flags(F)



def run(F, argv) -> int:
    from cpsc_jax.infra import runtime
    from cpsc_jax.method.trainer import train_and_evaluate
    log = print if runtime.topology().is_writer else (lambda *_: None)
    train_and_evaluate(F.config, F.workdir, None, log=log, stop_after_epochs=F.stop_after_epochs)
    return 0


def main(argv=None):
    common.main(define, run, argv, workdir_hint=lambda F: F.workdir or "", required=("config", "workdir"))


if __name__ == "__main__":
    main()
