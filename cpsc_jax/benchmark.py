"""Timing harness for the CPSC-DFKD iteration: JAX (the project's pmapped iteration) against a
PyTorch baseline of the same iteration (`cpsc_jax.pytorch.dfkd`, imported lazily: torch stays
optional).

What is measured, per framework, on the same networks, shapes and global batch:
  * one full iteration (G_steps generator steps + S_steps student steps), and each phase alone;
  * after warm-up, timed calls interleaved round-robin across every variant (so a change in the
    machine's load hits all of them alike), each call synchronised (`block_until_ready` /
    `torch.cuda.synchronize`), median and quartiles of N;
  * JAX compile time (ahead-of-time `lower` + `compile` of exactly the executables that are
    timed), torch.compile's first-call time;
  * FLOPs per iteration from XLA's cost analysis of the compiled executables (exact for
    straight-line code; for `lax.scan` code, whose loop body XLA counts once, from one-step
    executables times the step counts), and torch's FlopCounterMode count as a cross-check
    (matmul/conv only);
  * MFU = FLOPs / time / peak, for devices in `PEAK_FLOPS` (null elsewhere, e.g. CPUs);
  * peak device memory where the backend reports it (GPU), and XLA's compiled memory analysis.

Hygiene: the 1-min load average is recorded before and after; a comparison is refused when the
load already exceeds the core count at the start (`force=True` overrides) and flagged loudly
(`"WARNING"`, first key of the JSON) when it does at either end. PyTorch's OpenMP worker threads
spin for a while after each call before they sleep, and libgomp has no switch for that at run
time, so after every PyTorch call the harness waits (untimed) until they sleep: they are passive
whenever a JAX call is timed.

`run_benchmark(config, ...)` returns one flat JSON-able dict; `scripts/benchmark.py` prints it.
`analyse(config)` compiles (never runs) the generator step, the student step and the iteration
and sets XLA's FLOP count against an analytic count of the necessary matmul/conv work, with
XLA's compiled memory analysis at the config's batch.
"""
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax.errors import UserError

