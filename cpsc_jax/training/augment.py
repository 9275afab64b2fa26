"""Image augmentation on device: random crops after padding, horizontal flips, mixup.

Used by teacher training (real images, zero padding) and by the distillation's student phase
(`config.student_augment`: synthetic images in the classifiers' normalised space, padded with
their edge pixels so that the border stays background). Random draws are made for a whole global
batch and each device takes its rows, so any number of devices augments alike.
"""
import jax
import jax.numpy as jnp


def random_crop_flip(rng, x, padding: int, flip: bool, pad_mode: str = "constant",
                     batch_size: int = 0, start=0, rows=None):
    """Per-image random crop after `padding` pixels of padding, and horizontal flips.

    The offsets and flips are drawn for a batch of `batch_size` images (default: len(x)) of which
    `x` holds rows start .. start + len(x) (or the global rows `rows`), so a device's share of a
    global batch is augmented as it would be on one device holding the whole batch.
    """
    b, h, w, c = x.shape
    total = batch_size or b
    rows = start + jnp.arange(b) if rows is None else rows
    k_crop, k_flip = jax.random.split(rng)
    if padding:
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(k_crop, (total, 2), 0, 2 * padding + 1)[rows]
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(
            xp, offsets)
    if flip:
        mask = jax.random.bernoulli(k_flip, 0.5, (total, 1, 1, 1))[rows]
        x = jnp.where(mask, x[:, :, ::-1, :], x)
    return x


def mixup(rng, global_x, rows, alpha: float):
    """Rows `rows` of the global batch `global_x`, each mixed with a partner row drawn by one
    permutation of the whole batch: lam * own + (1 - lam) * partner, lam = max(l, 1 - l) with
    l ~ Beta(alpha, alpha), so each image stays mostly itself and keeps its label. The teacher
    labels the mixed images afresh, so the student learns its answers between classes."""
    total = global_x.shape[0]
    k_perm, k_lam = jax.random.split(rng)
    partner = jax.random.permutation(k_perm, total)[rows]
    lam = jax.random.beta(k_lam, alpha, alpha, (total,))[rows]
    lam = jnp.maximum(lam, 1.0 - lam).astype(global_x.dtype).reshape((-1,) + (1,) * (global_x.ndim - 1))
    return lam * global_x[rows] + (1.0 - lam) * global_x[partner]
