"""Benchmark of the CPSC-DFKD iteration: JAX against a PyTorch baseline of the same iteration,
on the same networks, shapes and global batch (the driver; each concern is a module: `timing`,
`machine` load hygiene, `flops` and memory, the `runners`, the `device`).

`run_benchmark(config, ...)` times the iteration and each phase, interleaved across variants,
with compile times, FLOPs, MFU and memory, as one flat JSON-able dict; `analyse(config)`
compiles (never runs) and compares XLA's FLOP count with the necessary work.
"""
import functools
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax

from cpsc_jax.errors import UserError
from cpsc_jax.tools.benchmark.device import (CPU_TUNED_XLA_FLAGS, PEAK_FLOPS, YNN_CONVOLUTION_OPTIONS,
                                             _precision, describe_jax_device, device_peak_memory,
                                             peak_flops, xla_compiler_options)
from cpsc_jax.tools.benchmark.flops import (analyse, format_analysis, matmul_flops, necessary_flops,
                                            network_flops, xla_flops, xla_memory)
from cpsc_jax.tools.benchmark.machine import (LoadTooHigh, ParkedThreads, check_load, cpu_cores,
                                              flag_load, load_average, running_threads, thread_ids,
                                              wait_until_asleep)
from cpsc_jax.tools.benchmark.runners import JaxRunner, TorchRunner, torch_available
from cpsc_jax.tools.benchmark.timing import Timing, time_call, time_interleaved

# What `from cpsc_jax.tools import benchmark as bm` offers: the driver below and each module's
# public names.
__all__ = ["BaselineMismatch", "CPU_TUNED_XLA_FLAGS", "JaxRunner", "LoadTooHigh", "PEAK_FLOPS",
           "ParkedThreads", "Timing", "TorchRunner", "YNN_CONVOLUTION_OPTIONS", "analyse",
           "check_load", "compare_loop_forms", "cpu_cores", "describe_jax_device",
           "device_peak_memory", "flag_load", "format_analysis", "format_summary",
           "load_average", "matmul_flops", "necessary_flops", "network_flops", "peak_flops",
           "run_benchmark", "running_threads", "thread_ids", "time_call", "time_interleaved",
           "to_json_line", "torch_available", "wait_until_asleep", "xla_compiler_options",
           "xla_flops", "xla_memory"]


class BaselineMismatch(UserError, ValueError):
    """The PyTorch baseline cannot run what the config asks for."""


def check_baseline(config, torch_modes: Sequence[str]) -> None:
    """Refuses (`BaselineMismatch`) a PyTorch comparison of a student phase that the PyTorch
    baseline (the released code) does not run."""
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


def _setup_record(config, dev, iters, warmup, load_start, compiler_options) -> Dict[str, Any]:
    return {
        "device": dev["device_kind"], "platform": dev["platform"],
        "num_devices": dev["num_devices"],
        "teacher": config.teacher.arch, "student": config.student.arch,
        "batch_size": config.batch_size, "g_steps": config.g_steps, "s_steps": config.s_steps,
        "image_size": config.image_size, "channels": config.channels,
        "mixed_precision": bool(config.mixed_precision),
        "images_per_iter": (config.g_steps + config.s_steps) * config.batch_size,
        "iters": iters, "warmup": warmup,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "jax_version": jax.__version__,
        "xla_compiler_options": xla_compiler_options(compiler_options),
        "load_avg_start": load_start,
    }


def _torch_runners(config, torch_modes, seed, channels_last, log, result):
    """The PyTorch runners that could be set up ({mode: runner}); failures are recorded."""
    runners: Dict[str, TorchRunner] = {}
    if torch_modes and not torch_available():
        log("  torch is not installed: skipping the PyTorch baseline")
        result["torch_skipped"] = "torch not installed"
        return runners
    for mode in torch_modes:
        try:
            runners[mode] = TorchRunner(config, mode, seed=seed, channels_last=channels_last,
                                        log=log)
        except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile
            log(f"  torch {mode} failed to set up: {type(e).__name__}: {e}")
            result[f"torch_{mode}_error"] = f"{type(e).__name__}: {e}"
    return runners


