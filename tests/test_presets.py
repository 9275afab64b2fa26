"""The presets every shipped distillation config takes (`--config NAME:released`,
`NAME:conditioned`, `NAME:improved`): what each promises, which one each config picks, and that
all are valid.

tests/test_parity.py runs the released iteration with `load_config("cifar10", "released")`
against the PyTorch mirror; here the preset's fields are held against spec §4 written out
independently, so a preset edit that drifts from the released code fails.
"""
import os

import pytest

from conftest import REPO, load_config
from cpsc_jax.tools import ablation
from cpsc_jax.config.defaults import PRESETS, apply_preset, get_field
from cpsc_jax.config.validation import ConfigError, validate_config

DISTILLATION_CONFIGS = ["cifar10", "cifar100", "svhn", "tiny_imagenet", "digits", "mnist"]

# Spec §4 (the released iteration), independent of config_defaults: Adam rebuilt before every
# generator step at a constant rate, the student's LR a staircase per epoch, the adapter never
# trained, the double-softmax CE for both networks with one eta.
RELEASED = {"generator_optimizer": "reset", "generator_schedule": "constant",
            "student_schedule": "per_epoch", "adapter_optimizer": "frozen",
            "loss.ce_form": "double_softmax", "loss.student_ce_form": "double_softmax"}


@pytest.mark.parametrize("name", DISTILLATION_CONFIGS)
def test_released_preset_is_the_released_iteration(name):
    c = load_config(name, "released")
    for key, value in RELEASED.items():
        assert get_field(c, key) == value, key
    assert c.loss.student_eta == c.loss.eta


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "tiny_imagenet"])
def test_published_configs_keep_their_meaning(name):
    """cifar10/cifar100/svhn/tiny_imagenet default to the released preset, and the released
    command's hyper-parameters (spec §5) are untouched."""
    c = load_config(name)
    assert c.to_dict() == load_config(name, "released").to_dict()
    assert (c.batch_size, c.epochs, c.epoch_itrs, c.g_steps, c.s_steps) == (512, 600, 50, 6, 5)
    assert (c.loss.alpha, c.loss.beta, c.loss.gamma, c.loss.eta) == (5.0, 1.0, 0.7, 0.7)


