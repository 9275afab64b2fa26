"""The Python API: stock Flax classifiers as teacher and student, `distill` with and without
evaluation data, the clear errors, and user architectures in the registry and checkpoints."""
import functools
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cpsc_jax
from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax import models as models_lib
from cpsc_jax.config.validation import ConfigError
from cpsc_jax.teachers.flax_wrap import FlaxClassifier, WrapError, wrap
from cpsc_jax.models import BN_MOMENTS
from cpsc_jax.teachers.teacher import Teacher

quiet = lambda *a: None
DIGITS = data_lib.dataset_info("digits")
SHAPE = (8, 8, 1)


class StockCNN(nn.Module):
    """A plain flax.linen classifier: nn.BatchNorm, no `features` argument."""

    num_classes: int = 10
    width: int = 8
    use_bn: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, stride in enumerate((1, 2)):
            x = nn.Conv(self.width * (i + 1), (3, 3), strides=stride, use_bias=not self.use_bn)(x)
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


@pytest.fixture(autouse=True)
def restore_registry():
    """Names a test registers are removed afterwards (other test files list the registry)."""
    before = dict(models_lib._REGISTERED)
    yield
    for name in list(models_lib._REGISTERED):
        if name not in before:
            models_lib.unregister_model(name)


@pytest.fixture(scope="module")
def digits_test():
    return data_lib.load_split({"name": "digits"}, "test")


@pytest.fixture(scope="module")
def stock_teacher():
    """(module, variables) of a StockCNN trained for 150 SGD steps on the digits train split."""
    train = data_lib.load_split({"name": "digits"}, "train")
    x_all = data_lib.normalize(train.images, DIGITS.mean, DIGITS.std)
    model = StockCNN()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x_all[:2])
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(150):
        idx = rng.integers(0, len(x_all), 64)
        params, stats, opt_state = step(params, stats, opt_state, x_all[idx],
                                        train.labels[idx])
    return model, {"params": params, "batch_stats": stats}


def tiny_config(**loss):
    """`default_config` for 8x8 digits, shrunk to a few iterations of tiny networks."""
    c = cpsc_jax.default_config(10, SHAPE, student="small_cnn_half")
    c.batch_size, c.epochs, c.epoch_itrs, c.warmup_epochs = 16, 1, 2, 1
    c.g_steps = c.s_steps = 1
    c.generator.nz, c.generator.ngf = 8, 4
    c.sample_columns, c.log_every, c.eval_batch_size = 2, 1, 200
    for k, v in loss.items():
        c.loss[k] = v
    return c


def _bn_inputs(model, variables, x):
    """The input of each nn.BatchNorm, recomputed by hand (conv -> BN -> relu -> conv -> BN)."""
    p, s = variables["params"], variables["batch_stats"]
    h0 = nn.Conv(8, (3, 3), use_bias=False).apply({"params": p["Conv_0"]}, x)
    a0 = nn.relu(nn.BatchNorm(use_running_average=True).apply(
        {"params": p["BatchNorm_0"], "batch_stats": s["BatchNorm_0"]}, h0))
    h1 = nn.Conv(16, (3, 3), strides=2, use_bias=False).apply({"params": p["Conv_1"]}, a0)
    return {"BatchNorm_0": h0, "BatchNorm_1": h1}


def _jit(fn, **kwargs):
    """fn(variables, x, **kwargs) as one compiled program (op by op, each op compiles alone)."""
    return jax.jit(functools.partial(fn, **kwargs))


