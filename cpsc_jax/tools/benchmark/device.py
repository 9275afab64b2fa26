"""The device measured: its description and peak rates, and the XLA:CPU compiler settings
found to speed this workload up."""
import os
import platform
from typing import Any, Dict, Optional

import jax

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

def peak_flops(device_kind: str, precision: str) -> Optional[float]:
    """Peak FLOP/s of one device of this kind at this precision, or None if unknown."""
    kind = device_kind.upper()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.upper() in kind:
            return PEAK_FLOPS[key].get(precision)
    return None


def device_peak_memory(device) -> Optional[int]:
    """Peak bytes in use on a device since start, where the backend reports it (not XLA:CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


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