# Dense (no sparsity) peak FLOP/s per device, from the vendors' data sheets. "fp32" is the plain
# FP32 vector rate; "tf32" the tensor-core rate XLA and cuDNN use for f32 matmuls/convs by
# default on these GPUs. Keys are matched as substrings of `device_kind` (longest first).
PEAK_FLOPS: Dict[str, Dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "A100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}

# XLA:CPU flags found to speed this workload up (jaxlib 0.10.2, x86 AVX-512; see the README's
# Benchmark section). By default XLA:CPU hands each convolution to YNNPACK, whose weight-gradient
# convolutions are several times slower than XLA's own (Eigen) ones (docs/RESULTS.md, "Figures
# behind design choices"). The project's data-parallel functions now compile
# with the same setting as a per-executable compiler option
# (`cpsc_jax.models.conv.xla_cpu_conv_options`); the process-wide flag stays for older commands.
# Opt-in only: XLA aborts on flags it does not know.
CPU_TUNED_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# Compiler options that put convolutions back on YNNPACK (jaxlib 0.10.2's default list, as its
# optimised HLO shows), to compare against the project's default.
YNN_CONVOLUTION_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def peak_flops(device_kind: str, precision: str) -> Optional[float]:
    """Peak FLOP/s of one device of this kind at this precision, or None if unknown."""
    kind = device_kind.upper()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.upper() in kind:
            return PEAK_FLOPS[key].get(precision)
    return None


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of timed calls (after warm-up)."""

    times_s: List[float]

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times_s)

    def summary(self) -> Dict[str, float]:
        ms = sorted(1e3 * t for t in self.times_s)
        q = np.percentile(ms, [25, 75]) if len(ms) > 1 else (ms[0], ms[0])
        return {"median_ms": round(self.median_ms, 3), "min_ms": round(ms[0], 3),
                "p25_ms": round(float(q[0]), 3), "p75_ms": round(float(q[1]), 3),
                "mean_ms": round(float(np.mean(ms)), 3), "n": len(ms)}


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
    """Seconds of one synchronised call."""
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def time_interleaved(variants: Dict[str, Callable[[], float]], iters: int,
                     warmup: int) -> Dict[str, Timing]:
    """`variants` maps a name to a zero-argument function returning the seconds of one
    synchronised call. Every variant is warmed up, then timed `iters` times round-robin."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times = {name: [] for name in variants}
    for _ in range(iters):
        for name, run in variants.items():
            times[name].append(run())
    return {name: Timing(t) for name, t in times.items()}


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class BaselineMismatch(UserError, ValueError):
    """The PyTorch baseline cannot run what the config asks for."""


class LoadTooHigh(UserError, RuntimeError):
    """The machine is busier than it has cores: timings would measure the other jobs."""


def check_load(force: bool = False, cores: Optional[int] = None,
               load: Optional[List[float]] = None) -> Optional[List[float]]:
    """The 1/5/15-min load now; raises `LoadTooHigh` when the 1-min load exceeds the core
    count, unless `force`."""
    cores = cores or cpu_cores()
    load = load_average() if load is None else load
    if load is not None and load[0] > cores and not force:
        raise LoadTooHigh(f"the 1-min load average is {load[0]} on {cores} cores: timings taken "
                          "now measure the other jobs too. Wait for a quieter machine, or pass "
                          "--force to time anyway (the result is then flagged)")
    return load


def flag_load(result: Dict[str, Any], cores: Optional[int] = None) -> Dict[str, Any]:
    """`result` with `cores`, `load_above_cores` and, when the 1-min load at the start or at
    the end exceeded the cores, a "WARNING" as its first key."""
    cores = cores or cpu_cores()
    ends = [l[0] for l in (result.get("load_avg_start"), result.get("load_avg_end")) if l]
    above = any(l > cores for l in ends)
    result = dict(result, cores=cores, load_above_cores=above)
    if above:
        result = {"WARNING": f"1-min load {result.get('load_avg_start')} -> "
                             f"{result.get('load_avg_end')} above the {cores} cores: these "
                             "timings are not comparable", **result}
    return result


# ----------------------------------------------------------------------------- OpenMP threads


def thread_ids() -> Optional[FrozenSet[int]]:
    """This process's thread ids (Linux), or None."""
    try:
        return frozenset(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return None


def running_threads(tids) -> List[int]:
    """Those of `tids` that are running or runnable (state R: e.g. an OpenMP thread spinning)."""
    running = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue   # the thread has ended
        if stat[stat.rindex(")") + 2] == "R":
            running.append(tid)
    return running


def wait_until_asleep(tids, timeout_s: float = 0.5, poll_s: float = 2e-4) -> Tuple[bool, float]:
    """Waits until none of `tids` runs (libgomp's workers spin up to GOMP_SPINCOUNT iterations
    after a parallel region, then sleep); returns (asleep, seconds waited)."""
    start = time.perf_counter()
    while True:
        if not running_threads(tids):
            return True, time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            return False, time.perf_counter() - start
        time.sleep(poll_s)


class ParkedThreads:
    """Calls that, after each timed call, wait (untimed) until `tids` sleep: PyTorch's OpenMP
    workers, so that they are passive while the next variant (JAX's) is timed."""

    def __init__(self, tids):
        self.tids = frozenset(tids or ())
        self.waits_s: List[float] = []
        self.timeouts = 0

    def wrap(self, run: Callable[[], float]) -> Callable[[], float]:
        def parked() -> float:
            seconds = run()
            if self.tids:
                asleep, waited = wait_until_asleep(self.tids)
                self.waits_s.append(waited)
                self.timeouts += not asleep
            return seconds
        return parked

    def summary(self) -> Dict[str, Any]:
        return {"torch_threads_parked": len(self.tids),
                "torch_park_wait_ms_median": (round(1e3 * statistics.median(self.waits_s), 3)
                                              if self.waits_s else None),
                "torch_park_timeouts": self.timeouts}


# ----------------------------------------------------------------------------- XLA analysis


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


def device_peak_memory(device) -> Optional[int]:
    """Peak bytes in use on a device since start, where the backend reports it (not XLA:CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


# ----------------------------------------------------------------------------- JAX side




class JaxRunner:
    """The JAX iteration (and its phases) compiled ahead of time on random networks."""

    def __init__(self, config, num_devices: Optional[int] = None, phases: bool = True,
                 donate: bool = True, seed: int = 0, log: Callable[[str], None] = print,
                 compiler_options: Optional[Dict[str, Any]] = None):
        from cpsc_jax import runtime, steps
        from cpsc_jax.checkpoint import ModelSpec, init_variables

        self.config = config
        topo = runtime.topology(num_devices)
        self.num_devices = topo.num_devices
        self.unroll = steps.scan_unroll(config)
        n = self.num_devices
        nets = steps.build_networks(config, config.teacher.arch)
        c = config.channels
        teacher_spec = ModelSpec(config.teacher.arch, config.num_classes, config.image_size, c,
                                 (0.0,) * c, (1.0,) * c)
        k_state, k_teacher = jax.random.split(jax.random.PRNGKey(seed))
        # Initialised under jit (one compilation instead of one per initialiser op), then
        # replicated like the iteration's outputs, or the second call would recompile.
        state = jax.jit(functools.partial(steps.init_state, nets, config))(k_state)
        teacher_vars = init_variables(teacher_spec, k_teacher)   # compiled once, in checkpoint
        self.state = runtime.replicate(state, topo)
        self.teacher_vars = runtime.replicate(teacher_vars, topo)
        self.ids = topo.device_ids()
        self.has_adapter = nets.adapter is not None

        fns = {"iteration": steps.make_train_iteration(nets, config, n, donate=donate)}
        if phases:
            fns["generator_phase"] = steps.make_train_iteration(nets, config, n, donate, s_steps=0)
            fns["student_phase"] = steps.make_train_iteration(nets, config, n, donate, g_steps=0)
        if not self.unroll:
            # XLA's cost analysis counts a while-loop body once: take FLOPs from one-step
            # executables (a length-1 loop) instead.
            fns["generator_step"] = steps.make_train_iteration(nets, config, n, donate, 1, 0)
            fns["student_step"] = steps.make_train_iteration(nets, config, n, donate, 0, 1)
        self.compiled, self.compile_s, self.flops, self.memory = {}, {}, {}, {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            lowered = fn.lower(self.state, self.teacher_vars, self.ids)
            # On top of the data-parallel function's own options (later ones win).
            compiled = lowered.compile(compiler_options=compiler_options)
            self.compile_s[name] = time.perf_counter() - t0
            self.compiled[name] = compiled
            self.flops[name] = xla_flops(compiled)
            self.memory[name] = xla_memory(compiled)
            log(f"  jax: compiled {name} in {self.compile_s[name]:.1f} s")

    def call(self, name: str) -> float:
        """Runs one compiled executable on the current state; seconds, synchronised."""
        start = time.perf_counter()
        self.state, metrics = self.compiled[name](self.state, self.teacher_vars, self.ids)
        jax.block_until_ready((self.state, metrics))
        self.last_metrics = metrics
        return time.perf_counter() - start

    def flops_per_iteration(self) -> Dict[str, Optional[float]]:
        """Global (all devices) FLOPs per iteration and per phase, and how they were obtained."""
        n, c = self.num_devices, self.config
        if self.unroll:
            it = self.flops.get("iteration")
            g = self.flops.get("generator_phase")
            s = self.flops.get("student_phase")
            source = "xla_cost_analysis(straight-line executables)"
        else:
            gs, ss = self.flops.get("generator_step"), self.flops.get("student_step")
            g = c.g_steps * gs if gs is not None else None
            s = c.s_steps * ss if ss is not None else None
            it = g + s if g is not None and s is not None else None
            source = "xla_cost_analysis(one-step executables) x steps"
        scale = lambda f: None if f is None else f * n
        return {"iteration": scale(it), "generator_phase": scale(g),
                "student_phase": scale(s), "source": source}


# ----------------------------------------------------------------------------- analysis


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
    from cpsc_jax import steps
    from cpsc_jax.checkpoint import ModelSpec
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
    from cpsc_jax import replay
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
    from cpsc_jax import runtime, steps
    from cpsc_jax.checkpoint import ModelSpec
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


# ----------------------------------------------------------------------------- torch side


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRunner:
    """The PyTorch baseline (`cpsc_jax.pytorch.dfkd.TorchDFKD`) behind the same `call` interface."""

    def __init__(self, config, mode: str, seed: int = 0, device: Optional[str] = None,
                 channels_last: bool = False, log: Callable[[str], None] = print):
        from cpsc_jax.pytorch import dfkd as torch_dfkd   # lazy: torch is optional

        self.mod = torch_dfkd
        self.bench = torch_dfkd.TorchDFKD(config, device=device, mode=mode, seed=seed,
                                          channels_last=channels_last)
        self.mode = mode
        fns = {"iteration": self.bench.iteration,
               "generator_phase": self.bench.generator_phase,
               "student_phase": self.bench.student_phase}
        self.fns = fns
        # First calls: for "compile" these trace and compile (recorded as the compile time).
        self.first_call_s = {}
        for name in ("generator_phase", "student_phase"):
            self.first_call_s[name] = self.call(name)
        log(f"  torch {mode}: first calls (G phase {self.first_call_s['generator_phase']:.1f} s,"
            f" S phase {self.first_call_s['student_phase']:.1f} s)")
        self.mod.reset_peak_memory(self.bench.device)

    def call(self, name: str) -> float:
        start = time.perf_counter()
        self.fns[name]()
        self.bench.sync()
        return time.perf_counter() - start

    def peak_memory(self) -> Optional[int]:
        return self.mod.peak_memory_bytes(self.bench.device)

    def flops_per_iteration(self) -> Optional[int]:
        return self.bench.count_flops()

    def device(self) -> str:
        return self.mod.describe_device(self.bench.device)


# ----------------------------------------------------------------------------- the benchmark


def describe_jax_device() -> Dict[str, Any]:
    d = jax.local_devices()[0]
    kind = d.device_kind
    if d.platform == "cpu":
        kind = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        kind = f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
                        break
        except OSError:
            pass
    return {"platform": d.platform, "device_kind": kind, "num_devices": jax.local_device_count()}


def _precision(config, platform_name: str) -> str:
    if config.mixed_precision:
        return "bf16"
    return "tf32" if platform_name == "gpu" else "fp32"


def xla_compiler_options(extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The compiler options the timed JAX executables are built with."""
    from cpsc_jax.models.conv import xla_cpu_conv_options
    return {**xla_cpu_conv_options(), **(extra or {})}


def run_benchmark(config, iters: int = 10, warmup: int = 2,
                  torch_modes: Sequence[str] = ("eager",), phases: bool = True,
                  torch_channels_last: bool = False, donate: bool = True, seed: int = 0,
                  log: Callable[[str], None] = print, force: bool = False,
                  compiler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Builds, compiles and times every variant; returns one flat dict (see module doc).
    Refuses (`LoadTooHigh`) when the machine is busier than its cores, unless `force`;
    `compiler_options` are added to the JAX executables' own."""
    torch_modes = [m for m in torch_modes if m != "none"]
    aug = config.student_augment
    released_student = {"student_data": ("fresh", config.student_data),
                        "student_augment.crop_padding": (0, aug.crop_padding),
                        "student_augment.flip": (False, aug.flip),
                        "student_augment.mixup": (0.0, aug.mixup),
                        "student_grad_clip": (0.0, config.student_grad_clip),
                        "loss.student_ikd_scale": (1.0, config.loss.student_ikd_scale),
                        "loss.student_kd_temperature": (1.0, config.loss.student_kd_temperature)}
    differ = {k: v for k, (want, v) in released_student.items() if v != want}
    if torch_modes and differ:
        raise BaselineMismatch(
            "the PyTorch baseline runs the released student phase, not "
            + ", ".join(f"{k}={v!r}" for k, v in differ.items()) + ": time this config with "
            "--torch none, or compare with "
            + " ".join(f"--config.{k}={want}" for k, (want, v) in released_student.items()
                       if k in differ))
    load_start = check_load(force)
    dev = describe_jax_device()
    images_per_iter = (config.g_steps + config.s_steps) * config.batch_size
    result: Dict[str, Any] = {
        "device": dev["device_kind"], "platform": dev["platform"],
        "num_devices": dev["num_devices"],
        "teacher": config.teacher.arch, "student": config.student.arch,
        "batch_size": config.batch_size, "g_steps": config.g_steps, "s_steps": config.s_steps,
        "image_size": config.image_size, "channels": config.channels,
        "mixed_precision": bool(config.mixed_precision),
        "images_per_iter": images_per_iter,
        "iters": iters, "warmup": warmup,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "jax_version": jax.__version__,
        "xla_compiler_options": xla_compiler_options(compiler_options),
        "load_avg_start": load_start,
    }
    log(f"benchmark: {config.teacher.arch} -> {config.student.arch}, batch {config.batch_size}, "
        f"G_steps {config.g_steps}, S_steps {config.s_steps} on {dev['device_kind']}")

    jr = JaxRunner(config, phases=phases, donate=donate, seed=seed, log=log,
                   compiler_options=compiler_options)
    result["jax_unrolled"] = jr.unroll
    result["jax_has_adapter"] = jr.has_adapter
    names = ["iteration"] + (["generator_phase", "student_phase"] if phases else [])
    variants: Dict[str, Callable[[], float]] = {
        f"jax/{n}": functools.partial(jr.call, n) for n in names}

    torch_runners: Dict[str, TorchRunner] = {}
    threads_before = thread_ids()
    if torch_modes and not torch_available():
        log("  torch is not installed: skipping the PyTorch baseline")
        result["torch_skipped"] = "torch not installed"
        torch_modes = []
    for mode in torch_modes:
        try:
            tr = TorchRunner(config, mode, seed=seed, channels_last=torch_channels_last, log=log)
        except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile
            log(f"  torch {mode} failed to set up: {type(e).__name__}: {e}")
            result[f"torch_{mode}_error"] = f"{type(e).__name__}: {e}"
            continue
        torch_runners[mode] = tr
    # The threads PyTorch started (its OpenMP workers): parked after every PyTorch call.
    parked = ParkedThreads((thread_ids() or frozenset()) - (threads_before or frozenset())
                           if torch_runners else ())
    for mode, tr in torch_runners.items():
        for n in names:
            variants[f"torch_{mode}/{n}"] = parked.wrap(functools.partial(tr.call, n))

    log(f"  timing {len(variants)} variants: {warmup} warm-up + {iters} timed calls each, "
        "interleaved")
    timings = time_interleaved(variants, iters, warmup)
    result["load_avg_end"] = load_average()
    result.update(parked.summary())

    # JAX figures.
    it_ms = timings["jax/iteration"].median_ms
    flops = jr.flops_per_iteration()
    prec = _precision(config, dev["platform"])
    peak = peak_flops(jax.local_devices()[0].device_kind, prec)
    result.update({
        "jax_ms_per_iter": round(it_ms, 3),
        "jax_images_per_s": round(images_per_iter / (it_ms / 1e3), 2),
        "jax_iter_timing": timings["jax/iteration"].summary(),
        "jax_compile_s": round(jr.compile_s["iteration"], 2),
        "jax_compile_s_by_executable": {k: round(v, 2) for k, v in jr.compile_s.items()},
        "jax_flops_per_iter": flops["iteration"],
        "jax_flops_source": flops["source"],
        "jax_tflops_per_s": (None if flops["iteration"] is None
                             else round(flops["iteration"] / (it_ms / 1e3) / 1e12, 4)),
        "peak_flops_per_device": peak, "peak_precision": prec,
        "jax_mfu": (None if peak is None or flops["iteration"] is None else
                    round(flops["iteration"] / (it_ms / 1e3) / (peak * jr.num_devices), 5)),
        "jax_peak_memory_bytes": device_peak_memory(jax.local_devices()[0]),
        "jax_xla_memory_iteration": jr.memory["iteration"],
    })
    if phases:
        for ph in ("generator_phase", "student_phase"):
            ms = timings[f"jax/{ph}"].median_ms
            result[f"jax_{ph}_ms"] = round(ms, 3)
            result[f"jax_{ph}_flops"] = flops[ph]
        result["jax_phases_sum_ms"] = round(result["jax_generator_phase_ms"]
                                            + result["jax_student_phase_ms"], 3)

    # Torch figures (primary = eager when run, else the first mode).
    for mode, tr in torch_runners.items():
        p = "torch" if mode == "eager" else f"torch_{mode}"
        ms = timings[f"torch_{mode}/iteration"].median_ms
        result[f"{p}_ms_per_iter"] = round(ms, 3)
        result[f"{p}_images_per_s"] = round(images_per_iter / (ms / 1e3), 2)
        result[f"{p}_iter_timing"] = timings[f"torch_{mode}/iteration"].summary()
        result[f"speedup_vs_{p}"] = round(ms / it_ms, 4)
        result[f"{p}_peak_memory_bytes"] = tr.peak_memory()
        result[f"{p}_first_call_s"] = {k: round(v, 2) for k, v in tr.first_call_s.items()}
        if mode == "compile":   # the first calls trace and compile both loss graphs
            result["torch_compile_compile_s"] = round(sum(tr.first_call_s.values()), 2)
        # MFU of the same work (XLA's FLOP count of the identical iteration).
        if flops["iteration"] is not None:
            result[f"{p}_tflops_per_s"] = round(flops["iteration"] / (ms / 1e3) / 1e12, 4)
        if phases:
            for ph in ("generator_phase", "student_phase"):
                result[f"{p}_{ph}_ms"] = round(timings[f"torch_{mode}/{ph}"].median_ms, 3)
        result["torch_device"] = tr.device()
    if "eager" in torch_runners:
        try:
            result["torch_flops_per_iter_matmul_conv"] = torch_runners["eager"].flops_per_iteration()
        except Exception as e:  # noqa: BLE001 - a cross-check only
            log(f"  torch FLOP count failed: {type(e).__name__}: {e}")
            result["torch_flops_per_iter_matmul_conv"] = None
        import torch
        result["torch_version"] = torch.__version__
        result["torch_threads"] = torch.get_num_threads()
    result.setdefault("torch_ms_per_iter", None)
    result.setdefault("speedup_vs_torch", None)
    result["torch_channels_last"] = bool(torch_channels_last)
    result["timings"] = {k: v.summary() for k, v in timings.items()}
    return flag_load(result)


def compare_loop_forms(config, iters: int = 10, warmup: int = 2, seed: int = 0,
                       log: Callable[[str], None] = print, force: bool = False,
                       compiler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JAX iteration with its G/S step loops as `lax.scan` and unrolled (config.scan_unroll
    1 and 2), compiled in one process and timed round-robin; one flat dict."""
    load_start = check_load(force)
    dev = describe_jax_device()
    result: Dict[str, Any] = {
        "device": dev["device_kind"], "platform": dev["platform"],
        "num_devices": dev["num_devices"], "teacher": config.teacher.arch,
        "student": config.student.arch, "batch_size": config.batch_size,
        "g_steps": config.g_steps, "s_steps": config.s_steps, "iters": iters, "warmup": warmup,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
        "xla_compiler_options": xla_compiler_options(compiler_options),
        "load_avg_start": load_start}
    # The first compilation in a process pays a one-off cost of seconds: take it
    # on a throwaway one-step iteration so that neither measured form is charged with it.
    warm = config.copy_and_resolve_references()
    warm.g_steps, warm.s_steps, warm.scan_unroll = 1, 1, 2
    JaxRunner(warm, phases=False, seed=seed, log=lambda _: None, compiler_options=compiler_options)
    runners = {}
    for form, value in (("scan", 1), ("unrolled", 2)):
        c = config.copy_and_resolve_references()
        c.scan_unroll = value
        log(f"  jax {form}:")
        runners[form] = JaxRunner(c, phases=False, seed=seed, log=log,
                                  compiler_options=compiler_options)
        result[f"{form}_compile_s"] = round(runners[form].compile_s["iteration"], 2)
    timings = time_interleaved({f: functools.partial(r.call, "iteration")
                                for f, r in runners.items()}, iters, warmup)
    result["load_avg_end"] = load_average()
    for form, t in timings.items():
        result[f"{form}_ms_per_iter"] = round(t.median_ms, 3)
        result[f"{form}_iter_timing"] = t.summary()
    result["scan_speedup_vs_unrolled"] = round(timings["unrolled"].median_ms
                                               / timings["scan"].median_ms, 4)
    return flag_load(result)


def format_summary(r: Dict[str, Any]) -> List[str]:
    """Human-readable lines for a result of `run_benchmark`."""
    lines = [f"device: {r['device']} ({r['platform']}, {r['num_devices']} device(s)); "
             f"load {r['load_avg_start']} -> {r['load_avg_end']}"]
    if r.get("WARNING"):
        lines.insert(0, f"WARNING: {r['WARNING']}")
    for key, t in r["timings"].items():
        lines.append(f"  {key:32s} median {t['median_ms']:10.1f} ms  "
                     f"[p25 {t['p25_ms']:.1f}, p75 {t['p75_ms']:.1f}, n {t['n']}]")
    lines.append(f"  jax: {r['jax_ms_per_iter']:.1f} ms/iter, {r['jax_images_per_s']:.0f} img/s, "
                 f"compile {r['jax_compile_s']:.1f} s, "
                 f"{(r['jax_flops_per_iter'] or 0) / 1e9:.1f} GFLOP/iter, "
                 f"MFU {r['jax_mfu'] if r['jax_mfu'] is not None else 'n/a'}")
    for p in ("torch", "torch_compile"):
        if r.get(f"{p}_ms_per_iter") is not None:
            lines.append(f"  {p}: {r[f'{p}_ms_per_iter']:.1f} ms/iter; jax speed-up "
                         f"{r[f'speedup_vs_{p}']:.2f}x")
    return lines


def to_json_line(r: Dict[str, Any]) -> str:
    return json.dumps(r, sort_keys=False, default=lambda o: None)