def test_stock_flax_classifier_works_once_wrapped(stock_teacher):
    model, variables = stock_teacher
    x = jax.random.normal(jax.random.PRNGKey(1), (6,) + SHAPE)
    with pytest.raises(TypeError, match="features"):
        model.apply(variables, x, train=False, features=True)
    net = wrap(model)
    # Same variables, same tree: the wrapper shares the module's scope.
    init = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
    assert jax.tree.structure(init) == jax.tree.structure(variables)
    (logits, feature), cols = _jit(net.apply, train=False, features=True,
                                   mutable=[BN_MOMENTS])(variables, x)
    np.testing.assert_allclose(logits, _jit(model.apply, train=False)(variables, x), atol=1e-6)
    assert feature.shape == (6, 16)   # the head's input
    assert jax.tree.structure(cols[BN_MOMENTS]) == jax.tree.structure(variables["batch_stats"])
    bn_inputs = jax.jit(functools.partial(_bn_inputs, model))(variables, x)
    for name, h in bn_inputs.items():
        np.testing.assert_allclose(cols[BN_MOMENTS][name]["mean"], h.mean((0, 1, 2)), atol=1e-5)
        np.testing.assert_allclose(cols[BN_MOMENTS][name]["var"], h.var((0, 1, 2)), atol=1e-5)
    # A named layer's output, pooled over space; a user function.
    _, conv_feature = _jit(wrap(model, feature_layer="Conv_1").apply, features=True)(variables, x)
    assert conv_feature.shape == (6, 16)
    fn = lambda m, x, train: (m(x, train=train), x.reshape(x.shape[0], -1))
    _, flat = _jit(wrap(model, feature_fn=fn).apply, features=True)(variables, x)
    np.testing.assert_array_equal(flat, x.reshape(6, -1))
    with pytest.raises(WrapError, match="feature_layer='Conv_9' was not called.*Conv_0"):
        _jit(wrap(model, feature_layer="Conv_9").apply, features=True)(variables, x)
    # Training mode updates the user's batch_stats as the module itself would.
    _, upd = _jit(net.apply, train=True, mutable=["batch_stats"])(variables, x)
    _, ref = _jit(model.apply, train=True, mutable=["batch_stats"])(variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), upd, ref)


def test_bn_moments_are_global_across_devices_and_apply_functions_work(stock_teacher):
    model, variables = stock_teacher
    x = jax.random.normal(jax.random.PRNGKey(2), (8,) + SHAPE)
    full = jax.jit(functools.partial(_bn_inputs, model))(variables, x)
    n = jax.local_device_count()
    net = wrap(model).for_run(axis_name="batch")
    cols = jax.pmap(lambda v, x: net.apply(v, x, features=True, mutable=[BN_MOMENTS])[1],
                    axis_name="batch", in_axes=(None, 0))(variables, x.reshape((n, -1) + SHAPE))
    for name, h in full.items():   # every device holds the moments of the whole batch
        np.testing.assert_allclose(cols[BN_MOMENTS][name]["var"],
                                   np.broadcast_to(h.var((0, 1, 2)), (n, h.shape[-1])), atol=1e-5)
    # A bare apply function: same logits, feature and moments as the wrapped module.
    fn_net = wrap(functools.partial(model.apply, train=False), variables)
    (a, fa), ca = _jit(fn_net.apply, features=True, mutable=[BN_MOMENTS])(variables, x)
    (b, fb), cb = _jit(wrap(model).apply, features=True, mutable=[BN_MOMENTS])(variables, x)
    same = functools.partial(np.testing.assert_allclose, atol=1e-6)
    same(a, b)
    same(fa, fb)
    jax.tree.map(same, ca, cb)


@pytest.mark.slow
def test_distill_stock_teacher_with_eval_data(stock_teacher, digits_test, tmp_path):
    model, variables = stock_teacher
    config = tiny_config()
    out = cpsc_jax.distill(model, variables, num_classes=10, input_shape=SHAPE,
                           mean=DIGITS.mean, std=DIGITS.std, student="small_cnn_half",
                           config=config, eval_data=(digits_test.images, digits_test.labels),
                           workdir=str(tmp_path / "run"), log=quiet)
    r = out.results
    teacher_pred = np.argmax(model.apply(variables, data_lib.normalize(
        digits_test.images, DIGITS.mean, DIGITS.std)), -1)
    assert r["teacher_accuracy"] == pytest.approx(100 * np.mean(teacher_pred == digits_test.labels))
    assert r["teacher_accuracy"] > 70
    assert isinstance(r["student_accuracy"], float) and len(out.history) == 1
    assert r["protocol"] == "custom"
    assert out.arch == "small_cnn_half" and out.config.teacher.arch == "flax_teacher"
    assert "flax_teacher" not in models_lib.available_models()   # registered only for the run
    assert config.teacher.arch == "flax_teacher" and config.student.arch == "small_cnn_half"
    # The returned student is the saved one and predicts as the run measured.
    assert np.mean(out.predict(digits_test.images) == digits_test.labels) * 100 == \
        pytest.approx(r["student_accuracy"])
    assert json.load(open(tmp_path / "run" / "student" / "model.json"))["distilled_from"] == \
        "StockCNN"
    assert os.path.isfile(tmp_path / "run" / "samples" / "epoch_0001.png")


