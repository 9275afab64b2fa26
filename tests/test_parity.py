"""Parity with the released iteration: the JAX steps against the PyTorch mirror of the authors'
code (cpsc_jax.pytorch.dfkd), same weights, same z and y, in float64 and float32.

Each case runs 2+2 iterations (G_steps 2, S_steps 2: two in float64, one in float32) and after
each compares every loss term, every updated parameter and every BatchNorm running statistic (generator, student; the
adapter's parameters, which the released code never changes). Tiny networks at 16x16, but
every code path: log- and mse-form IKD, both CE forms, the adapter (frozen and trained),
G_steps > 1, the per-epoch student learning-rate staircase.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import USERS_EMITTERS, load_config
from cpsc_jax.infra import runtime
from cpsc_jax.method import steps
from cpsc_jax.infra.checkpoint import ModelSpec, init_variables
from cpsc_jax.teachers.convert import flax_to_torch

torch = pytest.importorskip("torch")
from cpsc_jax.pytorch import dfkd as torch_dfkd  # noqa: E402
from cpsc_jax.teachers.convert import load_flax_variables  # noqa: E402

CASES = {
    # a ResNet pair (CIFAR ResNets of one block per stage for the student, two for the
    # teacher: every block kind, option-A shortcuts included), log-form IKD (CIFAR-10), the
    # released double-softmax CE
    "resnet_log": dict(teacher="resnet14", student="resnet8", classes=10, ikd_form="log",
                       ce_form="double_softmax"),
    # a WRN pair with the adapter (feature widths 64 -> 128), frozen as released
    "wrn_adapter": dict(teacher="wrn_16_2", student="wrn_16_1", classes=10, ikd_form="log",
                        ce_form="double_softmax"),
}
# The options-switched iteration, on the WRN pair: mse-form IKD, 100 classes, plain CE, persistent
# Adam, a trained adapter, the per-step schedule. The oddity tests that switch an option on the
# JAX side switch these, so that they run this test's compiled program (the cache's) again.
OPTIONS_SWITCHED = (dict(CASES["wrn_adapter"], classes=100, ikd_form="mse", ce_form="plain"),
                    dict(generator_optimizer="persistent", adapter_optimizer="sgd",
                         student_schedule="per_step"))
# Relative bounds. float64: the issue's. float32: the largest relative difference measured with
# these cases over one 2+2 iteration on a 2-core x86 CPU (1.07e-5, docs/RESULTS.md) with a
# ~10x margin.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
# Absolute bound on the noise-driven tensors (see `noise_driven`). float32: none tighter than
# Adam's step allows (each side moves at most lr_G per step). float64: measured at most 1.3e-8.
NOISE_BOUND = {"float64": lambda lr, steps: 1e-6, "float32": lambda lr, steps: 2 * lr * steps}


def make_config(case, **overrides):
    c = load_config("cifar10", "released")   # the preset that promises the released iteration
    c.num_classes = case["classes"]
    c.image_size = 16
    c.teacher.arch, c.student.arch = case["teacher"], case["student"]
    c.generator.nz, c.generator.ngf = 8, 4
    c.batch_size = 8
    c.g_steps, c.s_steps = 2, 2
    c.epochs, c.epoch_itrs, c.warmup_epochs = 20, 1, 10
    c.loss.ikd_form = case["ikd_form"]
    c.loss.ce_form = c.loss.student_ce_form = case["ce_form"]
    for k, v in overrides.items():
        c[k] = v
    return c


def _cast(tree, dtype):
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


def _teacher_variables(config, seed=3):
    """Random teacher weights with non-trivial BN running statistics (the BN-statistics loss
    compares against them)."""
    spec = ModelSpec(config.teacher.arch, config.num_classes, config.image_size, 3,
                     (0.0,) * 3, (1.0,) * 3)
    variables = init_variables(spec, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 1000))

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['mean']"):
            return 0.2 * jax.random.normal(next(keys), leaf.shape)
        if name.endswith("['var']"):
            return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=1.5)
        return leaf
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
    return variables


class Pair:
    """The JAX state and the PyTorch mirror of one config, with identical weights."""

    def __init__(self, config, dtype):
        self.config, self.dtype = config, dtype
        nets = steps.build_networks(config, config.teacher.arch)
        self.nets = nets
        state = steps.init_state(nets, config, jax.random.PRNGKey(0))
        teacher = _teacher_variables(config)
        # Placed as the iteration returns its state: the second iteration reuses the program.
        topo = runtime.topology(1)
        self.state = runtime.replicate(_cast(state, dtype), topo)
        self.teacher = runtime.replicate(_cast(teacher, dtype), topo)
        self.iteration = steps.make_train_iteration(nets, config, 1, donate=False)
        self.compiled = None   # compiled at the first run, with XLA's default emitters
        t_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
        self.torch = torch_dfkd.TorchDFKD(config, device="cpu", dtype=t_dtype)
        tm = self.torch
        load_flax_variables(tm.G, {"params": state.generator.params,
                                   "batch_stats": state.generator.batch_stats})
        load_flax_variables(tm.S, {"params": state.student.params,
                                   "batch_stats": state.student.batch_stats})
        load_flax_variables(tm.T, teacher)
        if tm.A is not None:
            load_flax_variables(tm.A, {"params": state.adapter.params})

    def run(self):
        """One iteration (g_steps generator steps, then s_steps student steps) on both sides;
        returns both metrics."""
        state, g, s = self.state, self.config.g_steps, self.config.s_steps
        draws = []
        for phase, n in (("generator", g), ("student", s)):
            for key in steps.phase_keys(state.rng, state.step, phase, n):
                z, y = steps.sample_conditioning(key, self.config, 0, 1)
                draws.append((phase, np.asarray(z), np.asarray(y)))
        ids = runtime.topology(1).device_ids()
        if self.compiled is None:
            options = USERS_EMITTERS if jax.default_backend() == "cpu" else None
            self.compiled = self.iteration.lower(state, self.teacher, ids).compile(
                compiler_options=options)
        self.state, jax_metrics = self.compiled(state, self.teacher, ids)
        torch_metrics = {}
        for phase, z, y in draws:
            step = self.torch.generator_step if phase == "generator" else self.torch.student_step
            for k, v in step(z, y).items():
                torch_metrics.setdefault(f"{phase}/{k}", []).append(float(v))
        return ({k: float(v) for k, v in jax.device_get(jax_metrics).items()},
                {k: float(np.mean(v)) for k, v in torch_metrics.items()})

    def tensors(self):
        """{network/key: (jax value, torch value)} over every parameter and running statistic."""
        st, tm = self.state, self.torch
        out = {}
        pairs = [("generator", {"params": st.generator.params,
                                "batch_stats": st.generator.batch_stats}, tm.G),
                 ("student", {"params": st.student.params, "batch_stats": st.student.batch_stats},
                  tm.S)]
        if tm.A is not None:
            pairs.append(("adapter", {"params": st.adapter.params}, tm.A))
        for name, variables, module in pairs:
            reference = module.state_dict()
            for key, value in flax_to_torch(jax.device_get(variables)).items():
                out[f"{name}/{key}"] = (np.asarray(value, np.float64),
                                        reference[key].detach().double().numpy())
        return out


def relative(a, b):
    """Largest difference relative to the largest magnitude (floored at 1e-30)."""
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale


def noise_driven(key, config):
    """Generator biases that feed a batch-statistics BatchNorm directly (l1 and conv1..n, each
    followed by a conditional BN), and those BNs' running means, which add the bias up: the
    bias gradient is zero in exact arithmetic, so both sides compute rounding noise, which
    Adam's normalised step turns into moves of up to lr_G per step. Compared in absolute terms."""
    n = config.generator.num_upsamples
    keys = {"generator/l1.bias", "generator/bn0.bn.running_mean"}
    for i in range(1, n + 1):
        keys |= {f"generator/conv{i}.bias", f"generator/bn{i}.bn.running_mean"}
    return key in keys


