"""How each phase's loss is composed (cpsc_jax.method.objectives), what the conditioning
diagnostics report (cpsc_jax.method.conditioning) and how a student's dead units are counted
(cpsc_jax.tools.diagnostics): the terms against NumPy, the weights and signs, a zero weight
removing its term."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_digits_config
from cpsc_jax.infra.checkpoint import ModelSpec, init_variables
from cpsc_jax.method import conditioning, objectives, steps
from cpsc_jax.tools import diagnostics


def _softmax(z, t=1.0):
    z = z / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kd(s, t, temperature=1.0):
    p, q = _softmax(t, temperature), _softmax(s, temperature)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)) * temperature ** 2)


@pytest.fixture(scope="module")
def setup():
    config = tiny_digits_config("conditioned")
    nets = steps.build_networks(config, config.teacher.arch, axis_name=None)
    state = steps.init_state(nets, config, jax.random.PRNGKey(0))
    spec = ModelSpec(config.teacher.arch, config.num_classes, config.image_size,
                     config.channels, (0.3,), (0.4,))
    teacher_vars = init_variables(spec, jax.random.PRNGKey(7))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, config.image_size, config.image_size,
                                                  config.channels))
    y = jnp.arange(8) % config.num_classes
    return config, nets, state, teacher_vars, x, y


def test_student_objective_weights_each_term_and_drops_zero_weights(setup):
    config, nets, state, teacher_vars, x, y = setup
    w = config.loss.copy_and_resolve_references()
    w.kd, w.student_kd_temperature, w.student_eta, w.alpha = 2.0, 4.0, 0.5, 0.0
    student_vars = {"params": state.student.params, "batch_stats": state.student.batch_stats}
    t_logits = jax.random.normal(jax.random.PRNGKey(2), (8, config.num_classes)) * 3
    parts, terms, _ = objectives.student_objective(nets, w, student_vars, x, t_logits, y, None)
    s_logits = np.asarray(nets.student.apply(student_vars, x, train=True,
                                             mutable=["batch_stats"])[0])
    assert set(parts) == {"kd", "ce"}                        # alpha = 0: no IKD term at all
    assert float(terms["kd"]) == pytest.approx(_kd(s_logits, np.asarray(t_logits), 4.0), rel=1e-5)
    assert float(parts["kd"]) == pytest.approx(2.0 * float(terms["kd"]), rel=1e-6)
    assert float(parts["ce"]) == pytest.approx(0.5 * float(terms["ce"]), rel=1e-6)
    assert float(objectives.total(parts)) == pytest.approx(float(parts["kd"] + parts["ce"]))
    agree = np.mean(s_logits.argmax(-1) == np.asarray(t_logits).argmax(-1))
    assert float(terms["agreement"]) == pytest.approx(agree)


def test_generator_objective_is_adversarial_in_kd_and_counts_teacher_agreement(setup):
    config, nets, state, teacher_vars, x, y = setup
    w = config.loss.copy_and_resolve_references()
    w.kd, w.beta = 1.5, 0.0
    student_vars = {"params": state.student.params, "batch_stats": state.student.batch_stats}
    a_params = state.adapter.params if state.adapter is not None else None
    parts, terms, _ = objectives.generator_objective(nets, w, teacher_vars, x, y, student_vars,
                                                     a_params, None)
    assert "bn" not in parts and "bn" not in terms           # beta = 0 removes the BN term
    assert float(parts["kd"]) == pytest.approx(-1.5 * float(terms["kd"]), rel=1e-6)
    assert float(terms["kd"]) > 0
    t_logits = np.asarray(nets.teacher.apply(teacher_vars, x, train=False))
    assert float(terms["teacher_agrees"]) == pytest.approx(
        np.mean(t_logits.argmax(-1) == np.asarray(y)))
    assert float(objectives.total(parts)) == pytest.approx(sum(float(v) for v in parts.values()),
                                                           rel=1e-6)


def test_conditioning_figures_flatten_to_metric_names():
    flat = conditioning.flatten({"ce": {"emb_norm": 1.0, "by_layer": {"bn0": 2.0}},
                                 "total": {"emb_norm": 3.0}})
    assert flat == {"conditioning/ce/emb_norm": 1.0, "conditioning/ce/by_layer/bn0": 2.0,
                    "conditioning/total/emb_norm": 3.0}


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(4, name="fc1")(x))
        h = nn.relu(nn.Dense(3, name="fc2")(h))
        return nn.Dense(2, name="head")(h)


def test_dead_units_are_the_channels_with_no_positive_value_on_any_image():
    model = _TwoLayers()
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
    variables = model.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(np.array, variables["params"])
    params["fc1"]["kernel"][:, :2] = 0.0
    params["fc1"]["bias"][:2] = -1.0     # two of fc1's four units never fire
    params["fc1"]["bias"][2:] = 50.0     # the other two always do
    params["fc2"]["kernel"][:] = 0.0
    params["fc2"]["bias"][:] = [-1.0, 1.0, 1.0]   # one of fc2's three is dead
    dead = diagnostics.dead_units(model, {"params": params}, x)
    assert dead == {"fc1": 0.5, "fc2": pytest.approx(1 / 3)}   # the head is not counted
