r"""cpsc-benchmark: time one CPSC-DFKD iteration (G_steps + S_steps) and each phase, JAX against
PyTorch.

    cpsc-benchmark --config mnist:released
    cpsc-benchmark --config cifar10 --config.teacher.arch=resnet20 \
        --config.student.arch=wrn_16_1 --config.batch_size=64 --config.g_steps=2 --torch=both
    cpsc-benchmark --config cifar10 --iters=20 --torch=none   # GPU
    cpsc-benchmark --config mnist:released --compare_loops   # scan vs unrolled
    cpsc-benchmark --config cifar10 --analysis      # FLOPs and compiled memory, nothing run

Random teacher/student/generator weights (timing does not depend on them). The JAX side runs
the project's pmapped iteration (cpsc_jax.method.steps) over all local devices; the PyTorch side
(cpsc_jax.pytorch.dfkd) runs the same networks, shapes and batch on one device (fp16 autocast on CUDA, fp32 on
CPU). Prints progress and a summary; the last line is one JSON object (jax_ms_per_iter,
torch_ms_per_iter, speedup_vs_torch, device, FLOPs, MFU, compile time, memory, ...).

A timing run refuses to start when the 1-min load average exceeds the core count (--force
overrides) and flags the JSON ("WARNING", first key) when it did at the start or the end.
"""
import os

from absl import flags

from cpsc_jax.cli import common


def define(F):
    common.define_config_flag(F)
    flags.DEFINE_integer("iters", 10, "Timed calls per variant (the median is reported).", flag_values=F)
    flags.DEFINE_integer("warmup", 2, "Untimed calls per variant before timing.", flag_values=F)
    flags.DEFINE_enum("torch", "eager", ["eager", "compile", "both", "none"],
                      "PyTorch baseline variant(s) to time in the same run.", flag_values=F)
    flags.DEFINE_bool("phases", True, "Also time the generator phase and the student phase alone.", flag_values=F)
    flags.DEFINE_bool("torch_channels_last", False,
                      "Run the PyTorch networks in channels_last memory format (default: NCHW, as "
                      "the released code).", flag_values=F)
    flags.DEFINE_bool("xla_cpu_tuned", False,
                      "Append the XLA:CPU flags found faster for this workload "
                      "(cpsc_jax.tools.benchmark.CPU_TUNED_XLA_FLAGS) to XLA_FLAGS, process-wide. The "
                      "data-parallel functions already compile with the same setting per "
                      "executable; kept for older commands.", flag_values=F)
    flags.DEFINE_enum("omp_wait_policy", "default", ["default", "passive"],
                      "OpenMP wait policy of PyTorch's CPU threads. 'default': the library's own "
                      "(threads spin a while before sleeping; fastest on an idle machine; either "
                      "way the harness waits, untimed, until they sleep before any JAX call). 'passive': "
                      "sets OMP_WAIT_POLICY=PASSIVE (unless already set): idle threads sleep, which "
                      "avoids collapses on a CPU shared with other busy processes but slows PyTorch "
                      "on a quiet one (docs/RESULTS.md).", flag_values=F)
    flags.DEFINE_bool("ynn_convolutions", False,
                      "Compile the JAX executables with XLA:CPU's convolutions on YNNPACK (jaxlib "
                      "0.10.2's default), instead of the project's default of XLA's own "
                      "(cpsc_jax.models.conv.xla_cpu_conv_options), to compare the two.",
                      flag_values=F)
    flags.DEFINE_bool("force", False, "Time even when the 1-min load average exceeds the core "
                      "count (the result is flagged).", flag_values=F)
    flags.DEFINE_bool("analysis", False,
                      "Instead of timing: compile (never run) the generator step, the student step "
                      "and the iteration at the config's batch and print XLA's FLOPs against an "
                      "analytic count of the necessary matmul/conv work, and XLA's compiled "
                      "memory.", flag_values=F)
    flags.DEFINE_bool("compare_loops", False,
                      "Instead of the JAX/PyTorch comparison: time the JAX iteration with its step "
                      "loops as lax.scan and unrolled (scan_unroll=1 and 2), round-robin.", flag_values=F)
    flags.DEFINE_string("output", None, "Also write the JSON result to this file.", flag_values=F)
    flags.DEFINE_integer("seed", 0, "Seed of the random networks.", flag_values=F)


def run(F, argv) -> int:
    from cpsc_jax.tools import benchmark as bm   # after flag parsing; no backend is initialised yet
    if F.xla_cpu_tuned:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + bm.CPU_TUNED_XLA_FLAGS).strip()
    if F.omp_wait_policy == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read when torch loads OpenMP
    modes = {"both": ["eager", "compile"], "none": []}.get(F.torch, [F.torch])
    log = lambda msg: print(msg, flush=True)
    options = bm.YNN_CONVOLUTION_OPTIONS if F.ynn_convolutions else None
    if F.analysis:
        _emit(F, bm.to_json_line(bm.analyse(F.config, log=log)))
        return 0
    if F.compare_loops:
        result = bm.compare_loop_forms(F.config, iters=F.iters, warmup=F.warmup,
                                       seed=F.seed, log=log, force=F.force,
                                       compiler_options=options)
        log(f"scan: {result['scan_ms_per_iter']:.1f} ms/iter, compile {result['scan_compile_s']:.1f}"
            f" s; unrolled: {result['unrolled_ms_per_iter']:.1f} ms/iter, compile "
            f"{result['unrolled_compile_s']:.1f} s; load {result['load_avg_start']} -> "
            f"{result['load_avg_end']}")
        if result.get("WARNING"):
            log(f"WARNING: {result['WARNING']}")
        _emit(F, bm.to_json_line(result))
        return 0
    result = bm.run_benchmark(F.config, iters=F.iters, warmup=F.warmup,
                              torch_modes=modes, phases=F.phases,
                              torch_channels_last=F.torch_channels_last, seed=F.seed,
                              log=log, force=F.force, compiler_options=options)
    for line in bm.format_summary(result):
        log(line)
    _emit(F, bm.to_json_line(result))
    return 0


def _emit(F, line: str) -> None:
    if F.output:
        with open(F.output, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


def main(argv=None):
    common.main(define, run, argv, required=("config",))


if __name__ == "__main__":
    main()
