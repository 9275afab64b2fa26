"""The CPSC-DFKD iteration: G_steps generator steps then S_steps student steps (spec section 4),
in one jitted, pmapped function: one dispatch per iteration, no host sync inside.

Train state goes in and out unreplicated (`in_axes=None`, `out_axes=None`); each device draws its
slice of the same global batch of (z, y), and gradients, BatchNorm moments, losses and metrics are
global-batch quantities, so any device count gives the same result for the same global batch.
"""
import dataclasses
import functools
from typing import Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax import losses
from cpsc_jax.dtypes import at_least_float32
from cpsc_jax.models import BN_MOMENTS, ConditionalGenerator, FeatureAdapter, get_model
from cpsc_jax.train_state import (TrainState, adapter_optimizer, generator_optimizer,
                                  student_optimizer)

AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Networks:
    """The four networks of a run (Flax modules are stateless descriptions)."""

    generator: ConditionalGenerator
    student: nn.Module
    teacher: nn.Module
    adapter: Optional[FeatureAdapter]


@flax.struct.dataclass
class DistillState:
    step: jax.Array              # iterations done
    rng: jax.Array               # base key; iteration i uses fold_in(rng, i)
    generator: TrainState
    student: TrainState
    adapter: Optional[TrainState]


def build_networks(config, teacher_arch: str, feature_dims: Optional[Tuple[int, int]] = None,
                   axis_name: Optional[str] = AXIS) -> Networks:
    """Networks for distillation. `feature_dims` = (student, teacher) feature widths; an adapter
    is added when they differ."""
    dtype = jnp.bfloat16 if config.mixed_precision else None
    k = config.num_classes
    gen = ConditionalGenerator(k, config.image_size, config.channels, config.generator.nz,
                               config.generator.ngf, config.generator.num_upsamples,
                               axis_name=axis_name, dtype=dtype)
    student = get_model(config.student.arch, k, axis_name=axis_name, dtype=dtype)
    teacher = get_model(teacher_arch, k, axis_name=axis_name, dtype=dtype)
    if feature_dims is None:
        feature_dims = (feature_dim(student, config), feature_dim(teacher, config))
    d_s, d_t = feature_dims
    adapter = FeatureAdapter(d_s, d_t) if d_s != d_t else None
    return Networks(gen, student, teacher, adapter)


def feature_dim(model: nn.Module, config) -> int:
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    unbound = model.clone(axis_name=None)
    shapes = jax.eval_shape(lambda: unbound.init_with_output(jax.random.PRNGKey(0), x, features=True))
    return shapes[0][1].shape[-1]


def init_state(nets: Networks, config, rng) -> DistillState:
    """Fresh generator, student and adapter states (initialised outside pmap, no axis)."""
    k_gen, k_stu, k_ada, k_run = jax.random.split(rng, 4)
    x = jnp.zeros((2, config.image_size, config.image_size, config.channels), jnp.float32)
    gen = nets.generator.clone(axis_name=None)
    g_vars = gen.init(k_gen, jnp.zeros((2, config.generator.nz)), jnp.zeros((2,), jnp.int32))
    s_vars = nets.student.clone(axis_name=None).init(k_stu, x)
    generator = TrainState.create(apply_fn=nets.generator.apply, params=g_vars["params"],
                                  batch_stats=g_vars["batch_stats"], tx=generator_optimizer(config))
    student = TrainState.create(apply_fn=nets.student.apply, params=s_vars["params"],
                                batch_stats=s_vars.get("batch_stats", {}),
                                tx=student_optimizer(config, config.s_steps))
    adapter = None
    if nets.adapter is not None:
        a_vars = nets.adapter.init(k_ada, jnp.zeros((2, nets.adapter.hidden)))
        adapter = TrainState.create(apply_fn=nets.adapter.apply, params=a_vars["params"],
                                    tx=adapter_optimizer(config))
    return DistillState(jnp.zeros((), jnp.int32), k_run, generator, student, adapter)


def sample_conditioning(rng, config, device_index, num_devices: int):
    """This device's slice of a global batch of latents z ~ N(0, I) and labels y ~ U{0..K-1}."""
    k_z, k_y = jax.random.split(rng)
    z = jax.random.normal(k_z, (config.batch_size, config.generator.nz), jnp.float32)
    y = jax.random.randint(k_y, (config.batch_size,), 0, config.num_classes)
    local = config.batch_size // num_devices
    start = device_index * local
    return (jax.lax.dynamic_slice_in_dim(z, start, local),
            jax.lax.dynamic_slice_in_dim(y, start, local))


