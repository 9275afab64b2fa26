"""Every loss term against an independent NumPy formula written here (spec section 3)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpsc_jax.method import losses

RNG = np.random.RandomState(0)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    return np.log(np_softmax(x))


@pytest.fixture
def logits():
    return RNG.randn(6, 5).astype(np.float64) * 2, RNG.randn(6, 5).astype(np.float64) * 2


def test_kd_is_kl_teacher_student(logits):
    s, t = logits
    p_t = np_softmax(t)
    expected = np.mean(np.sum(p_t * (np.log(p_t) - np_log_softmax(s)), -1))
    np.testing.assert_allclose(losses.kd_loss(jnp.asarray(s), jnp.asarray(t)), expected, rtol=1e-5)
    assert float(losses.kd_loss(jnp.asarray(t), jnp.asarray(t))) == pytest.approx(0.0, abs=1e-6)


def test_kd_with_a_temperature_is_t_squared_times_the_softened_kl(logits):
    s, t = logits
    T = 4.0
    p_t = np_softmax(t / T)
    expected = T ** 2 * np.mean(np.sum(p_t * (np.log(p_t) - np_log_softmax(s / T)), -1))
    np.testing.assert_allclose(losses.kd_loss(jnp.asarray(s), jnp.asarray(t), T), expected,
                               rtol=1e-5)
    assert float(losses.kd_loss(jnp.asarray(s), jnp.asarray(t), T)) != pytest.approx(
        float(losses.kd_loss(jnp.asarray(s), jnp.asarray(t))), rel=1e-3)


def test_ikd_forms(logits):
    s, t = logits
    mse = np.mean((s - t) ** 2)
    np.testing.assert_allclose(losses.ikd_generator_loss(s, t, "log"), -np.log(mse), rtol=1e-5)
    np.testing.assert_allclose(losses.ikd_generator_loss(s, t, "mse"), -mse, rtol=1e-5)
    np.testing.assert_allclose(losses.ikd_student_loss(s, t, "log"),
                               np.log(np.sqrt(np.sum((t - s) ** 2))), rtol=1e-5)
    np.testing.assert_allclose(losses.ikd_student_loss(s, t, "mse"), mse, rtol=1e-5)
    with pytest.raises(ValueError, match="ikd_form"):
        losses.ikd_generator_loss(s, t, "l1")


def test_bn_statistics_loss_sums_plain_norms_over_layers():
    moments = {"a": {"mean": RNG.randn(4), "var": RNG.rand(4)},
               "b": {"c": {"mean": RNG.randn(3), "var": RNG.rand(3)}}}
    running = {"a": {"mean": RNG.randn(4), "var": RNG.rand(4)},
               "b": {"c": {"mean": RNG.randn(3), "var": RNG.rand(3)}}}
    expected = 0.0
    for m, r in ((moments["a"], running["a"]), (moments["b"]["c"], running["b"]["c"])):
        expected += np.sqrt(np.sum((m["var"] - r["var"]) ** 2)) + np.sqrt(np.sum((m["mean"] - r["mean"]) ** 2))
    got = losses.bn_statistics_loss(jax.tree.map(jnp.asarray, moments), jax.tree.map(jnp.asarray, running))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def np_supcon(features, labels, temperature, base_temperature):
    """Khosla et al. written anchor by anchor."""
    n = len(labels)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sims = np.array([features[i] @ features[j] / temperature for j in others])
        log_den = np.log(np.sum(np.exp(sims)))
        pos = [k for k, j in enumerate(others) if labels[j] == labels[i]]
        total += np.mean([sims[k] - log_den for k in pos])
    return -(temperature / base_temperature) * total / n


def test_supcon_matches_per_anchor_reference():
    b, d = 6, 8
    f_s = RNG.randn(b, d); f_s /= np.linalg.norm(f_s, axis=1, keepdims=True)
    f_t = RNG.randn(b, d); f_t /= np.linalg.norm(f_t, axis=1, keepdims=True)
    y = np.array([0, 1, 0, 2, 1, 1])
    expected = np_supcon(np.concatenate([f_s, f_t]), np.concatenate([y, y]), 0.07, 0.07)
    got = losses.two_view_supcon_loss(jnp.asarray(f_s, jnp.float32), jnp.asarray(f_t, jnp.float32),
                                      jnp.asarray(y), 0.07, 0.07)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # temperature / base_temperature scales the loss
    scaled = losses.supcon_loss(jnp.asarray(np.concatenate([f_s, f_t]), jnp.float32),
                                jnp.asarray(np.concatenate([y, y])), 0.5, 0.25)
    np.testing.assert_allclose(scaled, np_supcon(np.concatenate([f_s, f_t]), np.concatenate([y, y]), 0.5, 0.25),
                               rtol=1e-4)


def test_supcon_agrees_with_torch_if_available():
    torch = pytest.importorskip("torch")
    f = torch.nn.functional.normalize(torch.randn(10, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 0, 1])
    # Independent vectorised form in torch: log-prob over non-self entries, mean over positives.
    sim = f @ f.T / 0.1
    eye = torch.eye(10, dtype=torch.bool)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, -float("inf")), dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    expected = -(0.1 / 0.07) * ((log_prob * pos).sum(1) / pos.sum(1)).mean()
    got = losses.supcon_loss(jnp.asarray(f.numpy(), jnp.float32), jnp.asarray(y.numpy()), 0.1, 0.07)
    np.testing.assert_allclose(got, expected.item(), rtol=1e-4)


def test_cross_entropy_forms(logits):
    s, _ = logits
    y = np.array([0, 1, 2, 3, 4, 0])
    plain = -np.mean(np_log_softmax(s)[np.arange(6), y])
    double = -np.mean(np_log_softmax(np_softmax(s))[np.arange(6), y])
    np.testing.assert_allclose(losses.cross_entropy_loss(s, y, "plain"), plain, rtol=1e-5)
    np.testing.assert_allclose(losses.cross_entropy_loss(s, y, "double_softmax"), double, rtol=1e-5)
    assert abs(plain - double) > 1e-3   # the two forms really differ


def test_losses_are_float32_scalars_under_bf16_inputs(logits):
    s, t = (jnp.asarray(a, jnp.bfloat16) for a in logits)
    for value in (losses.kd_loss(s, t), losses.cross_entropy_loss(s, jnp.zeros(6, jnp.int32), "plain")):
        chex.assert_shape(value, ())
        chex.assert_type(value, jnp.float32)
