"""Networks: BatchNorm semantics and moment capture, CBN per class, generator conditioning, registry."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpsc_jax.models import (BN_MOMENTS, BatchNorm, ConditionalBatchNorm, ConditionalGenerator,
                             available_models, compiled_init, get_model)

RNG = np.random.RandomState(0)


def test_batchnorm_training_update_and_inference_match_pytorch_semantics():
    x = RNG.randn(4, 3, 3, 2).astype(np.float32) * 2 + 1
    bn = BatchNorm(momentum=0.9, epsilon=1e-5)
    v = bn.init(jax.random.PRNGKey(0), x, train=False)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    n = 4 * 3 * 3
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
    # PyTorch stores the unbiased variance in its running average
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    y_eval = bn.apply({**v, "batch_stats": upd["batch_stats"]}, x, train=False)
    np.testing.assert_allclose(y_eval, (x - 0.1 * mean) / np.sqrt(upd["batch_stats"]["var"] + 1e-5), atol=1e-5)


def test_bn_moments_are_captured_in_inference_mode_with_batch_stats_layout():
    model = get_model("small_cnn", 10)
    x = jnp.asarray(RNG.randn(5, 8, 8, 1), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x)
    logits, cols = model.apply(v, x, train=False, mutable=[BN_MOMENTS])
    chex.assert_trees_all_equal_structs(cols[BN_MOMENTS], v["batch_stats"])
    # first BN input is conv1(x): recompute it and compare the captured moments
    h = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).apply(
        {"params": v["params"]["conv1"]}, x)
    np.testing.assert_allclose(cols[BN_MOMENTS]["bn1"]["mean"], np.mean(h, (0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(cols[BN_MOMENTS]["bn1"]["var"], np.var(h, (0, 1, 2)), atol=1e-5)
    # capturing does not change the inference output
    np.testing.assert_allclose(logits, model.apply(v, x, train=False), atol=1e-6)


def test_conditional_batchnorm_applies_the_scale_and_shift_of_each_sample_class():
    cbn = ConditionalBatchNorm(num_classes=3)
    x = jnp.asarray(RNG.randn(6, 2, 2, 4), jnp.float32)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    v = cbn.init(jax.random.PRNGKey(0), x, y)
    chex.assert_shape(v["params"]["gamma"], (3, 4))
    np.testing.assert_array_equal(v["params"]["gamma"], 1.0)
    np.testing.assert_array_equal(v["params"]["beta"], 0.0)
    gamma = jnp.asarray(RNG.rand(3, 4) + 0.5, jnp.float32)
    beta = jnp.asarray(RNG.randn(3, 4), jnp.float32)
    out, _ = cbn.apply({"params": {"gamma": gamma, "beta": beta}, "batch_stats": v["batch_stats"]},
                       x, y, train=True, mutable=["batch_stats"])
    xn = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-3)   # eps 1e-3
    expected = xn * np.asarray(gamma)[np.asarray(y)][:, None, None, :] + np.asarray(beta)[np.asarray(y)][:, None, None, :]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_generator_output_depends_on_label_through_cbn_only():
    gen = ConditionalGenerator(num_classes=4, img_size=8, channels=1, nz=8, ngf=4)
    z = jnp.asarray(RNG.randn(4, 8), jnp.float32)
    y = jnp.array([0, 1, 2, 3])
    v = jax.jit(gen.init)(jax.random.PRNGKey(0), z, y)
    run = jax.jit(lambda p, labels: gen.apply({"params": p, "batch_stats": v["batch_stats"]}, z,
                                              labels, train=True, mutable=["batch_stats"])[0])
    out = run(v["params"], y)
    chex.assert_shape(out, (4, 8, 8, 1))
    # Initial CBN tables are identical for every class, so the label has no effect yet ...
    np.testing.assert_allclose(out, run(v["params"], jnp.array([3, 2, 1, 0])), atol=1e-6)
    # ... and once class 2's tables differ, only the sample labelled 2 changes.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a.at[2].set(a[2] * 1.5 + 0.3) if "beta" in str(path) or "gamma" in str(path) else a,
        v["params"])
    y2 = jnp.array([0, 1, 2, 3])
    relabelled = run(params, y2.at[0].set(2))
    base = run(params, y2)
    assert not np.allclose(relabelled[0], base[0], atol=1e-3)


def test_generator_upsamples_to_requested_size():
    for size, ups in ((32, 2), (64, 3)):
        gen = ConditionalGenerator(num_classes=10, img_size=size, channels=3, nz=16, ngf=4, num_upsamples=ups)
        shape = jax.eval_shape(lambda: gen.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 16)),
                                                            jnp.zeros((2,), jnp.int32))[0])
        assert shape.shape == (2, size, size, 3)


def test_compiled_init_is_module_init_compiled_once_per_module_and_shape():
    from cpsc_jax import models
    x = jnp.zeros((2, 8, 8, 1))
    reference = get_model("small_cnn_half", 10).init(jax.random.PRNGKey(5), x)
    before = models._init_program.cache_info()
    got = compiled_init(get_model("small_cnn_half", 10), jax.random.PRNGKey(5), x)
    # Without XLA's backend optimisations the float transforms of the initialisers may round
    # differently in the last bit; the random bits are the same.
    chex.assert_trees_all_close(got, reference, rtol=1e-6, atol=1e-7)
    other = compiled_init(get_model("small_cnn_half", 10), jax.random.PRNGKey(6), x)   # an equal module
    after = models._init_program.cache_info()
    assert after.hits - before.hits >= 1 and after.misses - before.misses <= 1
    assert not np.array_equal(other["params"]["conv1"]["kernel"], got["params"]["conv1"]["kernel"])
    # Inside a trace (jax.eval_shape of a state's initialisation) it traces as module.init does.
    shapes = jax.eval_shape(lambda k: compiled_init(get_model("small_cnn_half", 10), k, x),
                            jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_shapes(shapes, reference)


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_model("resnet1000", 10)
    for name in ("resnet18", "wrn_40_2", "vgg11_bn", "lenet5_half"):
        assert name in str(e.value)
    assert len(available_models()) >= 17


def test_every_classifier_returns_logits_and_features():
    for name in available_models():
        size, ch = (8, 1) if name.startswith("small") else ((32, 1) if name.startswith("lenet") else (32, 3))
        model = get_model(name, 7)
        x = jnp.zeros((2, size, size, ch))
        v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
        logits, feat = jax.eval_shape(lambda v: model.apply(v, x, features=True), v)
        assert logits.shape == (2, 7), name
        assert feat.ndim == 2 and feat.shape[0] == 2, name


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])
def test_max_pool_matches_pytorch_forward_and_gradient(shape):
    """Strided-slice max pooling against torch's max_pool2d (odd sizes drop the last row/column);
    random inputs have no ties, so the gradient goes to the same element in both."""
    torch = pytest.importorskip("torch")
    from cpsc_jax.models.layers import max_pool
    x = RNG.randn(*shape).astype(np.float32)
    w = RNG.randn(shape[0], shape[1] // 2, shape[2] // 2, shape[3]).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(max_pool(x) * w))(jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 2)
    (ty * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(max_pool(jnp.asarray(x)), ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(grad, tx.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("factor", [2, 3])
def test_upsample_gradient_is_the_block_sum(factor):
    from cpsc_jax.models.generator import upsample_nearest
    x = jnp.asarray(RNG.randn(2, 3, 4, 5).astype(np.float32))
    g = RNG.randn(2, 3 * factor, 4 * factor, 5).astype(np.float32)
    up, vjp = jax.vjp(lambda x: upsample_nearest(x, factor), x)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(np.asarray(x), factor, 1), factor, 2))
    block_sum = g.reshape(2, 3, factor, 4, factor, 5).sum((2, 4))
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], block_sum, rtol=1e-6, atol=1e-6)
