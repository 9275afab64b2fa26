"""The benchmark harness (cpsc_jax/tools/benchmark/__init__.py, cpsc-benchmark) and its PyTorch baseline
(cpsc_jax.pytorch.dfkd). Fast: one tiny iteration of each framework."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpsc_jax.tools import benchmark as bm
from cpsc_jax.method import losses

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs" / "digits.py") + ":released", "--config.batch_size=8",
        "--config.g_steps=1", "--config.s_steps=1", "--config.generator.ngf=8",
        "--iters=2", "--warmup=1", "--nophases",
        "--force"]   # the tests time nothing they compare: a busy machine must not refuse them


def test_peak_flops_table():
    assert bm.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert bm.peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert bm.peak_flops("NVIDIA H200", "tf32") == pytest.approx(494.7e12)
    assert bm.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(19.5e12)
    assert bm.peak_flops("cpu", "fp32") is None


def test_timing_and_interleaving():
    order = []
    t = bm.time_interleaved({"a": lambda: order.append("a") or 0.002,
                             "b": lambda: order.append("b") or 0.004}, iters=3, warmup=1)
    assert order == ["a", "b"] * 4               # warm-up round, then 3 timed rounds
    assert t["a"].median_ms == pytest.approx(2.0) and t["b"].summary()["n"] == 3


def test_xla_flops_of_a_matmul():
    a = jnp.ones((64, 32))
    b = jnp.ones((32, 16))
    compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    assert bm.xla_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.05)


def _tail_json(stdout: str):
    last = stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.slow
def test_script_tiny_run_prints_json():
    torch_mode = "eager" if bm.torch_available() else "none"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *TINY,
                          f"--torch={torch_mode}"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = _tail_json(out.stdout)
    for key in ("jax_ms_per_iter", "torch_ms_per_iter", "speedup_vs_torch", "device",
                "jax_images_per_s", "jax_compile_s", "jax_flops_per_iter", "jax_mfu",
                "jax_peak_memory_bytes"):
        assert key in r, key
    assert r["jax_ms_per_iter"] > 0 and r["jax_flops_per_iter"] > 0
    assert r["images_per_iter"] == 16
    assert r["cores"] >= 1 and len(r["load_avg_start"]) == len(r["load_avg_end"]) == 3
    assert r["load_above_cores"] == ("WARNING" in r)
    if r["platform"] == "cpu" and r["xla_compiler_options"]:
        from cpsc_jax.models.conv import XLA_CPU_CONV_OPTIONS
        assert r["xla_compiler_options"] == XLA_CPU_CONV_OPTIONS
    if r["platform"] == "cpu":
        assert r["jax_mfu"] is None              # no known peak for CPUs
    if torch_mode == "eager":
        assert r["torch_ms_per_iter"] > 0
        assert r["torch_threads_parked"] >= 0 and r["torch_park_timeouts"] >= 0
        assert r["speedup_vs_torch"] == pytest.approx(
            r["torch_ms_per_iter"] / r["jax_ms_per_iter"], rel=1e-3)
        # Same networks and shapes: the conv/matmul FLOPs torch counts match XLA's count.
        assert r["torch_flops_per_iter_matmul_conv"] == pytest.approx(r["jax_flops_per_iter"],
                                                                      rel=0.15)


@pytest.mark.slow
def test_script_compare_loops_times_scan_and_unrolled():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *TINY,
                          "--compare_loops"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = _tail_json(out.stdout)
    for form in ("scan", "unrolled"):
        assert r[f"{form}_ms_per_iter"] > 0 and r[f"{form}_compile_s"] > 0
        assert r[f"{form}_iter_timing"]["n"] == 2
    assert r["scan_speedup_vs_unrolled"] == pytest.approx(
        r["unrolled_ms_per_iter"] / r["scan_ms_per_iter"], rel=1e-3)


# ----------------------------------------------------------------------------- torch baseline

needs_torch = pytest.mark.skipif(not bm.torch_available(), reason="PyTorch is not installed")


@needs_torch
def test_torch_losses_match_jax():
    import torch
    from cpsc_jax.pytorch import dfkd as td
    rng = np.random.default_rng(0)
    s = rng.normal(size=(12, 10)).astype(np.float32)
    t = rng.normal(size=(12, 10)).astype(np.float32)
    y = rng.integers(0, 10, size=12)
    f = rng.normal(size=(24, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    ts, tt, ty, tf = map(torch.from_numpy, (s, t, y, f))
    close = lambda a, b: np.testing.assert_allclose(float(a), float(b), rtol=1e-4, atol=1e-5)
    close(td.kd_loss(ts, tt), losses.kd_loss(s, t))
    for form in ("log", "mse"):
        close(td.ikd_generator_loss(ts, tt, form), losses.ikd_generator_loss(s, t, form))
        close(td.ikd_student_loss(ts, tt, form), losses.ikd_student_loss(s, t, form))
    for form in ("double_softmax", "plain"):
        close(td.cross_entropy(ts, ty, form), losses.cross_entropy_loss(s, y, form))
    labels = np.concatenate([y, y])
    close(td.supcon_loss(tf, torch.from_numpy(labels)), losses.supcon_loss(f, labels))


@needs_torch
def test_torch_iteration_runs_and_matches_shapes():
    import torch
    from cpsc_jax.pytorch import models as tm
    from cpsc_jax.pytorch.dfkd import TorchDFKD
    from conftest import load_config
    c = load_config("cifar10")
    c.teacher.arch, c.student.arch = "resnet20", "wrn_16_1"
    c.batch_size, c.g_steps, c.s_steps = 4, 1, 1
    c.generator.ngf = 8
    b = TorchDFKD(c, device="cpu")
    g_loss, s_loss = b.iteration()
    assert torch.isfinite(g_loss) and torch.isfinite(s_loss)
    assert len(b.hooks) == 19                    # every BN of the ResNet-20 teacher
    x = b.G(torch.randn(2, c.generator.nz), torch.tensor([0, 1]))
    assert x.shape == (2, 3, 32, 32)
    for arch, dim in (("resnet18", 512), ("resnet20", 64), ("wrn_16_2", 128),
                      ("lenet5_half", 60)):
        ch = 1 if arch.startswith("lenet") else 3
        assert tm.feature_dim(tm.get_model(arch, 10, ch), 32, ch) == dim


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_generator_runs_in_the_layout_its_weights_were_given(channels_last):
    # The benchmark's PyTorch side is NCHW as released unless --torch_channels_last; a layout
    # leaking from the generator's first reshape once made the default channels-last.
    import torch
    from cpsc_jax.pytorch.dfkd import TorchDFKD
    from conftest import load_config
    c = load_config("cifar10")      # 3 channels: the two layouts differ in the output too
    c.teacher.arch, c.student.arch = "resnet20", "resnet20"
    c.batch_size, c.generator.ngf = 4, 8
    b = TorchDFKD(c, device="cpu", channels_last=channels_last)
    with torch.no_grad():
        x = b.G(torch.randn(4, c.generator.nz), torch.tensor([0, 1, 2, 3]))
    wanted = torch.channels_last if channels_last else torch.contiguous_format
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=wanted)


# ----------------------------------------------------------------------------- hygiene


def test_a_busy_machine_is_refused_unless_forced_and_flagged():
    with pytest.raises(bm.LoadTooHigh, match="1-min load average is 3.5 on 2 cores"):
        bm.check_load(cores=2, load=[3.5, 2.0, 1.0])
    assert bm.check_load(force=True, cores=2, load=[3.5, 2.0, 1.0]) == [3.5, 2.0, 1.0]
    assert bm.check_load(cores=2, load=[1.2, 2.5, 3.0]) == [1.2, 2.5, 3.0]
    quiet = bm.flag_load({"load_avg_start": [1.2, 1, 1], "load_avg_end": [1.4, 1, 1]}, cores=2)
    assert quiet["load_above_cores"] is False and "WARNING" not in quiet
    busy = bm.flag_load({"load_avg_start": [1.2, 1, 1], "load_avg_end": [2.4, 1, 1]}, cores=2)
    assert busy["load_above_cores"] is True and list(busy)[0] == "WARNING"
    assert "not comparable" in busy["WARNING"]
    assert bm.format_summary(dict(busy, device="cpu", platform="cpu", num_devices=1, timings={},
                                  jax_ms_per_iter=1.0, jax_images_per_s=1.0, jax_compile_s=1.0,
                                  jax_flops_per_iter=1.0, jax_mfu=None))[0].startswith("WARNING")


@needs_torch
def test_torch_threads_are_parked_after_each_call():
    """After a multi-threaded PyTorch call, its OpenMP workers spin for a while; the harness
    waits until they sleep, so a JAX call timed next does not compete with them."""
    import threading
    import torch
    if bm.thread_ids() is None:
        pytest.skip("needs /proc (Linux)")
    torch.set_num_threads(2)
    a = torch.randn(256, 256)
    torch.mm(a, a)                                   # starts the OpenMP workers
    others = bm.thread_ids() - {threading.get_native_id()}
    parked = bm.ParkedThreads(others)
    parked.wrap(lambda: float(torch.mm(a, a).sum()) * 0.0)()
    assert parked.timeouts == 0 and len(parked.waits_s) == 1
    assert bm.running_threads(others) == []
    assert parked.summary()["torch_threads_parked"] == len(others)


def test_matmul_flop_count_matches_xla_for_forward_convs_and_dots():
    cases = [((2, 8, 8, 3), (3, 3, 3, 4), 1, 1), ((2, 7, 7, 3), (3, 3, 3, 4), 2, 1),
             ((2, 9, 9, 2), (5, 5, 2, 3), 1, 0)]
    for x_shape, w_shape, stride, pad in cases:
        f = lambda x, w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x, w = jnp.ones(x_shape), jnp.ones(w_shape)
        assert bm.matmul_flops(jax.make_jaxpr(f)(x, w)) == [bm.xla_flops(jax.jit(f).lower(x, w)
                                                                         .compile())]
    g = lambda a, b: jnp.tanh(a @ b) @ b.T
    a, b = jnp.ones((16, 8)), jnp.ones((8, 4))
    assert bm.matmul_flops(jax.make_jaxpr(g)(a, b)) == [2 * 16 * 8 * 4, 2 * 16 * 4 * 8]


@pytest.mark.parametrize("adapter", ["frozen", "sgd"])
def test_necessary_work_is_the_sum_of_the_needed_products(adapter):
    from conftest import tiny_digits_config
    c = tiny_digits_config("conditioned")   # fresh images only
    c.adapter_optimizer = adapter
    n = bm.necessary_flops(c)
    fwd = n["forward"]
    g, t, s = fwd["generator"], fwd["teacher"], fwd["student"]
    assert min(g, t, s) > 0
    # G: forward, weight and input gradients (not its first layer's); T and S: forward and input
    # gradients; the adapter: forward and input gradients, and weight gradients when it trains.
    a = (2 if adapter == "frozen" else 3) * fwd["adapter"]
    assert g < n["generator_step"] - 2 * t - 2 * s - a < 3 * g
    c.adapter_optimizer = "sgd" if adapter == "frozen" else "frozen"
    other = bm.necessary_flops(c)["generator_step"]
    assert abs(n["generator_step"] - other) == fwd["adapter"] > 0   # its weight gradients
    # Student step: G and T forward, S forward + weight + input gradients (not the first layer's).
    assert g + t + 2 * s < n["student_step"] < g + t + 3 * s
    # A replayed half-batch of the same size doubles what follows G; "replay" alone drops G.
    c.student_data, c.replay_batch = "fresh+replay", c.batch_size
    assert bm.necessary_flops(c)["student_step"] - g == pytest.approx(2 * (n["student_step"] - g))
    c.student_data = "replay"
    assert bm.necessary_flops(c)["student_step"] == pytest.approx(n["student_step"] - g)


@pytest.mark.slow
def test_script_analysis_prints_flops_and_memory_without_running():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The conditioned preset: XLA's cost analysis counts the replay pool's in-place update as
    # work over the whole pool, which is not a product the iteration computes twice.
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--config",
                          str(REPO / "configs" / "digits.py") + ":conditioned",
                          "--config.batch_size=8", "--config.generator.ngf=4", "--analysis"],
                         capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = _tail_json(out.stdout)
    assert r["mode"] == "analysis" and r["batch_size"] == 8
    for name in ("generator_step", "student_step", "iteration"):
        assert r[f"{name}_xla_flops"] > 0 and r[f"{name}_necessary_flops"] > 0
        assert r[f"{name}_memory"]["temp_size_in_bytes"] > 0
        # Elementwise work on top of the products, nothing computed twice.
        assert 1.0 <= r[f"{name}_xla_over_necessary"] < 1.5
    assert "generator_step" in out.stdout and "necessary" in out.stdout


def test_the_pytorch_baseline_refuses_a_student_phase_it_does_not_run():
    from conftest import tiny_digits_config
    config = tiny_digits_config("improved")
    with pytest.raises(bm.BaselineMismatch, match="student_data='fresh\\+replay'.*--torch none"):
        bm.run_benchmark(config, torch_modes=["eager"], force=True, log=lambda *_: None)
    config.loss.student_ikd_scale = 3.0
    config.student_data = "fresh"
    with pytest.raises(bm.BaselineMismatch, match="loss.student_ikd_scale=3.0"):
        bm.run_benchmark(config, torch_modes=["eager"], force=True, log=lambda *_: None)