def run_benchmark(config, iters: int = 10, warmup: int = 2,
                  torch_modes: Sequence[str] = ("eager",), phases: bool = True,
                  torch_channels_last: bool = False, donate: bool = True, seed: int = 0,
                  log: Callable[[str], None] = print, force: bool = False,
                  compiler_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Builds, compiles and times every variant; returns one flat dict (see module doc).
    Refuses (`LoadTooHigh`) when the machine is busier than its cores, unless `force`;
    `compiler_options` are added to the JAX executables' own."""
    torch_modes = [m for m in torch_modes if m != "none"]
    check_baseline(config, torch_modes)
    load_start = check_load(force)
    dev = describe_jax_device()
    result = _setup_record(config, dev, iters, warmup, load_start, compiler_options)
    log(f"benchmark: {config.teacher.arch} -> {config.student.arch}, batch {config.batch_size}, "
        f"G_steps {config.g_steps}, S_steps {config.s_steps} on {dev['device_kind']}")

    jr = JaxRunner(config, phases=phases, donate=donate, seed=seed, log=log,
                   compiler_options=compiler_options)
    result["jax_unrolled"] = jr.unroll
    result["jax_has_adapter"] = jr.has_adapter
    names = ["iteration"] + (["generator_phase", "student_phase"] if phases else [])
    variants: Dict[str, Callable[[], float]] = {
        f"jax/{n}": functools.partial(jr.call, n) for n in names}
    threads_before = thread_ids()
    torch_runners = _torch_runners(config, torch_modes, seed, torch_channels_last, log, result)
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
    flops = jr.flops_per_iteration()
    result.update(_jax_figures(config, jr, timings, flops, dev, phases,
                               result["images_per_iter"]))
    for mode, tr in torch_runners.items():
        result.update(_torch_figures(mode, tr, timings, flops, phases, result["images_per_iter"],
                                     result["jax_ms_per_iter"]))
    if "eager" in torch_runners:
        result.update(_torch_extras(torch_runners["eager"], log))
    result.setdefault("torch_ms_per_iter", None)
    result.setdefault("speedup_vs_torch", None)
    result["torch_channels_last"] = bool(torch_channels_last)
    result["timings"] = {k: v.summary() for k, v in timings.items()}
    return flag_load(result)


def _jax_figures(config, jr, timings, flops, dev, phases, images_per_iter) -> Dict[str, Any]:
    it_ms = timings["jax/iteration"].median_ms
    prec = _precision(config, dev["platform"])
    peak = peak_flops(jax.local_devices()[0].device_kind, prec)
    out = {
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
    }
    if phases:
        for ph in ("generator_phase", "student_phase"):
            out[f"jax_{ph}_ms"] = round(timings[f"jax/{ph}"].median_ms, 3)
            out[f"jax_{ph}_flops"] = flops[ph]
        out["jax_phases_sum_ms"] = round(out["jax_generator_phase_ms"]
                                         + out["jax_student_phase_ms"], 3)
    return out


def _torch_figures(mode, tr, timings, flops, phases, images_per_iter, jax_ms) -> Dict[str, Any]:
    """One PyTorch mode's figures, prefixed `torch_` for eager (the primary baseline), else
    `torch_MODE_`."""
    p = "torch" if mode == "eager" else f"torch_{mode}"
    ms = timings[f"torch_{mode}/iteration"].median_ms
    out = {f"{p}_ms_per_iter": round(ms, 3),
           f"{p}_images_per_s": round(images_per_iter / (ms / 1e3), 2),
           f"{p}_iter_timing": timings[f"torch_{mode}/iteration"].summary(),
           f"speedup_vs_{p}": round(ms / jax_ms, 4),
           f"{p}_peak_memory_bytes": tr.peak_memory(),
           f"{p}_first_call_s": {k: round(v, 2) for k, v in tr.first_call_s.items()},
           "torch_device": tr.device()}
    if mode == "compile":   # the first calls trace and compile both loss graphs
        out["torch_compile_compile_s"] = round(sum(tr.first_call_s.values()), 2)
    if flops["iteration"] is not None:   # the same work: XLA's count of the identical iteration
        out[f"{p}_tflops_per_s"] = round(flops["iteration"] / (ms / 1e3) / 1e12, 4)
    if phases:
        for ph in ("generator_phase", "student_phase"):
            out[f"{p}_{ph}_ms"] = round(timings[f"torch_{mode}/{ph}"].median_ms, 3)
    return out


def _torch_extras(eager: TorchRunner, log) -> Dict[str, Any]:
    import torch
    try:
        flops = eager.flops_per_iteration()
    except Exception as e:  # noqa: BLE001 - a cross-check only
        log(f"  torch FLOP count failed: {type(e).__name__}: {e}")
        flops = None
    return {"torch_flops_per_iter_matmul_conv": flops, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads()}


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