def _generate(nets, gen: TrainState, params, z, y):
    x, updates = nets.generator.apply({"params": params, "batch_stats": gen.batch_stats}, z, y,
                                      train=True, mutable=["batch_stats"])
    return x, updates["batch_stats"]


def generator_step(nets: Networks, config, num_devices: int, teacher_vars, device_index,
                   carry, rng):
    """One generator update: minimise -KD + a*IKD_G + b*BN + g*SupCon + e*CE(teacher)."""
    gen, stu, ada = carry
    w = config.loss
    z, y = sample_conditioning(rng, config, device_index, num_devices)

    def loss_fn(g_params, a_params):
        x, g_stats = _generate(nets, gen, g_params, z, y)
        if w.beta > 0:
            (t_logits, t_feat), t_cols = nets.teacher.apply(
                teacher_vars, x, train=False, features=True, mutable=[BN_MOMENTS])
        else:
            t_logits, t_feat = nets.teacher.apply(teacher_vars, x, train=False, features=True)
        # Student in training mode: its BN running averages see these batches too (released code).
        (s_logits, s_feat), s_updates = nets.student.apply(
            {"params": stu.params, "batch_stats": stu.batch_stats}, x, train=True, features=True,
            mutable=["batch_stats"])
        t_logits, s_logits = at_least_float32(t_logits), at_least_float32(s_logits)
        terms, loss = {}, 0.0
        if w.kd > 0:
            terms["kd"] = losses.kd_loss(s_logits, t_logits)
            loss -= w.kd * terms["kd"]
        if w.alpha > 0:
            terms["ikd"] = losses.ikd_generator_loss(s_logits, t_logits, w.ikd_form, AXIS)
            loss += w.alpha * terms["ikd"]
        if w.beta > 0:
            terms["bn"] = losses.bn_statistics_loss(t_cols[BN_MOMENTS], teacher_vars["batch_stats"])
            loss += w.beta * terms["bn"]
        if w.gamma > 0:
            v_s = losses.l2_normalize(s_feat)
            if nets.adapter is not None:
                # The head's raw output is the student's view (released code: not normalised again).
                v_s = nets.adapter.apply({"params": a_params}, v_s)
            terms["supcon"] = losses.two_view_supcon_loss(
                v_s, losses.l2_normalize(t_feat), y, w.temperature, w.base_temperature, AXIS)
            loss += w.gamma * terms["supcon"]
        if w.eta > 0:
            terms["ce"] = losses.cross_entropy_loss(t_logits, y, w.ce_form)
            loss += w.eta * terms["ce"]
        terms["teacher_agrees"] = jnp.mean(jnp.argmax(t_logits, -1) == y)
        return loss, (terms, g_stats, s_updates.get("batch_stats", {}))

    a_params = ada.params if ada is not None else None
    train_adapter = ada is not None and config.adapter_optimizer != "frozen"
    (loss, (terms, g_stats, s_stats)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1) if train_adapter else 0, has_aux=True)(gen.params, a_params)
    g_grads, a_grads = jax.lax.pmean(grads if train_adapter else (grads, None), AXIS)
    if config.generator_optimizer == "reset":
        # Released behaviour: a new Adam every step, so each update is a fresh bias-corrected step.
        gen = gen.replace(opt_state=gen.tx.init(gen.params))
    gen = gen.apply_gradients(grads=g_grads, batch_stats=g_stats)
    stu = stu.replace(batch_stats=s_stats)
    if train_adapter:
        ada = ada.apply_gradients(grads=a_grads)
    metrics = jax.lax.pmean({"loss": loss, **terms}, AXIS)
    return (gen, stu, ada), metrics


