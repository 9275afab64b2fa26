"""FLOPs and memory: XLA's cost and memory analysis of compiled executables, an analytic count
of the necessary matmul/conv work, MFU against the devices' peak rates, and `analyse(config)`
(compiles, never runs)."""
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax.tools.benchmark.device import describe_jax_device, xla_compiler_options


def xla_flops(compiled) -> Optional[float]:
    """FLOPs of one execution (per device) from XLA's cost analysis, or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_memory(compiled) -> Dict[str, Optional[int]]:
    """XLA's static memory analysis of an executable (bytes): arguments, outputs, temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        m = None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")
    return {f: (int(getattr(m, f)) if m is not None and hasattr(m, f) else None) for f in fields}


def _conv_flops(eqn) -> float:
    """2 x the multiply-adds of a convolution that read an input element, not padding (as XLA's
    cost analysis counts them)."""
    p = eqn.params
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = p["dimension_numbers"]
    taps = 1
    for i, (ld, rd, od) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
        stride = p["window_strides"][i]
        lo, _ = p["padding"][i]
        l_dil = (p.get("lhs_dilation") or (1,) * len(p["window_strides"]))[i]
        r_dil = (p.get("rhs_dilation") or (1,) * len(p["window_strides"]))[i]
        # Index into the (lhs-dilated) input of every (output position, kernel tap) pair.
        index = (np.arange(out[od])[:, None] * stride - lo + np.arange(rhs[rd])[None, :] * r_dil)
        extent = (lhs[ld] - 1) * l_dil + 1
        taps *= int(np.sum((index >= 0) & (index < extent) & (index % l_dil == 0)))
    # in-features per group x output features x batch x valid taps
    return 2.0 * rhs[dn.rhs_spec[1]] * out[dn.out_spec[1]] * out[dn.out_spec[0]] * taps


def _dot_flops(eqn) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(
        np.prod([lhs[d] for d in contract]))


def matmul_flops(jaxpr) -> List[float]:
    """FLOPs (2 x multiply-adds) of every convolution and dot of a jaxpr, nested calls
    included, in program order; a scan's body counts once per trip."""
    from jax.extend import core as jex_core
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    flops: List[float] = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            flops.append(_conv_flops(eqn))
        elif name == "dot_general":
            flops.append(_dot_flops(eqn))
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    trips = eqn.params.get("length", 1) if name == "scan" else 1
                    flops.extend(f * trips for f in matmul_flops(sub))
    return flops


def network_flops(fn: Callable, *args) -> Tuple[float, float]:
    """(all, first layer) matmul/conv FLOPs of `fn(*args)`, traced on abstract values. The first
    layer is the first such op in program order, the one that reads the input in every network
    of the registry (its input gradient is unnecessary when the input needs none)."""
    flops = matmul_flops(jax.make_jaxpr(fn)(*args))
    return float(sum(flops)), float(flops[0] if flops else 0.0)


def necessary_flops(config) -> Dict[str, float]:
    """Matmul/conv FLOPs one generator step and one student step need at the global batch,
    counting a backward pass as its two products: the input gradient (same FLOPs as the
    forward, not for a layer whose input needs no gradient) and the weight gradient (same
    FLOPs, only for networks being trained). Elementwise work, BatchNorm and losses excluded.

    generator step: G forward + weight + input gradients (not its first layer's: z);
                    teacher forward + input gradients; student forward + input gradients;
                    adapter likewise (+ weight gradients when it trains);
    student step:   G forward (not with student_data="replay": its images are stored); teacher
                    forward; student forward + weight + input gradients (not its first
                    layer's: the images are constants), on the fresh and the replayed images."""
    from cpsc_jax.method import steps
    from cpsc_jax.infra.checkpoint import ModelSpec
    b, c = config.batch_size, config
    nets = steps.build_networks(config, config.teacher.arch, axis_name=None)
    state = jax.eval_shape(functools.partial(steps.init_state, nets, config), jax.random.PRNGKey(0))
    teacher_vars = ModelSpec(c.teacher.arch, c.num_classes, c.image_size, c.channels,
                             (0.0,) * c.channels, (1.0,) * c.channels).abstract_variables()
    z = jax.ShapeDtypeStruct((b, c.generator.nz), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32)
    x = jax.ShapeDtypeStruct((b, c.image_size, c.image_size, c.channels), jnp.float32)
    g_vars = {"params": state.generator.params, "batch_stats": state.generator.batch_stats}
    s_vars = {"params": state.student.params, "batch_stats": state.student.batch_stats}
    g, g1 = network_flops(lambda v, z, y: nets.generator.apply(
        v, z, y, train=True, mutable=["batch_stats"]), g_vars, z, y)
    t, _ = network_flops(lambda v, x: nets.teacher.apply(v, x, train=False, features=True),
                         teacher_vars, x)
    s, s1 = network_flops(lambda v, x: nets.student.apply(
        v, x, train=True, features=True, mutable=["batch_stats"]), s_vars, x)
    a = 0.0
    if nets.adapter is not None and c.loss.gamma > 0:
        a, _ = network_flops(lambda v, f: nets.adapter.apply(v, f), {"params": state.adapter.params},
                             jax.ShapeDtypeStruct((b, nets.adapter.hidden), jnp.float32))
    w = c.loss
    teacher_grad = any(w[k] > 0 for k in ("kd", "beta", "gamma", "eta"))
    student_grad = any(w[k] > 0 for k in ("kd", "alpha", "gamma"))
    adapter_trains = c.adapter_optimizer != "frozen"
    generator_step = (g + g + (g - g1) + t + (t if teacher_grad else 0.0)
                      + s + (s if student_grad else 0.0) + a + a + (a if adapter_trains else 0.0))
    from cpsc_jax.method import replay
    images = ((b if c.student_data != "replay" else 0)
              + (replay.replay_batch(c) if c.student_data != "fresh" else 0))
    student_step = ((g if c.student_data != "replay" else 0.0)
                    + (t + s + s + (s - s1)) * images / b)
    return {"generator_step": generator_step, "student_step": student_step,
            "forward": {"generator": g, "teacher": t, "student": s, "adapter": a}}