def compare(pair, jax_metrics, torch_metrics, tol, what, generator_steps):
    assert set(torch_metrics) == set(jax_metrics), what
    worst, noise = {}, {}
    for k, v in torch_metrics.items():
        worst[k] = relative(jax_metrics[k], v)
    for k, (a, b) in pair.tensors().items():
        if noise_driven(k, pair.config):
            noise[k] = float(np.max(np.abs(a - b)))
        else:
            worst[k] = relative(a, b)
    bad = {k: v for k, v in worst.items() if not v <= tol}
    assert not bad, f"{what}: relative differences above {tol:g}: {sorted(bad.items())[:8]}"
    bound = NOISE_BOUND[pair.dtype](pair.config.lr_generator, generator_steps)
    assert all(v <= bound for v in noise.values()), f"{what}: {noise} beyond {bound}"
    return max(worst.values())


def check_case(case, dtype, **overrides):
    config = make_config(case, **overrides)
    tol = TOLERANCE[dtype]
    with jax.enable_x64(dtype == "float64"):
        pair = Pair(config, dtype)
        initial = {k: a.copy() for k, (a, _) in pair.tensors().items()}
        worst = []
        # float64: two iterations, the second from the first's optimizer moments, running
        # statistics and the next epoch's learning rate (one compiled program: single steps
        # would add two compilations and check nothing this does not). float32: one, as the
        # released generator's sign-like Adam steps turn rounding into chaos within a few.
        for i in ((1, 2) if dtype == "float64" else (1,)):
            jax_m, torch_m = pair.run()
            worst.append(compare(pair, jax_m, torch_m, tol, f"iteration {i}",
                                 i * config.g_steps))
        # The steps did move the networks (a comparison of untouched weights proves nothing).
        moved = {k for k, (a, _) in pair.tensors().items() if not np.array_equal(a, initial[k])}
        assert any(k.startswith("generator/") for k in moved)
        assert any(k.startswith("student/") for k in moved)
        adapter = {k for k in initial if k.startswith("adapter/")}
        if config.adapter_optimizer == "frozen":
            assert not adapter & moved, "the released adapter never changes"
        else:
            assert adapter and adapter <= moved
    return max(worst)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_parity_with_the_released_iteration(name):
    check_case(CASES[name], "float64")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_log", "wrn_adapter"])
