"""The CPSC-DFKD iteration: G_steps generator steps then S_steps student steps (docs/method.md
§4), in one jitted, pmapped function (`cpsc_jax.infra.runtime.data_parallel`): one dispatch per
iteration, no host sync inside.

Train state goes in and out unreplicated (`in_axes=None`, `out_axes=None`); each device draws its
slice of the same global batch of (z, y) by its global index (`jax.lax.axis_index`, global
across processes), and gradients, BatchNorm moments, losses and metrics are global-batch
quantities, so any number of processes x devices gives the same result for the same global
batch.
"""
import dataclasses
import functools
from typing import Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cpsc_jax.method import objectives, replay

from cpsc_jax.infra import runtime
from cpsc_jax.training.augment import mixup, random_crop_flip
from cpsc_jax.dtypes import at_least_float32
from cpsc_jax.models import ConditionalGenerator, FeatureAdapter, compiled_init, get_model
from cpsc_jax.models.layers import LayerOptions, with_options
from cpsc_jax.training.state import TrainState
from cpsc_jax.method.optimizers import (adapter_optimizer, generator_optimizer,
                                       generator_schedule, student_optimizer, student_schedule)

AXIS = runtime.AXIS


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
    memory: Optional[replay.ReplayMemory] = None   # config.student_data != "fresh"


def build_networks(config, teacher, feature_dims: Optional[Tuple[int, int]] = None,
                   axis_name: Optional[str] = AXIS) -> Networks:
    """Networks for distillation; `teacher` is a `cpsc_jax.teachers.teacher.Teacher` or a registry name.
    `feature_dims` = (student, teacher) feature widths; an adapter is added when they differ."""
    dtype = jnp.bfloat16 if config.mixed_precision else None
    options = LayerOptions.from_config(config)   # conv gradients, BatchNorm sync
    k = config.num_classes
    gen = ConditionalGenerator(k, config.image_size, config.channels, config.generator.nz,
                               config.generator.ngf, config.generator.num_upsamples,
                               axis_name=axis_name, dtype=dtype, options=options)
    student = with_options(get_model(config.student.arch, k, axis_name=axis_name, dtype=dtype),
                           options)
    if isinstance(teacher, str):
        teacher_net = get_model(teacher, k, axis_name=axis_name, dtype=dtype)
        unbound_teacher = get_model(teacher, k)
    else:
        teacher_net = teacher.build(axis_name, dtype)
        unbound_teacher = teacher.build(None, None)
    teacher_net = with_options(teacher_net, options)
    if feature_dims is None:
        feature_dims = (feature_dim(get_model(config.student.arch, k), config),
                        feature_dim(unbound_teacher, config))
    d_s, d_t = feature_dims
    adapter = FeatureAdapter(d_s, d_t) if d_s != d_t else None
    return Networks(gen, student, teacher_net, adapter)