def student_step(nets: Networks, config, num_devices: int, teacher_vars, device_index,
                 carry, rng):
    """One student update on fresh synthetic images: KD + a*IKD_S + e*CE(student)."""
    gen, stu, ada = carry
    w = config.loss
    z, y = sample_conditioning(rng, config, device_index, num_devices)
    x, g_stats = _generate(nets, gen, gen.params, z, y)  # G stays in training mode
    x = jax.lax.stop_gradient(x)
    t_logits = at_least_float32(nets.teacher.apply(teacher_vars, x, train=False))

    def loss_fn(s_params):
        s_logits, updates = nets.student.apply({"params": s_params, "batch_stats": stu.batch_stats},
                                               x, train=True, mutable=["batch_stats"])
        s_logits = at_least_float32(s_logits)
        terms, loss = {}, 0.0
        if w.kd > 0:
            terms["kd"] = losses.kd_loss(s_logits, t_logits)
            loss += w.kd * terms["kd"]
        if w.alpha > 0:
            terms["ikd"] = losses.ikd_student_loss(s_logits, t_logits, w.ikd_form, AXIS)
            loss += w.alpha * terms["ikd"]
        if w.eta > 0:
            terms["ce"] = losses.cross_entropy_loss(s_logits, y, w.ce_form)
            loss += w.eta * terms["ce"]
        terms["agreement"] = jnp.mean(jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1))
        return loss, (terms, updates.get("batch_stats", {}))

    (loss, (terms, s_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(stu.params)
    grads = jax.lax.pmean(grads, AXIS)
    stu = stu.apply_gradients(grads=grads, batch_stats=s_stats)
    gen = gen.replace(batch_stats=g_stats)
    metrics = jax.lax.pmean({"loss": loss, **terms}, AXIS)
    return (gen, stu, ada), metrics


PHASES = ("generator", "student")


def phase_keys(rng, step, phase: str, num_steps: int):
    """The keys of the `num_steps` steps of `phase` in iteration `step` (one per step; each
    draws that step's (z, y) with `sample_conditioning`)."""
    key = jax.random.fold_in(rng, step)
    return jax.random.split(jax.random.fold_in(key, PHASES.index(phase)), num_steps)


def make_train_iteration(nets: Networks, config, num_devices: int, donate: bool = True,
                         g_steps: Optional[int] = None, s_steps: Optional[int] = None):
    """Returns `iteration(state, teacher_vars, device_ids) -> (state, metrics)`, pmapped.

    `device_ids` is `np.arange(num_devices)` (the only mapped argument). One iteration runs
    `g_steps` generator steps then `s_steps` student steps (default: the config's; 0 skips a
    phase, which is how the benchmark times each phase alone). Metrics are means over the steps
    of each phase, prefixed `generator/` and `student/`.
    """
    if config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_devices} devices")
    unroll = scan_unroll(config)
    counts = {"generator": config.g_steps if g_steps is None else g_steps,
              "student": config.s_steps if s_steps is None else s_steps}
    step_fns = {"generator": generator_step, "student": student_step}

    def iteration(state: DistillState, teacher_vars, device_index):
        carry = (state.generator, state.student, state.adapter)
        metrics = {}
        for phase in PHASES:
            if not counts[phase]:
                continue
            keys = phase_keys(state.rng, state.step, phase, counts[phase])
            step = functools.partial(step_fns[phase], nets, config, num_devices, teacher_vars,
                                     device_index)
            carry, phase_metrics = repeat_steps(step, carry, keys, unroll)
            metrics.update({f"{phase}/{k}": jnp.mean(v) for k, v in phase_metrics.items()})
        gen, stu, ada = carry
        new_state = state.replace(step=state.step + 1, generator=gen, student=stu, adapter=ada)
        return new_state, metrics

    return jax.pmap(iteration, axis_name=AXIS, in_axes=(None, None, 0), out_axes=(None, None),
                    donate_argnums=(0,) if donate else ())


def scan_unroll(config) -> bool:
    """`config.scan_unroll`: 0 (auto) and 1 run the steps in a lax.scan, 2 traces them one
    after another.

    lax.scan compiles one step body instead of G_steps + S_steps copies (released cifar10 config
    on CPU: 14 s instead of 109 s) at about the same speed per iteration, now that the models'
    convs emit standard-form gradients on CPU (`cpsc_jax.models.conv`; figures in
    docs/RESULTS.md). Unrolled code is a few per cent faster per iteration for small networks
    on CPU, which can pay off in long runs."""
    if config.scan_unroll not in (0, 1, 2):
        raise ValueError(f"scan_unroll must be 0 (auto), 1 (scan) or 2 (unrolled), got {config.scan_unroll!r}")
    return config.scan_unroll == 2


def repeat_steps(step, carry, keys, unroll: bool):
    """lax.scan(step, carry, keys), or the same steps traced one after another."""
    if not unroll:
        return jax.lax.scan(step, carry, keys)
    outputs = []
    for i in range(keys.shape[0]):
        carry, out = step(carry, keys[i])
        outputs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def device_ids(num_devices: int) -> np.ndarray:
    return np.arange(num_devices, dtype=np.int32)


def replicate(tree, num_devices: int):
    """Places a pytree the way the pmapped iteration returns its unreplicated outputs.

    Without this the second call recompiles, because a freshly initialised or restored state
    (single-device arrays) and the iteration's output (replicated over the device mesh) differ
    in sharding.
    """
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:num_devices]), (AXIS,))
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