@pytest.mark.slow
def test_distill_data_free_into_a_user_student_module(stock_teacher, tmp_path, capsys):
    model, variables = stock_teacher
    student = StockCNN(width=4)
    capsys.readouterr()
    out = cpsc_jax.distill(model, variables, num_classes=10, input_shape=SHAPE,
                           mean=DIGITS.mean, std=DIGITS.std, student=student,
                           student_name="tiny_student", config=tiny_config(), log=False)
    assert capsys.readouterr().out == ""   # log=False: no progress line reaches stdout
    assert out.results["student_accuracy"] is None
    assert out.results["protocol"] == "none (data-free)"
    assert out.module is student and out.arch == "tiny_student"
    # The variables are the module's own: it runs them with its own signature.
    own = student.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    assert jax.tree.structure(out.variables) == jax.tree.structure(own)
    logits = student.apply(out.variables, jnp.zeros((2,) + SHAPE), train=False)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    # The checkpoint records the registered name, and loads while it is registered.
    spec, loaded = ckpt_lib.load_model(out.checkpoint)
    assert spec.arch == "tiny_student"
    jax.tree.map(np.testing.assert_array_equal, loaded, out.variables)
    assert os.path.isfile(os.path.join(out.workdir, "results.json"))   # a kept temporary dir
    shutil.rmtree(out.workdir)


def test_teacher_without_batchnorm_and_beta_is_a_clear_error(tmp_path):
    model = StockCNN(use_bn=False)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    kwargs = dict(num_classes=10, input_shape=SHAPE, mean=DIGITS.mean, std=DIGITS.std,
                  student="small_cnn_half", workdir=str(tmp_path / "w"), log=quiet)
    with pytest.raises(ConfigError, match=r"no BatchNorm layers .* config.loss.beta = 0"):
        cpsc_jax.distill(model, variables, config=tiny_config(beta=1.0), **kwargs)
    assert not (tmp_path / "w").exists()
    # The trainer's own check says the same for a Teacher handed to it directly.
    from cpsc_jax.config.validation import validate_teacher
    teacher = Teacher.from_flax(model, variables, num_classes=10, input_shape=SHAPE,
                                mean=DIGITS.mean, std=DIGITS.std)
    with pytest.raises(ConfigError, match="needs BatchNorm layers in the teacher"):
        validate_teacher(tiny_config(beta=1.0), teacher)


def test_teacher_checks_name_what_is_wrong(stock_teacher):
    model, variables = stock_teacher
    args = dict(input_shape=SHAPE, mean=DIGITS.mean, std=DIGITS.std)
    with pytest.raises(WrapError, match=r"logits of shape \(2, 10\); expected \(batch, 5\)"):
        Teacher.from_flax(model, variables, num_classes=5, **args)

    class OwnNorm(nn.Module):   # keeps batch_stats without being an nn.BatchNorm
        @nn.compact
        def __call__(self, x, train: bool = False):
            mean = self.variable("batch_stats", "mean", jnp.zeros, (x.shape[-1],))
            x = nn.Conv(4, (3, 3))(x - mean.value)
            return nn.Dense(10)(x.mean((1, 2)))
    own = OwnNorm().init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
    with pytest.raises(WrapError, match=r"not seen: \['mean'\]"):
        Teacher.from_flax(OwnNorm(), own, num_classes=10, **args)
    Teacher.from_flax(OwnNorm(), own, num_classes=10, check_bn_moments=False, **args)
    with pytest.raises(WrapError, match="input_shape must be"):
        Teacher.from_flax(model, variables, num_classes=10, input_shape=(8, 6, 1),
                          mean=0.3, std=0.4)


def test_eval_data_conversions(digits_test):
    split = cpsc_jax.as_eval_split((digits_test.images[..., 0] / 255.0, digits_test.labels),
                                   10, SHAPE)
    np.testing.assert_array_equal(split.images, digits_test.images)
    assert split.images.dtype == np.uint8 and split.name == "test"
    with pytest.raises(ConfigError, match=r"un-normalised, in \[0, 1\]"):
        cpsc_jax.as_eval_split((data_lib.normalize(digits_test.images, 0.3, 0.4),
                                digits_test.labels), 10, SHAPE)
    with pytest.raises(ConfigError, match=r"the teacher takes \(8, 8, 1\)"):
        cpsc_jax.as_eval_split((np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, int)), 10, SHAPE)
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 10\)"):
        cpsc_jax.as_eval_split((digits_test.images[:2], np.array([3, 10])), 10, SHAPE)