def feature_dim(model: nn.Module, config) -> int:
    """Width of the pooled feature of an (axis-free) classifier, by shape tracing."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, features=True))
    return shapes[0][1].shape[-1]


def _generator_variables(nets: Networks, config, rng):
    return compiled_init(nets.generator.clone(axis_name=None), rng,
                         jnp.zeros((2, config.generator.nz)), jnp.zeros((2,), jnp.int32))


def _init_generator(nets: Networks, config, rng) -> TrainState:
    g_vars = _generator_variables(nets, config, rng)
    return TrainState.create(apply_fn=nets.generator.apply, params=g_vars["params"],
                             batch_stats=g_vars["batch_stats"], tx=generator_optimizer(config))


def init_state(nets: Networks, config, rng) -> DistillState:
    """Fresh generator, student and adapter states (initialised outside pmap, no axis)."""
    k_gen, k_stu, k_ada, k_run = jax.random.split(rng, 4)
    x = jnp.zeros((2, config.image_size, config.image_size, config.channels), jnp.float32)
    s_vars = compiled_init(nets.student.clone(axis_name=None), k_stu, x)
    generator = _init_generator(nets, config, k_gen)
    student = TrainState.create(apply_fn=nets.student.apply, params=s_vars["params"],
                                batch_stats=s_vars.get("batch_stats", {}),
                                tx=student_optimizer(config, config.s_steps))
    adapter = None
    if nets.adapter is not None:
        a_vars = compiled_init(nets.adapter, k_ada, jnp.zeros((2, nets.adapter.hidden)))
        adapter = TrainState.create(apply_fn=nets.adapter.apply, params=a_vars["params"],
                                    tx=adapter_optimizer(config))
    memory = replay.create(config)
    return DistillState(jnp.zeros((), jnp.int32), k_run, generator, student, adapter, memory)


def reinit_generator(nets: Networks, config, state: DistillState, epoch: int) -> DistillState:
    """`state` with a new generator (parameters, batch statistics, optimizer) drawn from the
    run's key and `epoch` (`config.generator_reinit_every`): it stops settling on the images
    it has learned to make, while the student and the replay memory keep what it made."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0x6E17), epoch)
    g_vars = _generator_variables(nets, config, key)
    # New values in the same TrainState: its optimizer and apply function are part of the
    # state's tree structure, and new ones (equal in every setting) would make the compiled
    # iteration miss its cache and compile again.
    gen = state.generator
    return state.replace(generator=TrainState.create(
        apply_fn=gen.apply_fn, params=g_vars["params"], batch_stats=g_vars["batch_stats"],
        tx=gen.tx))


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
    """One generator update on `objectives.generator_objective` (fresh z, y); with a replay
    memory, its images and labels are stored there as well."""
    gen, stu, ada, mem = carry
    z, y = sample_conditioning(rng, config, device_index, num_devices)
    student_vars = {"params": stu.params, "batch_stats": stu.batch_stats}

    def loss_fn(g_params, a_params):
        x, g_stats = _generate(nets, gen, g_params, z, y)
        parts, terms, s_stats = objectives.generator_objective(
            nets, config.loss, teacher_vars, x, y, student_vars, a_params, AXIS)
        return objectives.total(parts), (terms, g_stats, s_stats, x)

    a_params = ada.params if ada is not None else None
    train_adapter = ada is not None and config.adapter_optimizer != "frozen"
    (loss, (terms, g_stats, s_stats, x)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1) if train_adapter else 0, has_aux=True)(gen.params, a_params)
    g_grads, a_grads = jax.lax.pmean(grads if train_adapter else (grads, None), AXIS)
    if config.generator_optimizer == "reset":
        # Released behaviour: a new Adam every step, so each update is a fresh bias-corrected step.
        gen = gen.replace(opt_state=gen.tx.init(gen.params))
    gen = gen.apply_gradients(grads=g_grads, batch_stats=g_stats)
    stu = stu.replace(batch_stats=s_stats)
    if train_adapter:
        ada = ada.apply_gradients(grads=a_grads)
    if mem is not None:
        mem = replay.write(mem, _gather(jax.lax.stop_gradient(x)), _gather(y))
    metrics = jax.lax.pmean({"loss": loss, **terms}, AXIS)
    return (gen, stu, ada, mem), metrics


def _gather(a):
    """The global batch of a per-device array (rows in device order)."""
    return jax.lax.all_gather(a, AXIS, tiled=True)


def _gather_rows(x, rows, total: int):
    """The global batch [total, ...] of which this device holds rows `rows` (as `x`); exact:
    every other device adds zeros there."""
    return jax.lax.psum(jnp.zeros((total,) + x.shape[1:], x.dtype).at[rows].set(x), AXIS)


