#!/usr/bin/env python
"""Time one CPSC-DFKD iteration (G_steps + S_steps) and each phase, JAX against PyTorch.

    python scripts/benchmark.py --config configs/mnist.py
    python scripts/benchmark.py --config configs/cifar10.py --config.teacher.arch=resnet20 \\
        --config.student.arch=wrn_16_1 --config.batch_size=64 --config.g_steps=2 --torch=both
    python scripts/benchmark.py --config configs/cifar10.py --iters=20 --torch=none   # GPU
    python scripts/benchmark.py --config configs/mnist.py --compare_loops   # scan vs unrolled

Random teacher/student/generator weights (timing does not depend on them). The JAX side runs
the project's pmapped iteration (cpsc_jax.steps) over all local devices; the PyTorch side
(bench/) runs the same networks, shapes and batch on one device (fp16 autocast on CUDA, fp32 on
CPU). Prints progress and a summary; the last line is one JSON object (jax_ms_per_iter,
torch_ms_per_iter, speedup_vs_torch, device, FLOPs, MFU, compile time, memory, ...).
"""
import os
import sys

try:
    import cpsc_jax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).", lock_config=True)
flags.DEFINE_integer("iters", 10, "Timed calls per variant (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per variant before timing.")
flags.DEFINE_enum("torch", "eager", ["eager", "compile", "both", "none"],
                  "PyTorch baseline variant(s) to time in the same run.")
flags.DEFINE_bool("phases", True, "Also time the generator phase and the student phase alone.")
flags.DEFINE_bool("torch_channels_last", False,
                  "Run the PyTorch networks in channels_last memory format (default: NCHW, as "
                  "the released code).")
flags.DEFINE_bool("xla_cpu_tuned", False,
                  "Append the XLA:CPU flags found faster for this workload "
                  "(cpsc_jax.benchmark.CPU_TUNED_XLA_FLAGS) to XLA_FLAGS.")
flags.DEFINE_enum("omp_wait_policy", "default", ["default", "passive"],
                  "OpenMP wait policy of PyTorch's CPU threads. 'default': the library's own "
                  "(threads spin a while before sleeping; fastest on an idle machine). 'passive': "
                  "sets OMP_WAIT_POLICY=PASSIVE (unless already set): idle threads sleep, which "
                  "avoids collapses on a CPU shared with other busy processes but costs PyTorch "
                  "~20-30% on a quiet one.")
flags.DEFINE_bool("compare_loops", False,
                  "Instead of the JAX/PyTorch comparison: time the JAX iteration with its step "
                  "loops as lax.scan and unrolled (scan_unroll=1 and 2), round-robin.")
flags.DEFINE_string("output", None, "Also write the JSON result to this file.")
flags.DEFINE_integer("seed", 0, "Seed of the random networks.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cpsc_jax import benchmark as bm   # after flag parsing; no backend is initialised yet
    if FLAGS.xla_cpu_tuned:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + bm.CPU_TUNED_XLA_FLAGS).strip()
    if FLAGS.omp_wait_policy == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read when torch loads OpenMP
    modes = {"both": ["eager", "compile"], "none": []}.get(FLAGS.torch, [FLAGS.torch])
    log = lambda msg: print(msg, flush=True)
    if FLAGS.compare_loops:
        result = bm.compare_loop_forms(FLAGS.config, iters=FLAGS.iters, warmup=FLAGS.warmup,
                                       seed=FLAGS.seed, log=log)
        log(f"scan: {result['scan_ms_per_iter']:.1f} ms/iter, compile {result['scan_compile_s']:.1f}"
            f" s; unrolled: {result['unrolled_ms_per_iter']:.1f} ms/iter, compile "
            f"{result['unrolled_compile_s']:.1f} s; load {result['load_avg_start']} -> "
            f"{result['load_avg_end']}")
        _emit(bm.to_json_line(result))
        return
    result = bm.run_benchmark(FLAGS.config, iters=FLAGS.iters, warmup=FLAGS.warmup,
                              torch_modes=modes, phases=FLAGS.phases,
                              torch_channels_last=FLAGS.torch_channels_last, seed=FLAGS.seed,
                              log=log)
    for line in bm.format_summary(result):
        log(line)
    _emit(bm.to_json_line(result))


def _emit(line: str) -> None:
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    app.run(main)
