r"""cpsc-train-teacher: train a teacher classifier on real data (the released recipe), resumable.

    cpsc-train-teacher --config teacher:mnist --config.data.dir=/path/to/mnist \
        --workdir workdirs/mnist_teacher

`--config teacher:DATASET[,ARCH]` (configs/teacher.py). Writes WORKDIR/teacher (what
`--config.teacher.checkpoint` of a distillation takes), WORKDIR/teacher_metrics.jsonl and
WORKDIR/teacher_state; re-run the same command to resume. The last line printed is the path.
"""
from cpsc_jax.cli import common

def define(F):
    from absl import flags
    common.define_config_flag(F, "Teacher config: teacher:DATASET[,ARCH] or a path")
    flags.DEFINE_string("workdir", None, "Run directory (created; re-use it to resume).",
                        flag_values=F)
    common.define_distributed_flags(F)



def run(F, argv) -> int:
    from cpsc_jax.infra import runtime
    from cpsc_jax.teachers.training import train_teacher
    config = F.config
    if "arch" not in config or "loss" in config:
        from cpsc_jax.errors import UserError
        raise UserError("--config: this is not a teacher config; use --config teacher:DATASET"
                        "[,ARCH] (e.g. teacher:mnist or teacher:cifar10,wrn_40_2)")
    log = print if runtime.topology().is_writer else (lambda *_: None)
    path = train_teacher(config, F.workdir, log=lambda s: log(s, flush=True))
    log(path)
    return 0


def main(argv=None):
    common.main(define, run, argv, workdir_hint=lambda F: F.workdir or "", required=("config", "workdir"))


if __name__ == "__main__":
    main()
