"""The CPSC-DFKD loss terms (spec section 3). Pure functions of logits, features and labels.

Terms that are not linear in the batch (log-IKD, SupCon) take `axis_name`: under pmap they are
computed on the global batch, so one device and several devices give the same loss.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from cpsc_jax.config.validation import CE_FORMS
from cpsc_jax.dtypes import at_least_float32


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch, times T^2
    (Hinton et al.: gradients of the same size at any T). T = 1 is the released loss."""
    t = at_least_float32(teacher_logits) / temperature
    s = at_least_float32(student_logits) / temperature
    log_p_t = jax.nn.log_softmax(t, -1)
    log_p_s = jax.nn.log_softmax(s, -1)
    kl = jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1))
    return kl if temperature == 1.0 else kl * temperature ** 2


def _global_mean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def ikd_generator_loss(student_logits, teacher_logits, form: str, axis_name: Optional[str] = None):
    """Generator-phase logit distance: -log(mean((s-t)^2)) ('log') or -mean((s-t)^2) ('mse').

    The teacher's logits are a constant here, as in the released code (it detaches them in this
    term only): the gradient reaches the generator through the student alone."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    mse = _global_mean(jnp.mean(jnp.square(student_logits - teacher_logits)), axis_name)
    if form == "log":
        return -jnp.log(mse)
    if form == "mse":
        return -mse
    raise ValueError(f"ikd_form must be 'log' or 'mse', got {form!r}")


def ikd_student_loss(student_logits, teacher_logits, form: str, axis_name: Optional[str] = None):
    """Student-phase logit distance: log(||t-s||_F) over the whole batch ('log'), or mean((s-t)^2)."""
    sq = jnp.square(teacher_logits - student_logits)
    if form == "log":
        total = jnp.sum(sq) if axis_name is None else jax.lax.psum(jnp.sum(sq), axis_name)
        return 0.5 * jnp.log(total)   # log of the Frobenius norm, without a sqrt at 0
    if form == "mse":
        return _global_mean(jnp.mean(sq), axis_name)
    raise ValueError(f"ikd_form must be 'log' or 'mse', got {form!r}")


def bn_statistics_loss(batch_moments, running_stats):
    """DeepInversion feature-statistics loss: sum over BN layers of
    ||var_batch - running_var||_2 + ||mean_batch - running_mean||_2 (plain norms, not squared).

    Both arguments are trees of the same layout as the teacher's `batch_stats` ({..: {mean, var}});
    `batch_moments` comes from the `bn_moments` collection of a forward pass.
    """
    per_leaf = jax.tree.map(lambda m, r: jnp.linalg.norm(m - r), batch_moments, running_stats)
    return sum(jax.tree.leaves(per_leaf))


def supcon_loss(features, labels, temperature: float = 0.07, base_temperature: float = 0.07):
    """Supervised contrastive loss (Khosla et al. 2020) over N unit vectors with labels [N].

    Each vector is an anchor; its positives are the other vectors with its label; its denominator
    runs over all N-1 other vectors. Built from an [N, N] label mask, no loop.
    """
    features = at_least_float32(features)
    n = features.shape[0]
    logits = features @ features.T / temperature
    not_self = ~jnp.eye(n, dtype=bool)
    # Subtracting the row max does not change the log-softmax; it keeps exp() finite.
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    log_denominator = jax.nn.logsumexp(jnp.where(not_self, logits, -jnp.inf), axis=1, keepdims=True)
    log_prob = logits - log_denominator
    positives = (labels[:, None] == labels[None, :]) & not_self
    n_pos = jnp.sum(positives, axis=1)
    mean_log_prob_pos = jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
    return -(temperature / base_temperature) * jnp.mean(mean_log_prob_pos)


def two_view_supcon_loss(student_view, teacher_view, labels, temperature: float = 0.07,
                         base_temperature: float = 0.07, axis_name: Optional[str] = None):
    """SupCon with v1 = student feature, v2 = teacher feature of the same images (both unit norm).

    Under pmap the views and labels of every device are gathered so the contrast set is the global
    batch; each device then holds the same (global) loss.
    """
    if axis_name is not None:
        gather = lambda a: jax.lax.all_gather(a, axis_name, tiled=True)
        student_view, teacher_view, labels = gather(student_view), gather(teacher_view), gather(labels)
    features = jnp.concatenate([student_view, teacher_view], axis=0)
    return supcon_loss(features, jnp.concatenate([labels, labels]), temperature, base_temperature)


def cross_entropy_loss(logits, labels, form: str):
    """CE of the pseudo-labels, batch mean.

    'double_softmax': the released code (softmax fed to a CE that applies softmax again; its
    gradient vanishes where the network is sure of another class). 'plain': CE on the logits.
    'disagreeing': plain CE counted only on the images whose argmax is not yet the label (zero
    once it is): it pulls each image into its class without pushing it on towards the class's
    most confident prototype."""
    logits = at_least_float32(logits)
    if form == "double_softmax":
        logits = jax.nn.softmax(logits, -1)
    elif form not in ("plain", "disagreeing"):
        raise ValueError(f"ce_form must be one of {', '.join(CE_FORMS)}, got {form!r}")
    log_p = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    if form == "disagreeing":
        nll = jnp.where(jnp.argmax(logits, -1) != labels, nll, 0.0)
    return jnp.mean(nll)


def l2_normalize(x, eps: float = 1e-12):
    x = at_least_float32(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
