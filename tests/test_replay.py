"""The replay memory of the student phase (cpsc_jax.method.replay, config.student_data='replay')."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_iterations, tiny_digits_config
from cpsc_jax.method import replay, steps


def replay_config(**overrides):
    c = tiny_digits_config("conditioned")
    c.student_data = "replay"
    c.replay_size = 3 * c.batch_size
    for k, v in overrides.items():
        c[k] = v
    return c


def test_the_memory_is_a_ring_of_the_last_images_written():
    c = replay_config()
    mem = replay.create(c)
    assert mem.images.shape == (48, 8, 8, 1) and int(mem.count) == 0
    batches = [jnp.full((16, 8, 8, 1), float(i)) for i in range(4)]
    for i, b in enumerate(batches):
        mem = replay.write(mem, b, jnp.full((16,), i))
    # The fourth batch overwrote the first; the others stay where they were written.
    np.testing.assert_array_equal(np.asarray(mem.images[:, 0, 0, 0]),
                                  np.repeat([3.0, 1.0, 2.0], 16))
    np.testing.assert_array_equal(np.asarray(mem.labels), np.repeat([3, 1, 2], 16))
    assert int(mem.count) == 64


def test_sampling_draws_only_written_images_and_slices_a_global_draw():
    c = replay_config()
    mem = replay.write(replay.create(c), jnp.arange(16.0)[:, None, None, None] * jnp.ones((16, 8, 8, 1)),
                       jnp.arange(16))
    x, y = replay.sample(mem, jax.random.PRNGKey(0), 256, 0, 256)
    # Only the 16 written rows (not the zeros after them), each image with its own label.
    np.testing.assert_array_equal(np.asarray(x[:, 0, 0, 0]), np.asarray(y, np.float32))
    assert set(np.asarray(y).tolist()) <= set(range(16)) and len(set(np.asarray(y).tolist())) > 8
    halves = [replay.sample(mem, jax.random.PRNGKey(0), 256, s, 128)[1] for s in (0, 128)]
    np.testing.assert_array_equal(np.concatenate(halves), np.asarray(y))


def test_default_size_is_one_epoch_of_generator_output():
    c = replay_config(replay_size=0)
    assert replay.memory_size(c) == c.epoch_itrs * c.g_steps * c.batch_size
    assert replay.create(tiny_digits_config("conditioned")) is None   # fresh images: no memory


def _run(config, num_devices=1, n_iters=2):
    state, history = run_iterations(config, num_devices, n_iters)
    return steps.build_networks(config, config.teacher.arch), state, history[-1]


@pytest.fixture(scope="module")
def fresh_plus_replay():
    """One iteration (2 generator steps, 2 student steps) of fresh+replay with a pool that
    holds all it writes: (config, networks, state, metrics), shared by the tests below."""
    c = replay_config(student_data="fresh+replay", replay_size=8 * 16, replay_batch=8)
    return (c,) + _run(c, n_iters=1)


@pytest.mark.slow
def test_generator_steps_store_their_images_and_labels(fresh_plus_replay):
    c, nets, state, _ = fresh_plus_replay
    init = steps.init_state(nets, c, jax.random.PRNGKey(0))
    keys = steps.phase_keys(init.rng, 0, "generator", c.g_steps)
    # The first generator step's images: G(z, y) with the generator's initial parameters.
    z, y = steps.sample_conditioning(keys[0], c, 0, 1)
    x = jax.jit(lambda v, z, y: nets.generator.clone(axis_name=None).apply(
        v, z, y, train=True, mutable=["batch_stats"])[0])(
        {"params": init.generator.params, "batch_stats": init.generator.batch_stats}, z, y)
    np.testing.assert_array_equal(state.memory.labels[:16], np.asarray(y))
    assert state.memory.images.dtype == jnp.bfloat16   # stored compactly
    np.testing.assert_allclose(np.asarray(state.memory.images[:16], np.float32), np.asarray(x),
                               rtol=8e-3, atol=1e-5)
    _, y2 = steps.sample_conditioning(keys[1], c, 0, 1)   # the second step's, after it
    np.testing.assert_array_equal(state.memory.labels[16:32], np.asarray(y2))
    written = (c.g_steps + c.s_steps) * c.batch_size
    assert np.all(state.memory.images[written:] == 0)   # not written yet


@pytest.mark.slow
def test_replay_student_steps_do_not_move_the_generator_statistics():
    """Fresh student steps run G in training mode (its running averages move, released code);
    replayed ones do not run G at all."""
    c = replay_config()
    c.g_steps, c.s_steps = 1, 0
    c_g = replay_config(g_steps=1, s_steps=3)
    _, only_g, _ = _run(c, n_iters=1)
    _, with_s, m = _run(c_g, n_iters=1)
    for a, b in zip(jax.tree.leaves(only_g.generator.batch_stats),
                    jax.tree.leaves(with_s.generator.batch_stats)):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(m["student/kd"])


@pytest.mark.slow
def test_fresh_plus_replay_trains_on_both_and_stores_every_fresh_batch(fresh_plus_replay):
    c, nets, state, m = fresh_plus_replay
    # Each generator step and each student step's fresh batch went in.
    assert int(state.memory.count) == (c.g_steps + c.s_steps) * c.batch_size
    assert np.isfinite(m["student/kd"])
    # The student's first step saw the fresh batch that the memory then holds after G's images.
    init = steps.init_state(nets, c, jax.random.PRNGKey(0))
    key = steps.phase_keys(init.rng, 0, "student", c.s_steps)[0]
    _, y = steps.sample_conditioning(key, c, 0, 1)
    np.testing.assert_array_equal(state.memory.labels[32:48], np.asarray(y))
    c_bad = replay_config(student_data="fresh+replay", replay_batch=3)
    from cpsc_jax.config.validation import validate_config
    with pytest.raises(ValueError, match="replay_batch must be 0"):
        validate_config(c_bad, num_devices=2)


@pytest.mark.slow
def test_generator_reinit_draws_a_new_generator_and_keeps_the_rest(fresh_plus_replay):
    c, nets, state, _ = fresh_plus_replay
    again = steps.reinit_generator(nets, c, state, 1)
    other = steps.reinit_generator(nets, c, state, 2)
    fresh = steps.init_state(nets, c, jax.random.PRNGKey(0)).generator
    for a, b, f, o in zip(jax.tree.leaves(state.generator.params),
                          jax.tree.leaves(again.generator.params),
                          jax.tree.leaves(fresh.params), jax.tree.leaves(other.generator.params)):
        assert a.shape == b.shape == f.shape
    moved = lambda x, y: any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x),
                                                                      jax.tree.leaves(y)))
    assert moved(state.generator.params, again.generator.params)
    assert moved(again.generator.params, other.generator.params)   # epoch-dependent draw
    assert int(again.generator.step) == 0
    # The same tree structure (the optimizer object included): the compiled iteration runs it
    # without compiling again.
    assert jax.tree.structure(again) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves((state.student, state.memory)),
                    jax.tree.leaves((again.student, again.memory))):
        np.testing.assert_array_equal(a, b)


def test_student_gradient_clipping_bounds_the_first_update():
    """With clipping, SGD's first step (no momentum yet) moves the student by at most
    lr * (clip + weight decay * |w|)."""
    import optax
    from cpsc_jax.method.optimizers import student_optimizer
    c = replay_config(student_data="fresh")
    c.student_grad_clip = 0.5
    c.weight_decay = 0.0
    c.student_schedule = "per_epoch"
    params = {"w": jnp.ones((4,))}
    grads = {"w": jnp.full((4,), 100.0)}
    tx = student_optimizer(c, 1)
    update, _ = tx.update(grads, tx.init(params), params)
    lr = float(update["w"][0] / -(0.5 / 2.0))   # clipped gradient: 0.5 * g / |g| = 0.25 each
    assert lr > 0 and np.isclose(float(optax.tree.norm(update)), lr * 0.5, rtol=1e-5)
    c.student_grad_clip = 0.0
    tx = student_optimizer(c, 1)
    raw, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(raw["w"], update["w"] * 400.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 simulated devices (conftest)")
def test_one_and_two_devices_agree_with_replay_and_augmentation():
    """Student steps from the memory alone; a fresh batch beside it is
    tests/test_multidevice.py's case."""
    c = replay_config(student_data="replay", replay_batch=8)
    c.student_augment.crop_padding = 1
    c.student_augment.flip = True
    c.student_augment.mixup = 1.0
    c.adam_eps = 1e-3   # see test_multidevice: keeps Adam's update smooth in the gradient
    _, one, m1 = _run(c, 1)
    _, two, m2 = _run(c, 2)
    np.testing.assert_array_equal(one.memory.labels, two.memory.labels)
    # bfloat16 storage: float rounding of one device count may round to the neighbouring value
    np.testing.assert_allclose(np.asarray(one.memory.images, np.float32),
                               np.asarray(two.memory.images, np.float32), rtol=8e-3, atol=1e-5)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=2e-4, atol=1e-5, err_msg=k)
    # Two steps on mixed, augmented replays: one device count's summation order moves a
    # parameter near 0.01 by a few 1e-5.
    for a, b in zip(jax.tree.leaves(one.student.params), jax.tree.leaves(two.student.params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5)


def test_a_ring_whose_size_is_not_a_batch_multiple_wraps_around():
    c = replay_config(replay_size=40)
    mem = replay.create(c)
    for i in range(3):   # 48 images into 40 slots: the third batch wraps to slots 32..39, 0..7
        mem = replay.write(mem, jnp.full((16, 8, 8, 1), float(i)), jnp.full((16,), i))
    np.testing.assert_array_equal(np.asarray(mem.labels),
                                  np.concatenate([np.full(8, 2), np.full(8, 0), np.full(16, 1),
                                                  np.full(8, 2)]))
    assert int(mem.count) == 48
