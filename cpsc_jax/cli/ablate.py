"""cpsc-ablate: run a grid of config overrides x seeds and tabulate the results (resumable).

    cpsc-ablate --config digits --grid grids/digits.json --seeds 3 --workdir runs/ablate_digits

The grid file is JSON: {"row name": {"loss.ce_form": "plain", ...}, ...}. Writes
WORKDIR/ablation.md and WORKDIR/ablation.json; re-run the same command to continue.
"""
from cpsc_jax.cli import common

def define(F):
    from absl import flags
    common.define_config_flag(F)
    flags.DEFINE_string("grid", None, "JSON grid file: {row name: {dotted.field: value}}.",
                        flag_values=F)
    flags.DEFINE_integer("seeds", 3, "Seeds per row (config.seed, config.seed + 1, ...).",
                         flag_values=F)
    flags.DEFINE_string("workdir", None, "Directory of the sweep (one folder per row and seed).",
                        flag_values=F)



def run(F, argv) -> int:
    from cpsc_jax.tools import ablation
    from cpsc_jax.infra import runtime
    from cpsc_jax.teachers.training import resolve_teacher
    from cpsc_jax.method.trainer import train_and_evaluate
    grid = ablation.load_grid(F.grid)
    config = F.config.copy_and_resolve_references()
    config_for_preset = lambda preset: common.config_with_preset(F["config"], preset)
    ablation.row_configs(config, grid, config_for_preset)   # a bad row fails here, not later
    workdir = runtime.prepare_workdir(F.workdir)
    # One teacher for every run: the config's, or WORKDIR/teacher trained once.
    teacher = resolve_teacher(config, workdir)

    def distil(cfg, run_dir):
        cfg.teacher.checkpoint = teacher.path   # recorded in the run's config.json
        return train_and_evaluate(cfg, run_dir, teacher)
    out = ablation.run_sweep(config, grid, F.seeds, workdir, distil,
                             config_for_preset=config_for_preset)
    print(ablation.format_table(out["rows"], out["seeds"]))
    return 0


def main(argv=None):
    common.main(define, run, argv, workdir_hint=lambda F: F.workdir or "",
                required=("config", "grid", "workdir"))


if __name__ == "__main__":
    main()