def analyse(config, num_devices: Optional[int] = None,
            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Compiles (never runs) the generator step, the student step and the iteration of
    `config` on abstract inputs: XLA's FLOPs against `necessary_flops`, and XLA's compiled
    memory of each executable at the config's batch. One flat dict."""
    from cpsc_jax.infra import runtime
    from cpsc_jax.method import steps
    from cpsc_jax.infra.checkpoint import ModelSpec
    c = config
    topo = runtime.topology(num_devices)
    n = topo.num_devices
    nets = steps.build_networks(c, c.teacher.arch)
    state = jax.eval_shape(functools.partial(steps.init_state, nets, c), jax.random.PRNGKey(0))
    teacher_vars = ModelSpec(c.teacher.arch, c.num_classes, c.image_size, c.channels,
                             (0.0,) * c.channels, (1.0,) * c.channels).abstract_variables()
    dev = describe_jax_device()
    result: Dict[str, Any] = {
        "mode": "analysis", "device": dev["device_kind"], "platform": dev["platform"],
        "num_devices": n, "teacher": c.teacher.arch, "student": c.student.arch,
        "batch_size": c.batch_size, "g_steps": c.g_steps, "s_steps": c.s_steps,
        "mixed_precision": bool(c.mixed_precision), "conv_gradients": c.conv_gradients,
        "bn_sync": c.bn_sync, "xla_compiler_options": xla_compiler_options(),
        "jax_version": jax.__version__}
    log(f"analysis: {c.teacher.arch} -> {c.student.arch}, global batch {c.batch_size}, "
        f"G_steps {c.g_steps}, S_steps {c.s_steps} on {n} {dev['platform']} device(s) "
        "(compiled, not run)")
    necessary = necessary_flops(c)
    executables = {"generator_step": (1, 0), "student_step": (0, 1),
                   "iteration": (c.g_steps, c.s_steps)}
    for name, (g, s) in executables.items():
        fn = steps.make_train_iteration(nets, c, n, donate=False, g_steps=g, s_steps=s)
        t0 = time.perf_counter()
        compiled = fn.lower(state, teacher_vars, topo.device_ids()).compile()
        per_device = xla_flops(compiled)
        memory = xla_memory(compiled)
        result[f"{name}_compile_s"] = round(time.perf_counter() - t0, 2)
        result[f"{name}_memory"] = memory
        result[f"{name}_xla_flops"] = None if per_device is None else per_device * n
    for name in ("generator_step", "student_step"):
        result[f"{name}_necessary_flops"] = necessary[name]
        xla = result[f"{name}_xla_flops"]
        result[f"{name}_xla_over_necessary"] = (None if not xla or not necessary[name]
                                                else round(xla / necessary[name], 4))
    if not steps.scan_unroll(c):
        # XLA's cost analysis counts a loop body once: the iteration's FLOPs from its steps.
        g, s = result["generator_step_xla_flops"], result["student_step_xla_flops"]
        result["iteration_xla_flops"] = (None if g is None or s is None
                                         else c.g_steps * g + c.s_steps * s)
    result["iteration_necessary_flops"] = (c.g_steps * necessary["generator_step"]
                                           + c.s_steps * necessary["student_step"])
    it_xla = result["iteration_xla_flops"]
    result["iteration_xla_over_necessary"] = (None if not it_xla else round(
        it_xla / result["iteration_necessary_flops"], 4))
    result["forward_flops"] = necessary["forward"]
    for line in format_analysis(result):
        log(line)
    return result


def _si(value: Optional[float], unit: str, base: float = 1e3) -> str:
    if value is None:
        return "n/a"
    prefixes = ("", "k", "M", "G", "T", "P") if base == 1e3 else ("", "Ki", "Mi", "Gi", "Ti")
    i = 0
    while abs(value) >= base and i < len(prefixes) - 1:
        value, i = value / base, i + 1
    return f"{value:.3g} {prefixes[i]}{unit}"


def format_analysis(r: Dict[str, Any]) -> List[str]:
    gb = lambda v: _si(v, "B", 1024.0)
    tf = lambda v: _si(v, "FLOP")
    lines = []
    for name in ("generator_step", "student_step", "iteration"):
        m = r[f"{name}_memory"]
        lines.append(f"  {name:15s} XLA {tf(r[f'{name}_xla_flops'])}, necessary "
                     f"{tf(r[f'{name}_necessary_flops'])} (x{r[f'{name}_xla_over_necessary']}); "
                     f"memory: temp {gb(m['temp_size_in_bytes'])}, arguments "
                     f"{gb(m['argument_size_in_bytes'])}, outputs {gb(m['output_size_in_bytes'])}"
                     f" (per device; compiled in {r[f'{name}_compile_s']:.1f} s)")
    return lines
