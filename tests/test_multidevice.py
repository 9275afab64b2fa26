"""One device and two simulated devices give the same result for the same global batch."""
import jax
import numpy as np
import pytest

from conftest import run_iterations, tiny_digits_config
from cpsc_jax.method import steps


@pytest.mark.slow
@pytest.mark.skipif(jax.local_device_count() < 2, reason="needs 2 simulated devices (conftest)")
def test_one_and_two_devices_agree_on_the_same_global_batch():
    config = tiny_digits_config()    # improved: a fresh batch and the replay memory
    assert config.student_data == "fresh+replay"
    config.loss.alpha = 0.5          # every term on, adapter present (feature widths 64 vs 128)
    config.replay_batch = 8          # and augmented student batches (tests/test_replay.py)
    config.student_augment.crop_padding = 1
    config.student_augment.flip = True
    config.student_augment.mixup = 1.0
    # Adam with eps 1e-8 takes ~lr*sign(g) steps, which turns float rounding in near-zero
    # gradients into lr-sized differences; a large eps keeps the update smooth in g.
    config.adam_eps = 1e-3
    one_state, one_metrics = run_iterations(config, 1)
    two_state, two_metrics = run_iterations(config, 2)
    np.testing.assert_array_equal(one_state.memory.labels, two_state.memory.labels)
    # bfloat16 storage: float rounding of one device count may round to the neighbouring value
    np.testing.assert_allclose(np.asarray(one_state.memory.images, np.float32),
                               np.asarray(two_state.memory.images, np.float32), rtol=8e-3,
                               atol=1e-5)
    assert set(one_metrics[0]) >= {"generator/bn", "generator/supcon", "generator/ikd", "student/kd"}
    for m1, m2 in zip(one_metrics, two_metrics):
        for k in m1:
            np.testing.assert_allclose(m1[k], m2[k], rtol=2e-4, atol=1e-5, err_msg=k)
    for name in ("student", "generator", "adapter"):
        a, b = getattr(one_state, name), getattr(two_state, name)
        np.testing.assert_allclose(
            np.concatenate([np.ravel(x) for x in jax.tree.leaves((a.params, a.batch_stats))]),
            np.concatenate([np.ravel(x) for x in jax.tree.leaves((b.params, b.batch_stats))]),
            rtol=1e-3, atol=1e-5, err_msg=name)
    assert int(one_state.step) == int(two_state.step) == 2


def test_batch_not_divisible_by_devices_is_refused():
    config = tiny_digits_config()
    config.batch_size = 15
    nets = steps.build_networks(config, config.teacher.arch)
    with pytest.raises(ValueError, match="not divisible by 2 devices"):
        steps.make_train_iteration(nets, config, 2)