def test_default_config_adapts_to_the_input():
    small = cpsc_jax.default_config(10, (8, 8, 1))
    assert (small.image_size, small.channels, small.batch_size) == (8, 1, 128)
    assert small.generator.num_upsamples == 2 and small.loss.alpha == 0.1
    large = cpsc_jax.default_config(100, (32, 32, 3), teacher_bn_layers=36)
    assert (large.batch_size, large.g_steps, large.loss.alpha, large.loss.ikd_form) == \
        (512, 6, 5.0, "mse")
    assert cpsc_jax.default_config(10, (32, 32, 3), teacher_bn_layers=3).loss.alpha == 0.1
    assert cpsc_jax.default_config(200, (64, 64, 3)).generator.num_upsamples == 3
    assert large.generator_optimizer == "reset"                  # released unless asked
    asked = cpsc_jax.default_config(100, (32, 32, 3), preset="conditioned")
    assert (asked.loss.ce_form, asked.generator_optimizer) == ("plain", "persistent")
    assert cpsc_jax.default_config(10, (8, 8, 1), preset="released").loss.ce_form == \
        "double_softmax"
    with pytest.raises(ValueError, match="square images"):
        cpsc_jax.default_config(10, (32, 28, 3))


def user_cnn(width):
    def build(num_classes, axis_name=None, dtype=None):
        return FlaxClassifier(StockCNN(num_classes, width)).for_run(axis_name, dtype)
    return build


def test_register_model_round_trip_through_a_checkpoint(tmp_path):
    cpsc_jax.register_model("user_cnn", user_cnn(4))
    assert "user_cnn" in cpsc_jax.available_models()
    spec = ckpt_lib.ModelSpec("user_cnn", 10, 8, 1, DIGITS.mean, DIGITS.std)
    variables = ckpt_lib.init_variables(spec, jax.random.PRNGKey(0))
    ckpt_lib.save_model(str(tmp_path / "m"), spec, variables)
    loaded_spec, loaded = ckpt_lib.load_model(str(tmp_path / "m"))
    assert loaded_spec.arch == "user_cnn"
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    from cpsc_jax.training.evaluation import evaluate_checkpoint
    npz = tmp_path / "few.npz"
    np.savez(npz, data=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    assert evaluate_checkpoint(str(tmp_path / "m"), str(npz))["num_examples"] == 4

    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        cpsc_jax.register_model("user_cnn", user_cnn(8))
    with pytest.raises(ValueError, match="built-in architecture"):
        cpsc_jax.register_model("resnet18", user_cnn(8))
    # A replaced network no longer fits the checkpoint; the shape caches were dropped.
    cpsc_jax.register_model("user_cnn", user_cnn(8), replace=True)
    assert ckpt_lib.init_variables(spec, jax.random.PRNGKey(0))["params"]["Conv_0"][
        "kernel"].shape[-1] == 8
    with pytest.raises(ckpt_lib.CheckpointError, match="does not fit"):
        ckpt_lib.load_model(str(tmp_path / "m"))
    cpsc_jax.unregister_model("user_cnn")
    with pytest.raises(ckpt_lib.CheckpointError, match="unknown model 'user_cnn'"):
        ckpt_lib.load_model(str(tmp_path / "m"))


def test_command_line_tools_find_models_named_in_the_environment(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import flax.linen as nn\nimport cpsc_jax\n\n"
        "class Linear(nn.Module):\n"
        "    num_classes: int\n"
        "    @nn.compact\n"
        "    def __call__(self, x, train=False):\n"
        "        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))\n\n"
        "cpsc_jax.register_model('env_linear', lambda k, axis_name=None, dtype=None:\n"
        "                        cpsc_jax.FlaxClassifier(Linear(k)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(models_lib.PLUGIN_ENV, "my_models")
    monkeypatch.setattr(models_lib, "_plugins_loaded", False)
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    assert "env_linear" in models_lib.available_models()
    logits, feature = models_lib.get_model("env_linear", 3).init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((2,) + SHAPE), features=True)[0]
    assert logits.shape == (2, 3) and feature.shape == (2, 64)
