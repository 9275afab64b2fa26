"""Random crops after padding and flips (cpsc_jax.training.augment), for real and synthetic images."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpsc_jax.training.augment import mixup, random_crop_flip


def images(n=6, size=5, channels=2):
    return jnp.asarray(np.random.RandomState(0).rand(n, size, size, channels), jnp.float32)


def windows(padded, size):
    return [padded[i:i + size, j:j + size] for i in range(padded.shape[0] - size + 1)
            for j in range(padded.shape[1] - size + 1)]


def test_no_padding_no_flip_is_the_identity():
    x = images()
    chex.assert_trees_all_equal(random_crop_flip(jax.random.PRNGKey(0), x, 0, False), x)


def test_flips_mirror_some_images_horizontally_and_leave_the_rest():
    x = images(n=32)
    flipped = np.asarray(random_crop_flip(jax.random.PRNGKey(0), x, 0, True))
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, np.asarray(x))]
    kept = [np.array_equal(a, b) for a, b in zip(flipped, np.asarray(x))]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 0 < sum(mirrored) < 32


@pytest.mark.parametrize("mode", ["constant", "edge"])
def test_each_crop_is_a_window_of_the_padded_image(mode):
    x = images()
    cropped = np.asarray(random_crop_flip(jax.random.PRNGKey(3), x, 2, False, mode))
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode=mode)
    assert cropped.shape == x.shape
    for a, p in zip(cropped, padded):
        assert any(np.array_equal(a, w) for w in windows(p, 5))
    # Several offsets occur (a fixed offset would pass the window check too).
    assert len({np.asarray(a).tobytes() for a in cropped}) == len(cropped)


def test_edge_padding_repeats_the_border_instead_of_zeros():
    x = jnp.full((64, 4, 4, 1), -0.4, jnp.float32)   # a synthetic background below zero
    out = np.asarray(random_crop_flip(jax.random.PRNGKey(1), x, 2, False, "edge"))
    np.testing.assert_array_equal(out, np.float32(-0.4))
    zero_padded = np.asarray(random_crop_flip(jax.random.PRNGKey(1), x, 2, False, "constant"))
    assert (zero_padded == 0).any()


def test_a_slice_of_a_global_batch_is_augmented_as_in_the_whole_batch():
    x = images(n=8)
    key = jax.random.PRNGKey(5)
    whole = random_crop_flip(key, x, 1, True, "edge")
    halves = [random_crop_flip(key, x[s:s + 4], 1, True, "edge", batch_size=8, start=s)
              for s in (0, 4)]
    chex.assert_trees_all_equal(jnp.concatenate(halves), whole)


def test_mixup_blends_each_row_mostly_with_itself_against_a_permuted_partner():
    g = images(n=16)
    rows = jnp.arange(16)
    out = np.asarray(mixup(jax.random.PRNGKey(2), g, rows, 1.0))
    flat, own = out.reshape(16, -1), np.asarray(g).reshape(16, -1)
    partners = []
    for i in range(16):
        if np.allclose(flat[i], own[i], atol=1e-6):   # partnered with itself: unchanged
            partners.append(i)
            continue
        # out = lam * own + (1 - lam) * partner for exactly one partner row and lam in [0.5, 1]
        fits = []
        for j in range(16):
            d = own[i] - own[j]
            if not np.any(d):
                continue
            lam = float(np.dot(flat[i] - own[j], d) / np.dot(d, d))
            if np.allclose(lam * own[i] + (1 - lam) * own[j], flat[i], atol=1e-5):
                fits.append((j, lam))
        (j, lam), = fits
        assert 0.5 - 1e-5 <= lam <= 1 + 1e-5
        partners.append(j)
    assert sorted(partners) == list(range(16))   # a permutation of the batch
    assert not np.allclose(out, np.asarray(g))


def test_mixup_rows_of_a_global_batch_match_the_whole_batch():
    g = images(n=8)
    key = jax.random.PRNGKey(4)
    whole = mixup(key, g, jnp.arange(8), 0.4)
    halves = [mixup(key, g, jnp.arange(s, s + 4), 0.4) for s in (0, 4)]
    chex.assert_trees_all_equal(jnp.concatenate(halves), whole)
