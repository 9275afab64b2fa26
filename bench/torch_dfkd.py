"""The CPSC-DFKD training iteration in PyTorch, as the released code runs it (spec section 4),
for timing against the JAX iteration on the same networks, shapes and batch.

One iteration = G_steps generator steps, each with fresh (z, y) and a NEW Adam (released
behaviour; `generator_optimizer='persistent'` keeps one), minimising
    -KD + alpha*IKD_G + beta*BN-stat + gamma*SupCon + eta*CE(double softmax, teacher),
with the teacher's BN-input moments read by forward hooks (DeepInversion style), the student in
training mode (its BN running averages move) and the adapter (when the feature widths differ)
stepping with SGD; then S_steps student steps: x = G(z, y) without gradient (G in training mode),
teacher logits, KD + alpha*IKD_S + eta*CE(student), SGD momentum 0.9, weight decay 5e-4,
warm-up + cosine learning rate.

Two deliberate differences from the released script, both in its favour (fewer FLOPs, same
mathematics as the JAX side): during the generator phase the student's parameters have
`requires_grad=False` (the released code also computes, and then discards, the student's weight
gradients there), and the BN hooks only compute in the generator phase (the released hooks also
run, unused, in the student phase).

Precision: fp16 autocast (+ GradScaler) on CUDA, as the released code; fp32 on CPU.
Modes: "eager", or "compile" (`torch.compile` of the two loss functions: generator, teacher and
student forward passes and the losses; backward through AOTAutograd; optimizer steps eager).
"""
import contextlib
import math
import time
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from bench.torch_models import FeatureAdapter, GeneratorD, feature_dim, get_model


# ----------------------------------------------------------------------------- losses (spec 3)

def kd_loss(s, t):
    """KL(softmax(t) || softmax(s)), summed over classes, batch mean, T = 1."""
    return F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")


def ikd_generator_loss(s, t, form):
    mse = F.mse_loss(s, t)
    return -torch.log(mse) if form == "log" else -mse


def ikd_student_loss(s, t, form):
    if form == "log":
        return torch.log(torch.norm(t - s, 2))
    return F.mse_loss(s, t)


def cross_entropy(logits, y, form):
    if form == "double_softmax":   # released: softmax fed to a CE that applies softmax again
        return F.cross_entropy(F.softmax(logits, 1), y)
    return F.cross_entropy(logits, y)


def supcon_loss(features, labels, temperature=0.07, base_temperature=0.07):
    """Khosla et al. SupCon over N unit vectors: positives = same label, not self."""
    n = features.shape[0]
    logits = features @ features.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    log_den = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    log_prob = logits - log_den
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    mean_log_pos = (log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_log_pos.mean()


class BNStatHook:
    """DeepInversion hook: ||var_batch - running_var||_2 + ||mean_batch - running_mean||_2 of a
    teacher BN layer's input (biased variance over batch and space)."""

    def __init__(self, module):
        self.module = module
        self.enabled = False
        self.r_feature = None
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if not self.enabled:
            return
        x = inputs[0].float()
        c = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).reshape(c, -1).var(1, unbiased=False)
        self.r_feature = (torch.norm(module.running_var - var, 2)
                          + torch.norm(module.running_mean - mean, 2))