def test_float32_parity_within_rounding(name):
    check_case(CASES[name], "float32")


@pytest.mark.slow
def test_float64_parity_with_options_switched():
    """Persistent Adam, a trained adapter, the per-step schedule, mse-form IKD, plain CE and 100
    classes match their mirrors too."""
    case, overrides = OPTIONS_SWITCHED
    check_case(case, "float64", **overrides)


@pytest.mark.parametrize("change", ["ikd_through_teacher", "renormalised_adapter",
                                    "trained_adapter", "per_step_lr"])
@pytest.mark.slow
def test_each_released_oddity_is_detected(change, monkeypatch):
    """Each of the four behaviours of the released code, undone on one side only, breaks the
    float64 comparison: the test would catch a regression of any of them."""
    case, overrides = CASES["wrn_adapter"], {}
    if change == "ikd_through_teacher":
        def through_teacher(s, t, form):   # the gradient would also flow via the teacher
            mse = torch.nn.functional.mse_loss(s, t)
            return -torch.log(mse) if form == "log" else -mse
        monkeypatch.setattr(torch_dfkd, "ikd_generator_loss", through_teacher)
    elif change == "renormalised_adapter":
        from cpsc_jax.pytorch import models as torch_models
        raw = torch_models.FeatureAdapter.forward
        monkeypatch.setattr(torch_models.FeatureAdapter, "forward",
                            lambda self, x: torch.nn.functional.normalize(raw(self, x), dim=1))
    elif change == "trained_adapter":   # the JAX side trains the adapter, the mirror does not
        monkeypatch.setattr(torch_dfkd.TorchDFKD, "__init__", _frozen_torch_adapter_init())
        case, overrides = OPTIONS_SWITCHED
    elif change == "per_step_lr":       # the JAX side steps per iteration, the mirror per epoch
        monkeypatch.setattr(torch_dfkd, "student_lr", _per_epoch_lr(torch_dfkd.student_lr))
        case, overrides = OPTIONS_SWITCHED
    with pytest.raises(AssertionError, match="relative differences above"):
        check_case(case, "float64", **overrides)


def _frozen_torch_adapter_init():
    """TorchDFKD.__init__ that keeps the adapter frozen whatever the config says."""
    init = torch_dfkd.TorchDFKD.__init__

    def frozen(self, config, *args, **kwargs):
        config = config.copy_and_resolve_references()
        config.adapter_optimizer = "frozen"
        init(self, config, *args, **kwargs)
    return frozen


def _per_epoch_lr(student_lr):
    def per_epoch(config, step, steps_per_iteration):
        config = config.copy_and_resolve_references()
        config.student_schedule = "per_epoch"
        return student_lr(config, step, steps_per_iteration)
    return per_epoch


@pytest.mark.parametrize("epoch, expected", [
    (1, 0.1 * 1 / 10),                                        # first epoch: lr/W, never 0
    (7, 0.1 * 7 / 10),                                        # a warm-up epoch
    (11, 0.1 * 0.5 * (1 + np.cos(np.pi * 1 / 600))),           # the first cosine epoch
    (600, 0.1 * 0.5 * (1 + np.cos(np.pi * 590 / 600))),        # the last: 6.85e-5, not 0
])
def test_student_learning_rate_is_the_released_per_epoch_staircase(epoch, expected):
    from cpsc_jax.method.optimizers import student_schedule
    config = load_config("cifar10")     # E = 600, W = 10, lr 0.1, 50 iterations x S_steps 5
    per_epoch = config.epoch_itrs * config.s_steps
    schedule = student_schedule(config, config.s_steps)
    first, last = (epoch - 1) * per_epoch, epoch * per_epoch - 1
    for step in (first, first + 17, last):   # constant within the epoch
        assert float(schedule(jnp.asarray(step))) == pytest.approx(expected, rel=1e-6)
        with jax.enable_x64(True):
            assert float(schedule(jnp.asarray(step))) == pytest.approx(expected, rel=1e-12)
        assert torch_dfkd.student_lr(config, step, config.s_steps) == pytest.approx(expected,
                                                                                    rel=1e-12)
    if epoch == 600:
        assert expected == pytest.approx(6.85e-5, rel=1e-3)
