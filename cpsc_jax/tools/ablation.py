"""Ablation sweeps: a grid of config overrides x seeds, run one after another, resumable.

A grid file is JSON: {"row name": {"dotted.config.field": value, ...}, ...}; `{}` is the config
as given. Row r with seed index s runs in WORKDIR/r/seed{s} with `config.seed = base seed + s`.
A run that finished (its results.json exists) is not run again, and an interrupted run resumes
from its own checkpoint, so re-running the same command continues an interrupted sweep.
Every run distils from one teacher: the config's, or (configs that train their teacher, e.g.
digits) WORKDIR/teacher, trained once.

Outputs: WORKDIR/ablation.json (every run, and mean/std per row) and WORKDIR/ablation.md (the
table: student final and best accuracy, the generator's teacher agreement and diversity at the
end, wall time; mean +- std over seeds).
"""
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional

import ml_collections
import numpy as np

from cpsc_jax.config import defaults as config_defaults
from cpsc_jax.config.validation import ConfigError

PresetLoader = Callable[[str], ml_collections.ConfigDict]

COLUMNS = (  # (key in a run's summary, table heading, format)
    ("student_accuracy", "student final %", "{:.2f}"),
    ("best_student_accuracy", "student best %", "{:.2f}"),
    ("agreement", "teacher agrees", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("elapsed_s", "wall s", "{:.0f}"),
)


def load_grid(path: str) -> Dict[str, Dict[str, Any]]:
    try:
        with open(path) as f:
            grid = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} does not exist")
    except json.JSONDecodeError as e:
        raise ConfigError(f"grid file {path} is not valid JSON: {e}")
    if not isinstance(grid, dict) or not grid or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in grid.items()):
        raise ConfigError(f"grid file {path} must be a JSON object of rows "
                          '{"row name": {"dotted.config.field": value, ...}, ...}')
    for name in grid:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"grid row name {name!r} must be a plain folder name")
    return grid


def apply_overrides(config: ml_collections.ConfigDict, overrides: Dict[str, Any],
                    row: str = "", config_for_preset: Optional[PresetLoader] = None
                    ) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key overrides; an unknown field is an error.

    The key "preset" picks the base before the other keys apply, so a row means the same
    whatever preset the config itself defaults to: `config_for_preset(name)` (the config file
    built with that preset, as `--config FILE:name` would, with the command line's overrides),
    or else config_defaults.PRESETS[name] applied onto `config` (which misses what a config file
    changes for that preset itself, e.g. configs/mnist.py's label weight under "conditioned").
    """
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    try:
        if preset is not None and config_for_preset is not None:
            config = config_for_preset(preset)
        config = config.copy_and_resolve_references()
        if preset is not None and config_for_preset is None:
            config_defaults.apply_preset(config, preset)
    except ValueError as e:
        raise ConfigError(f"grid row {row!r}: {e}")
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        try:
            target = config_defaults.get_field(config, parent)
            old = target[leaf]
        except (KeyError, TypeError):
            raise ConfigError(f"grid row {row!r}: {key!r} is not a config field")
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            target[leaf] = value
        except TypeError as e:
            raise ConfigError(f"grid row {row!r}: {key}={value!r}: {e}")
    return config


def row_configs(config: ml_collections.ConfigDict, grid: Dict[str, Dict[str, Any]],
                config_for_preset: Optional[PresetLoader] = None
                ) -> Dict[str, ml_collections.ConfigDict]:
    """{row: its config}; ConfigError at the first row that names an unknown field or preset."""
    return {row: apply_overrides(config, overrides, row, config_for_preset)
            for row, overrides in grid.items()}


def run_summary(results: Dict[str, Any]) -> Dict[str, Optional[float]]:
    faithful = results.get("faithfulness") or {}
    return {"student_accuracy": results.get("student_accuracy"),
            "best_student_accuracy": results.get("best_student_accuracy"),
            "agreement": faithful.get("agreement"),
            "diversity": faithful.get("diversity"),
            "elapsed_s": results.get("elapsed_s")}


def mean_std(values: List[Optional[float]]):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def run_sweep(config, grid: Dict[str, Dict[str, Any]], seeds: int, workdir: str,
              distil: Callable[[Any, str], Dict[str, Any]],
              log: Callable[[str], None] = print,
              config_for_preset: Optional[PresetLoader] = None) -> Dict[str, Any]:
    """Runs every (row, seed) not finished yet with `distil(config, run_dir) -> results`, then
    writes the tables (rows with a "preset" key: see `apply_overrides`). Returns the
    ablation.json content."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    configs = row_configs(config, grid, config_for_preset)
    rows = []
    for row, overrides in grid.items():
        row_dir = os.path.join(workdir, row)
        os.makedirs(row_dir, exist_ok=True)
        _check_same_overrides(row_dir, row, overrides)
        runs = []
        for s in range(seeds):
            run_dir = os.path.join(row_dir, f"seed{s}")
            results_path = os.path.join(run_dir, "results.json")
            if os.path.isfile(results_path):
                with open(results_path) as f:
                    results = json.load(f)
            else:
                cfg = configs[row].copy_and_resolve_references()
                cfg.seed = config.seed + s
                log(f"ablation: {row} seed {cfg.seed} -> {run_dir}")
                results = distil(cfg, run_dir)
            runs.append({"seed": config.seed + s, **run_summary(results)})
        stats = {key: mean_std([r[key] for r in runs]) for key, _, _ in COLUMNS}
        rows.append({"row": row, "overrides": overrides, "runs": runs,
                     "mean": {k: v[0] for k, v in stats.items()},
                     "std": {k: v[1] for k, v in stats.items()}})
        write_tables(workdir, rows, seeds)
    return {"seeds": seeds, "rows": rows}


def _check_same_overrides(row_dir: str, row: str, overrides: Dict[str, Any]) -> None:
    path = os.path.join(row_dir, "overrides.json")
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != overrides:
            raise ConfigError(f"grid row {row!r} was run with {before}, now {overrides}: "
                              "rename the row or use another --workdir")
    else:
        with open(path, "w") as f:
            json.dump(overrides, f, indent=1)


def format_table(rows: List[Dict[str, Any]], seeds: int) -> str:
    head = "| row | overrides | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            m, s = r["mean"][key], r["std"][key]
            cells.append("–" if m is None else fmt.format(m) + (" ± " + fmt.format(s)
                                                                if len(r["runs"]) > 1 else ""))
        over = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "(as configured)"
        lines.append(f"| {r['row']} | {over} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± sample standard deviation over {seeds} seed(s); 'teacher agrees' and "
                 "'diversity' are the generator's class faithfulness on the fixed probe set at "
                 "the last evaluation (cpsc_jax.method.faithfulness).")
    return "\n".join(lines) + "\n"


def write_tables(workdir: str, rows: List[Dict[str, Any]], seeds: int) -> None:
    with open(os.path.join(workdir, "ablation.json.tmp"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows}, f, indent=1)
    os.replace(os.path.join(workdir, "ablation.json.tmp"), os.path.join(workdir, "ablation.json"))
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(format_table(rows, seeds))