@pytest.mark.parametrize("name", DISTILLATION_CONFIGS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_config_and_preset_is_valid(name, preset):
    validate_config(load_config(name, preset))


@pytest.mark.parametrize("name", DISTILLATION_CONFIGS)
def test_presets_differ_only_in_their_own_fields(name):
    configs = [load_config(name, p) for p in PRESETS]
    keys = {k for p in PRESETS.values() for k in p if not k.startswith("=")}
    for c in configs:
        for key in keys:
            parent, _, leaf = key.rpartition(".")
            del get_field(c, parent)[leaf]
    for c in configs[1:]:
        assert c.to_dict() == configs[0].to_dict()
    # and "conditioned" is what makes the generator honour its label (docs/conditioning.md)
    c = load_config(name, "conditioned")
    assert (c.loss.ce_form, c.generator_optimizer) == ("plain", "persistent")
    assert c.loss.eta > 0


@pytest.mark.parametrize("name", DISTILLATION_CONFIGS)
def test_improved_is_conditioned_plus_the_student_phase_switches(name):
    improved, conditioned = load_config(name, "improved"), load_config(name, "conditioned")
    if name == "mnist":   # the file lowers the label weight under "conditioned" only
        assert (conditioned.loss.eta, improved.loss.eta) == (1.5, 2.0)
        conditioned.loss.eta = improved.loss.eta
    assert improved.student_grad_clip > 0 and improved.student_data == "fresh+replay"
    for key in ("student_grad_clip", "student_data", "replay_size", "replay_batch"):
        parent, _, leaf = key.rpartition(".")
        del get_field(improved, parent)[leaf], get_field(conditioned, parent)[leaf]
    assert improved.to_dict() == conditioned.to_dict()
    released = load_config(name, "released")   # released pins every switch off
    assert (released.student_grad_clip, released.student_data, released.generator_reinit_every,
            released.student_augment.mixup) == (0.0, "fresh", 0, 0.0)


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_digit_configs_default_to_improved(name):
    assert load_config(name).to_dict() == load_config(name, "improved").to_dict()


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'bogus'.*released, conditioned, improved"):
        load_config("digits", "bogus")


def test_grid_row_preset_is_applied_before_its_overrides():
    base = load_config("digits", "conditioned")
    row = ablation.apply_overrides(base, {"preset": "released", "student_schedule": "per_step"})
    assert row.student_schedule == "per_step"            # the row's override wins
    assert row.loss.ce_form == "double_softmax"          # the rest is the released preset
    assert row.loss.student_eta == row.loss.eta
    assert base.loss.ce_form == "plain"                  # the base config is untouched
    with pytest.raises(ConfigError, match="grid row 'r'.*unknown preset"):
        ablation.apply_overrides(base, {"preset": "bogus"}, "r")


def test_grid_row_preset_keeps_what_the_config_file_sets_for_that_preset(monkeypatch):
    """A row naming a preset is the config file built with it (configs/mnist.py's label weight
    under "conditioned"), with the command line's overrides, not PRESETS applied on top."""
    from absl import flags
    from cpsc_jax.cli import common
    F = flags.FlagValues()
    common.define_config_flag(F)
    argv = ["prog", f"--config={REPO / 'configs' / 'mnist.py'}", "--config.batch_size=7"]
    monkeypatch.setattr("sys.argv", argv)   # ml_collections reads the overrides from there
    F(argv)
    assert F.config.loss.eta == 2.0                       # improved, the default
    loader = lambda preset: common.config_with_preset(F["config"], preset)
    row = ablation.apply_overrides(F.config, {"preset": "conditioned", "epochs": 3}, "r", loader)
    assert (row.loss.eta, row.batch_size, row.epochs) == (1.5, 7, 3)
    assert row.student_data == "fresh"
    plain = ablation.apply_overrides(F.config, {"preset": "conditioned"}, "r")
    assert plain.loss.eta == 2.0                          # PRESETS alone: what the file adds is lost
    with pytest.raises(ConfigError, match="grid row 'r'.*unknown preset 'bogus'"):
        ablation.apply_overrides(F.config, {"preset": "bogus"}, "r", loader)


def test_apply_preset_copies_referenced_fields():
    c = load_config("digits", "conditioned")
    c.loss.eta = 1.5
    apply_preset(c, "released")
    assert c.loss.student_eta == 1.5


@pytest.mark.parametrize("grid", sorted(p.name for p in (REPO / "grids").glob("*.json")))
def test_shipped_grids_apply_to_their_config(grid):
    """Every row of the grids behind docs/RESULTS.md names real fields and presets."""
    name = grid.split("_")[0].split(".")[0]           # digits.json, mnist_30ep.json, ...
    base = load_config(name)
    for row, overrides in ablation.load_grid(str(REPO / "grids" / grid)).items():
        validate_config(ablation.apply_overrides(base, overrides, row))


def test_sweep_runs_each_row_and_seed_once_resumes_and_tabulates(tmp_path):
    """run_sweep with a stand-in for the trainer (it writes results.json as the trainer does):
    an interrupted sweep resumes with only the missing runs; the table holds mean and sample
    std over seeds; a row whose overrides changed is refused."""
    import json
    import numpy as np
    calls = []

    def distil(cfg, run_dir, fail_on=None):
        if (cfg.loss.eta, cfg.seed) == fail_on:
            raise KeyboardInterrupt
        calls.append((cfg.loss.eta, cfg.seed, cfg.generator_optimizer))
        os.makedirs(run_dir, exist_ok=True)
        acc = 90.0 + cfg.loss.eta + cfg.seed
        results = {"student_accuracy": acc, "best_student_accuracy": acc + 1,
                   "faithfulness": {"agreement": 0.1 * cfg.seed, "diversity": 0.5},
                   "elapsed_s": 1.0}
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(results, f)
        return results

    base = load_config("digits", "conditioned")
    grid = {"a": {"loss.eta": 1.0}, "b": {"preset": "released", "loss.eta": 2.0}}
    with pytest.raises(KeyboardInterrupt):
        ablation.run_sweep(base, grid, 3, str(tmp_path), lambda c, d: distil(c, d, (2.0, 1)),
                           log=lambda *a: None)
    assert calls == [(1.0, 0, "persistent"), (1.0, 1, "persistent"), (1.0, 2, "persistent"),
                     (2.0, 0, "reset")]
    calls.clear()
    out = ablation.run_sweep(base, grid, 3, str(tmp_path), distil, log=lambda *a: None)
    assert calls == [(2.0, 1, "reset"), (2.0, 2, "reset")]     # only the missing runs
    a, b = out["rows"]
    assert a["mean"]["student_accuracy"] == pytest.approx(92.0)
    assert b["std"]["student_accuracy"] == pytest.approx(np.std([92, 93, 94], ddof=1))
    table = (tmp_path / "ablation.md").read_text()
    assert "93.00 ± 1.00" in table and "`preset=released`, `loss.eta=2.0`" in table
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][1]["row"] == "b"
    with pytest.raises(ConfigError, match="grid row 'a' was run with"):
        ablation.run_sweep(base, {"a": {"loss.eta": 1.5}}, 3, str(tmp_path), distil)
