"""The two sides timed: the project's pmapped iteration (JAX) and the PyTorch baseline of the
same iteration (`cpsc_jax.pytorch.dfkd`, imported lazily: torch stays optional)."""
import time
from typing import Any, Callable, Dict, Optional

import jax

from cpsc_jax.tools.benchmark.flops import xla_flops, xla_memory


class JaxRunner:
    """The JAX iteration (and its phases) compiled ahead of time on random networks."""

    def __init__(self, config, num_devices: Optional[int] = None, phases: bool = True,
                 donate: bool = True, seed: int = 0, log: Callable[[str], None] = print,
                 compiler_options: Optional[Dict[str, Any]] = None):
        from cpsc_jax.infra import runtime
        from cpsc_jax.method import steps
        from cpsc_jax.infra.checkpoint import ModelSpec, init_variables

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
        # Each network's init is compiled once (`models.compiled_init`); the state is replicated
        # like the iteration's outputs, or the second call would recompile.
        state = steps.init_state(nets, config, k_state)
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