def _cfg(config, name, default=None):
    """Attribute of an ml_collections ConfigDict or a plain namespace/dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


# ----------------------------------------------------------------------------- the iteration

class TorchDFKD:
    """Networks, optimizers and step functions of one benchmarked setting."""

    def __init__(self, config, teacher_arch: Optional[str] = None, device: Optional[str] = None,
                 mode: str = "eager", seed: int = 0, channels_last: bool = False):
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mode = mode
        torch.manual_seed(seed)
        c = config
        self.c = c
        self.k, self.size, self.ch = c.num_classes, c.image_size, c.channels
        self.batch, self.nz = c.batch_size, c.generator.nz
        self.g_steps, self.s_steps = c.g_steps, c.s_steps
        self.w = c.loss
        self.amp = self.device.type == "cuda"
        if self.amp:
            torch.backends.cudnn.benchmark = True
        mf = torch.channels_last if channels_last else torch.contiguous_format

        self.G = GeneratorD(self.k, self.size, self.ch, self.nz, c.generator.ngf,
                            c.generator.num_upsamples).to(self.device, memory_format=mf)
        self.T = get_model(teacher_arch or c.teacher.arch, self.k, self.ch).to(self.device,
                                                                               memory_format=mf)
        self.S = get_model(c.student.arch, self.k, self.ch).to(self.device, memory_format=mf)
        self.T.eval()
        for p in self.T.parameters():
            p.requires_grad_(False)
        d_s = feature_dim(self.S, self.size, self.ch)
        d_t = feature_dim(self.T, self.size, self.ch)
        self.A = FeatureAdapter(d_s, d_t).to(self.device) if d_s != d_t else None
        self.hooks = [BNStatHook(m) for m in self.T.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]

        # Student SGD + warm-up/cosine schedule per step (spec 4); the adapter steps with G.
        self.opt_S = torch.optim.SGD(self.S.parameters(), c.lr_student, momentum=c.momentum,
                                     weight_decay=c.weight_decay)
        self.sched_S = torch.optim.lr_scheduler.LambdaLR(self.opt_S, self._schedule(c.s_steps))
        self.opt_A = self.sched_A = None
        if self.A is not None:
            self.opt_A = torch.optim.SGD(self.A.parameters(), c.lr_student, momentum=c.momentum,
                                         weight_decay=c.weight_decay)
            self.sched_A = torch.optim.lr_scheduler.LambdaLR(self.opt_A,
                                                             self._schedule(c.g_steps))
        self.persistent_adam = c.generator_optimizer == "persistent"
        self.opt_G = self._new_adam() if self.persistent_adam else None
        self.scaler_G = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.scaler_S = torch.amp.GradScaler("cuda", enabled=self.amp)

        self._g_loss = self._generator_loss
        self._s_loss = self._student_loss
        if mode == "compile":
            self._g_loss = torch.compile(self._generator_loss)
            self._s_loss = torch.compile(self._student_loss)

    # -- helpers
    def _schedule(self, steps_per_iteration):
        c = self.c
        per_epoch = c.epoch_itrs * steps_per_iteration
        total = c.epochs * per_epoch
        warm = min(c.warmup_epochs * per_epoch, total - 1)

        def factor(step):
            if step < warm:
                return step / max(warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / (total - warm)))
        return factor

    def _new_adam(self):
        return torch.optim.Adam(self.G.parameters(), self.c.lr_generator,
                                betas=(self.c.adam_b1, self.c.adam_b2),
                                eps=_cfg(self.c, "adam_eps", 1e-8))

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _sample(self):
        z = torch.randn(self.batch, self.nz, device=self.device)
        y = torch.randint(0, self.k, (self.batch,), device=self.device)
        return z, y

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- losses (the compiled parts in "compile" mode)
    def _generator_loss(self, z, y):
        w = self.w
        with self._autocast():
            x = self.G(z, y)
            t_logits, t_feat = self.T(x, features=True)
            s_logits, s_feat = self.S(x, features=True)
        t_logits, s_logits = t_logits.float(), s_logits.float()
        loss = -w.kd * kd_loss(s_logits, t_logits)
        loss = loss + w.alpha * ikd_generator_loss(s_logits, t_logits, w.ikd_form)
        if w.beta > 0:
            loss = loss + w.beta * sum(h.r_feature for h in self.hooks)
        if w.gamma > 0:
            v_s = F.normalize(s_feat.float(), dim=1)
            if self.A is not None:
                v_s = F.normalize(self.A(v_s), dim=1)
            feats = torch.cat([v_s, F.normalize(t_feat.float(), dim=1)])
            loss = loss + w.gamma * supcon_loss(feats, torch.cat([y, y]), w.temperature,
                                                w.base_temperature)
        if w.eta > 0:
            loss = loss + w.eta * cross_entropy(t_logits, y, w.ce_form)
        return loss

    def _student_loss(self, z, y):
        w = self.w
        with torch.no_grad(), self._autocast():
            x = self.G(z, y)             # G in training mode: batch statistics, running stats move
            t_logits = self.T(x).float()
        with self._autocast():
            s_logits = self.S(x).float()
        loss = w.kd * kd_loss(s_logits, t_logits)
        loss = loss + w.alpha * ikd_student_loss(s_logits, t_logits, w.ikd_form)
        if w.eta > 0:
            loss = loss + w.eta * cross_entropy(s_logits, y, w.ce_form)
        return loss

    # -- steps
    def _set_phase(self, generator: bool):
        self.G.train()
        self.S.train()
        for p in self.S.parameters():
            p.requires_grad_(not generator)
        for h in self.hooks:
            h.enabled = generator and self.w.beta > 0

    def generator_step(self):
        z, y = self._sample()
        opt = self.opt_G if self.persistent_adam else self._new_adam()  # released: new Adam
        loss = self._g_loss(z, y)
        opt.zero_grad(set_to_none=True)
        if self.opt_A is not None:
            self.opt_A.zero_grad(set_to_none=True)
        self.scaler_G.scale(loss).backward()
        self.scaler_G.step(opt)
        if self.opt_A is not None:
            self.scaler_G.step(self.opt_A)
            self.sched_A.step()
        self.scaler_G.update()
        return loss.detach()

    def student_step(self):
        z, y = self._sample()
        loss = self._s_loss(z, y)
        self.opt_S.zero_grad(set_to_none=True)
        self.scaler_S.scale(loss).backward()
        self.scaler_S.step(self.opt_S)
        self.scaler_S.update()
        self.sched_S.step()
        return loss.detach()

    def generator_phase(self):
        self._set_phase(True)
        return [self.generator_step() for _ in range(self.g_steps)]

    def student_phase(self):
        self._set_phase(False)
        return [self.student_step() for _ in range(self.s_steps)]

    def iteration(self):
        """One full DFKD iteration; returns the last generator and student losses (tensors)."""
        g = self.generator_phase()
        s = self.student_phase()
        return g[-1], s[-1]

    def count_flops(self) -> Optional[int]:
        """Matmul/conv FLOPs of one iteration (forward + backward) by torch's FlopCounterMode."""
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError:
            return None
        counter = FlopCounterMode(display=False)
        with counter:
            self.iteration()
        self.sync()
        return int(counter.get_total_flops())


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