def student_step(nets: Networks, config, num_devices: int, teacher_vars, device_index,
                 carry, rng):
    """One student update on `objectives.student_objective`, on fresh synthetic images, stored
    ones (`config.student_data`: "replay"), or both ("fresh+replay": the fresh batch, stored in
    the memory, plus `replay.replay_batch(config)` stored images), augmented by
    `config.student_augment`."""
    gen, stu, ada, mem = carry
    local = config.batch_size // num_devices
    start = device_index * local
    parts_x, parts_y, parts_rows, offset = [], [], [], 0
    if config.student_data != "replay":
        z, y = sample_conditioning(rng, config, device_index, num_devices)
        x, g_stats = _generate(nets, gen, gen.params, z, y)  # G stays in training mode
        x = jax.lax.stop_gradient(x)
        gen = gen.replace(batch_stats=g_stats)
        parts_x.append(x)
        parts_y.append(y)
        parts_rows.append(start + jnp.arange(local))
        offset = config.batch_size
    if mem is not None:
        draw = replay.replay_batch(config)
        draw_local = draw // num_devices
        xr, yr = replay.sample(mem, jax.random.fold_in(rng, 1), draw, device_index * draw_local,
                               draw_local)
        if config.student_data == "fresh+replay":   # drawn before this step's images go in
            mem = replay.write(mem, _gather(parts_x[0]), _gather(parts_y[0]))
        parts_x.append(xr.astype(parts_x[0].dtype if parts_x else jnp.float32))
        parts_y.append(yr)
        parts_rows.append(offset + device_index * draw_local + jnp.arange(draw_local))
        offset += draw
    x, y = jnp.concatenate(parts_x), jnp.concatenate(parts_y)
    # Global row indices of this device's images in the student's global batch [fresh; stored]:
    # random augmentation is drawn per global row, so device counts agree.
    rows = jnp.concatenate(parts_rows)
    aug = config.student_augment
    if aug.crop_padding or aug.flip:
        # Edge padding: the border of a synthetic image stays its background.
        x = random_crop_flip(jax.random.fold_in(rng, 2), x, aug.crop_padding, aug.flip, "edge",
                             offset, rows=rows)
    if aug.mixup > 0:
        x = mixup(jax.random.fold_in(rng, 3), _gather_rows(x, rows, offset), rows, aug.mixup)
    t_logits = at_least_float32(nets.teacher.apply(teacher_vars, x, train=False))

    def loss_fn(s_params):
        parts, terms, s_stats = objectives.student_objective(
            nets, config.loss, {"params": s_params, "batch_stats": stu.batch_stats}, x,
            t_logits, y, AXIS)
        return objectives.total(parts), (terms, s_stats)

    (loss, (terms, s_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(stu.params)
    grads = jax.lax.pmean(grads, AXIS)
    stu = stu.apply_gradients(grads=grads, batch_stats=s_stats)
    metrics = jax.lax.pmean({"loss": loss, **terms}, AXIS)
    return (gen, stu, ada, mem), metrics


PHASES = ("generator", "student")


def phase_keys(rng, step, phase: str, num_steps: int):
    """The keys of the `num_steps` steps of `phase` in iteration `step` (one per step; each
    draws that step's (z, y) with `sample_conditioning`)."""
    key = jax.random.fold_in(rng, step)
    return jax.random.split(jax.random.fold_in(key, PHASES.index(phase)), num_steps)


def make_train_iteration(nets: Networks, config, num_devices: int, donate: bool = True,
                         g_steps: Optional[int] = None, s_steps: Optional[int] = None,
                         report_learning_rates: bool = False):
    """Returns `iteration(state, teacher_vars, device_ids) -> (state, metrics)`, pmapped over
    all `num_devices` devices of all processes.

    `device_ids` is `Topology.device_ids()` (pmap's mapped argument). One iteration runs
    `g_steps` generator steps then `s_steps` student steps (default: the config's; 0 skips a
    phase, which is how the benchmark times each phase alone). Metrics are means over the steps
    of each phase, prefixed `generator/` and `student/`; with `report_learning_rates`, also
    `lr/generator` and `lr/student`: the rates of the iteration's first step of each network,
    from the optimizers' own schedules at the states' step counts.
    """
    if config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {num_devices} devices")
    unroll = scan_unroll(config)
    counts = {"generator": config.g_steps if g_steps is None else g_steps,
              "student": config.s_steps if s_steps is None else s_steps}
    step_fns = {"generator": generator_step, "student": student_step}
    schedules = {"generator": generator_schedule(config),
                 "student": student_schedule(config, config.s_steps)}

    def iteration(state: DistillState, teacher_vars, device_ids):
        del device_ids   # pmap's mapped argument; the global index comes from the axis
        device_index = jax.lax.axis_index(AXIS)
        carry = (state.generator, state.student, state.adapter, state.memory)
        metrics = {}
        if report_learning_rates:
            metrics["lr/generator"] = schedules["generator"](state.generator.step)
            metrics["lr/student"] = schedules["student"](state.student.step)
        for phase in PHASES:
            if not counts[phase]:
                continue
            keys = phase_keys(state.rng, state.step, phase, counts[phase])
            step = functools.partial(step_fns[phase], nets, config, num_devices, teacher_vars,
                                     device_index)
            carry, phase_metrics = repeat_steps(step, carry, keys, unroll)
            metrics.update({f"{phase}/{k}": jnp.mean(v) for k, v in phase_metrics.items()})
        gen, stu, ada, mem = carry
        new_state = state.replace(step=state.step + 1, generator=gen, student=stu, adapter=ada,
                                  memory=mem)
        return new_state, metrics

    return runtime.data_parallel(iteration, num_unmapped=2, donate_state=donate)


def scan_unroll(config) -> bool:
    """`config.scan_unroll`: 0 (auto) and 1 run the steps in a lax.scan, 2 traces them one
    after another.

    lax.scan compiles one step body instead of G_steps + S_steps copies (several times faster
    to compile) at about the same speed per iteration, now that the models' convs emit
    standard-form gradients on CPU (`cpsc_jax.models.conv`). Unrolled code is slightly faster
    per iteration for small networks on CPU, which can pay off in long runs (figures:
    docs/RESULTS.md, "Figures behind design choices")."""
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
