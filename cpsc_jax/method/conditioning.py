"""What conditions the generator: each generator loss term's pull on the class embeddings.

`conditioning_gradients` evaluates the generator objective (`cpsc_jax.method.objectives`) on one
batch and returns, per weighted term and for their sum:

  emb_norm     gradient norm on the class embeddings (gamma and beta of every conditional BN:
               the only parameters through which the label y enters the image); also per
               conditional BN layer (bn0 after the first linear layer ... the last, after the
               tanh) in emb_norm_by_layer
  all_norm     gradient norm on all generator parameters
  emb_cos      cosine between the term's embedding gradient and the total's
  sign_agree   fraction of embedding coordinates with a non-zero total gradient whose sign the
               term shares: with the released per-step Adam reset every coordinate moves by
               about lr * sign(total gradient), so a term only steers the coordinates where it
               decides the sign

and, for the cross-entropy on the teacher, the gradient norm per image on the teacher's logits
in its configured form and in the other form, split by whether the teacher already agrees with
the requested label (`ce_logit_grad`): the double softmax saturates where the teacher is sure of
another class.
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax.method import losses, objectives
from cpsc_jax.dtypes import at_least_float32


def _embedding_mask(params):
    """True at the leaves of the conditional BNs' per-class tables (gamma, beta)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path).endswith(("['gamma']", "['beta']")), params)


def _norm(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves)) if leaves else jnp.zeros(())


def _flat(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.concatenate([jnp.ravel(x) for x in leaves]) if leaves else jnp.zeros((0,))


def make_conditioning_gradients(nets, config):
    """A jitted `fn(gen_params, gen_stats, student_vars, adapter_params, teacher_vars, z, y)`
    -> dict of figures. `nets` must be built without an axis name (one device)."""
    w = config.loss

    def parts_fn(g_params, gen_stats, student_vars, adapter_params, teacher_vars, z, y):
        x, _ = nets.generator.apply({"params": g_params, "batch_stats": gen_stats}, z, y,
                                    train=True, mutable=["batch_stats"])
        parts, _, _ = objectives.generator_objective(nets, w, teacher_vars, x, y, student_vars,
                                                     adapter_params, None)
        return parts

    @jax.jit
    def fn(g_params, gen_stats, student_vars, adapter_params, teacher_vars, z, y):
        args = (gen_stats, student_vars, adapter_params, teacher_vars, z, y)
        names = list(parts_fn(g_params, *args))
        mask = _embedding_mask(g_params)
        emb = lambda g: jax.tree.map(lambda m, x: x if m else jnp.zeros_like(x), mask, g)
        grads = {n: jax.grad(lambda p, n=n: parts_fn(p, *args)[n])(g_params) for n in names}
        grads["total"] = jax.tree.map(lambda *g: sum(g), *[grads[n] for n in names])
        total_emb = _flat(emb(grads["total"]))
        nonzero = total_emb != 0
        out = {}
        for n, g in grads.items():
            e = _flat(emb(g))
            per_layer = {layer: _norm({k: v for k, v in g[layer].items() if k in ("gamma", "beta")})
                         for layer in g if isinstance(g[layer], dict) and "gamma" in g[layer]}
            out[n] = {
                "emb_norm": _norm(emb(g)), "all_norm": _norm(g), "emb_norm_by_layer": per_layer,
                "emb_cos": jnp.dot(e, total_emb) / jnp.maximum(
                    jnp.linalg.norm(e) * jnp.linalg.norm(total_emb), 1e-30),
                "sign_agree": jnp.sum((jnp.sign(e) == jnp.sign(total_emb)) & nonzero)
                / jnp.maximum(jnp.sum(nonzero), 1)}
        # The teacher-CE gradient on the teacher's logits, per image, in both forms.
        x, _ = nets.generator.apply({"params": g_params, "batch_stats": gen_stats}, z, y,
                                    train=True, mutable=["batch_stats"])
        t = at_least_float32(nets.teacher.apply(teacher_vars, x, train=False))
        agrees = jnp.argmax(t, -1) == y
        ce = {}
        for form in ("double_softmax", "plain"):
            g = jax.vmap(jax.grad(lambda ti, yi: losses.cross_entropy_loss(
                ti[None], yi[None], form)))(t, y)
            per_image = jnp.linalg.norm(g, axis=-1)
            ce[form] = {
                "agrees": jnp.sum(jnp.where(agrees, per_image, 0)) / jnp.maximum(jnp.sum(agrees), 1),
                "disagrees": jnp.sum(jnp.where(agrees, 0, per_image))
                / jnp.maximum(jnp.sum(~agrees), 1)}
        out["ce_logit_grad"] = ce
        out["teacher_agrees"] = jnp.mean(agrees)
        return out

    return fn


def conditioning_gradients(fn, state, teacher_vars, config, rng) -> Dict[str, Any]:
    """Runs `fn` (from `make_conditioning_gradients`) on one fresh batch; plain floats."""
    k_z, k_y = jax.random.split(rng)
    z = jax.random.normal(k_z, (config.batch_size, config.generator.nz))
    y = jax.random.randint(k_y, (config.batch_size,), 0, config.num_classes)
    adapter = state.adapter.params if state.adapter is not None else None
    out = fn(state.generator.params, state.generator.batch_stats,
             {"params": state.student.params, "batch_stats": state.student.batch_stats},
             adapter, teacher_vars, z, y)
    return jax.tree.map(lambda v: round(float(np.asarray(v)), 6), jax.device_get(out))


def flatten(figures: Dict[str, Any], prefix: str = "conditioning") -> Dict[str, float]:
    """{'conditioning/ce/emb_norm': ..., ...} for metrics.jsonl."""
    out = {}
    for k, v in figures.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}/{k}"))
        else:
            out[f"{prefix}/{k}"] = v
    return out
