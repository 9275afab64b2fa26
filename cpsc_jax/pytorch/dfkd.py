"""The released CPSC-DFKD training iteration in PyTorch (docs/method.md, section 4), faithful
to the authors' code including its oddities:

* generator phase, G_steps times: fresh (z, y), a NEW Adam at every step (so a bias-corrected
  first step; `generator_optimizer='persistent'` keeps one), minimising
  -KD + alpha*IKD_G + beta*BN-stat + gamma*SupCon + eta*CE(teacher), with the teacher's logits
  detached in IKD_G only, the teacher's BN-input moments read by forward hooks, the student in
  training mode (its BN running averages move), and the adapter head's raw output (not
  normalised again) as the student's view; the adapter never changes (released) unless
  `adapter_optimizer='sgd'`;
* student phase, S_steps times: x = G(z, y) without gradient, G in training mode, KD +
  alpha*IKD_S + student_eta*CE(student), SGD with momentum and weight decay; the learning rate stepped
  once per epoch (warm-up lr*e/W, then lr*(1 + cos(pi*(e - W)/E))/2), or per step.

It is the PyTorch baseline of the benchmark and the reference of the float64 parity test
(tests/test_parity.py): `generator_step(z, y)` / `student_step(z, y)` take the latents and labels
the JAX iteration drew, and return every loss term.

Two differences from the released script that change no number: during the generator phase the
student's parameters have `requires_grad=False` (the released code computes, then discards, their
gradients), and the BN hooks only compute in the generator phase.

Precision: fp16 autocast (+ GradScaler) on CUDA as released, fp32 on CPU, or `dtype=float64`.
Modes: "eager", or "compile" (`torch.compile` of the two loss functions).
"""
import contextlib
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from cpsc_jax.pytorch.models import ConditionalGenerator, FeatureAdapter, feature_dim, get_model


# ----------------------------------------------------------------------------- losses

def kd_loss(s, t):
    """KL(softmax(t) || softmax(s)), summed over classes, batch mean, T = 1."""
    return F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")


def ikd_generator_loss(s, t, form):
    mse = F.mse_loss(s, t.detach())   # released: the teacher is detached in this term
    return -torch.log(mse) if form == "log" else -mse


def ikd_student_loss(s, t, form):
    if form == "log":
        return torch.log(torch.norm(t - s, 2))   # Frobenius norm of the whole [B, K] difference
    return F.mse_loss(s, t)


def cross_entropy(logits, y, form):
    if form == "double_softmax":   # released: softmax fed to a CE that applies softmax again
        return F.cross_entropy(F.softmax(logits, 1), y)
    return F.cross_entropy(logits, y)


def supcon_loss(features, labels, temperature=0.07, base_temperature=0.07):
    """Khosla et al. SupCon over N vectors: positives = same label, not self."""
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
        x = inputs[0]
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        c = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).reshape(c, -1).var(1, unbiased=False)
        self.r_feature = (torch.norm(module.running_var - var, 2)
                          + torch.norm(module.running_mean - mean, 2))


def student_lr(config, step: int, steps_per_iteration: int) -> float:
    """The student's learning rate at its `step`-th update (0-based); see the module doc."""
    lr, warm, epochs = config.lr_student, config.warmup_epochs, config.epochs
    per_epoch = config.epoch_itrs * steps_per_iteration
    if config.student_schedule == "per_epoch":
        e = step // per_epoch + 1
        if e <= warm:
            return lr * e / max(warm, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * (e - warm) / epochs))
    total = epochs * per_epoch
    w = min(warm * per_epoch, total - 1)
    if step < w:
        return lr * step / max(w, 1)
    return lr * 0.5 * (1 + math.cos(math.pi * min(step - w, total - w) / (total - w)))


# ----------------------------------------------------------------------------- the iteration

class TorchDFKD:
    """Networks, optimizers and step functions of one setting."""

    def __init__(self, config, teacher_arch: Optional[str] = None, device: Optional[str] = None,
                 mode: str = "eager", seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mode, self.dtype = mode, dtype
        torch.manual_seed(seed)
        c = config
        self.c = c
        self.k, self.size, self.ch = c.num_classes, c.image_size, c.channels
        self.batch, self.nz = c.batch_size, c.generator.nz
        self.g_steps, self.s_steps = c.g_steps, c.s_steps
        self.w = c.loss
        self.amp = self.device.type == "cuda" and dtype == torch.float32
        if self.amp:
            torch.backends.cudnn.benchmark = True
        mf = torch.channels_last if channels_last else torch.contiguous_format
        place = dict(device=self.device, dtype=dtype)

        self.G = ConditionalGenerator(self.k, self.size, self.ch, self.nz, c.generator.ngf,
                                      c.generator.num_upsamples).to(**place).to(memory_format=mf)
        self.T = get_model(teacher_arch or c.teacher.arch, self.k, self.ch).to(**place).to(
            memory_format=mf)
        self.S = get_model(c.student.arch, self.k, self.ch).to(**place).to(memory_format=mf)
        self.T.eval()
        for p in self.T.parameters():
            p.requires_grad_(False)
        d_s = feature_dim(self.S, self.size, self.ch)
        d_t = feature_dim(self.T, self.size, self.ch)
        self.A = FeatureAdapter(d_s, d_t).to(**place) if d_s != d_t else None
        self.hooks = [BNStatHook(m) for m in self.T.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]

        self.opt_S = torch.optim.SGD(self.S.parameters(), c.lr_student, momentum=c.momentum,
                                     weight_decay=c.weight_decay)
        self.student_updates = 0
        self.train_adapter = self.A is not None and c.adapter_optimizer == "sgd"
        self.opt_A = None
        self.adapter_updates = 0
        if self.A is not None:
            for p in self.A.parameters():
                p.requires_grad_(self.train_adapter)
        if self.train_adapter:
            self.opt_A = torch.optim.SGD(self.A.parameters(), c.lr_student, momentum=c.momentum,
                                         weight_decay=c.weight_decay)
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
    def _new_adam(self):
        return torch.optim.Adam(self.G.parameters(), self.c.lr_generator,
                                betas=(self.c.adam_b1, self.c.adam_b2), eps=self.c.adam_eps)

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _sample(self, z, y):
        if z is None:
            z = torch.randn(self.batch, self.nz, device=self.device, dtype=self.dtype)
            y = torch.randint(0, self.k, (self.batch,), device=self.device)
        return (torch.as_tensor(z, dtype=self.dtype, device=self.device),
                torch.as_tensor(y, dtype=torch.long, device=self.device))

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
        t_logits, s_logits = t_logits.to(self.dtype), s_logits.to(self.dtype)
        terms = {}
        loss = 0.0
        if w.kd > 0:
            terms["kd"] = kd_loss(s_logits, t_logits)
            loss = loss - w.kd * terms["kd"]
        if w.alpha > 0:
            terms["ikd"] = ikd_generator_loss(s_logits, t_logits, w.ikd_form)
            loss = loss + w.alpha * terms["ikd"]
        if w.beta > 0:
            terms["bn"] = sum(h.r_feature for h in self.hooks)
            loss = loss + w.beta * terms["bn"]
        if w.gamma > 0:
            v_s = F.normalize(s_feat.to(self.dtype), dim=1)
            if self.A is not None:
                v_s = self.A(v_s)   # released: the head's raw output is the student's view
            feats = torch.cat([v_s, F.normalize(t_feat.to(self.dtype), dim=1)])
            terms["supcon"] = supcon_loss(feats, torch.cat([y, y]), w.temperature,
                                          w.base_temperature)
            loss = loss + w.gamma * terms["supcon"]
        if w.eta > 0:
            terms["ce"] = cross_entropy(t_logits, y, w.ce_form)
            loss = loss + w.eta * terms["ce"]
        terms["teacher_agrees"] = (t_logits.argmax(1) == y).to(self.dtype).mean()
        return loss, terms

    def _student_loss(self, z, y):
        w = self.w
        with torch.no_grad(), self._autocast():
            x = self.G(z, y)             # G in training mode: batch statistics, running stats move
            t_logits = self.T(x).to(self.dtype)
        with self._autocast():
            s_logits = self.S(x).to(self.dtype)
        terms = {}
        loss = 0.0
        if w.kd > 0:
            terms["kd"] = kd_loss(s_logits, t_logits)
            loss = loss + w.kd * terms["kd"]
        if w.alpha > 0:
            terms["ikd"] = ikd_student_loss(s_logits, t_logits, w.ikd_form)
            loss = loss + w.alpha * terms["ikd"]
        if w.student_eta > 0:
            terms["ce"] = cross_entropy(s_logits, y, w.student_ce_form)
            loss = loss + w.student_eta * terms["ce"]
        terms["agreement"] = (s_logits.argmax(1) == t_logits.argmax(1)).to(self.dtype).mean()
        return loss, terms

    # -- steps
    def _set_phase(self, generator: bool):
        self.G.train()
        self.S.train()
        for p in self.S.parameters():
            p.requires_grad_(not generator)
        for h in self.hooks:
            h.enabled = generator and self.w.beta > 0

    def generator_step(self, z=None, y=None) -> Dict[str, torch.Tensor]:
        self._set_phase(True)
        z, y = self._sample(z, y)
        opt = self.opt_G if self.persistent_adam else self._new_adam()  # released: new Adam
        loss, terms = self._g_loss(z, y)
        opt.zero_grad(set_to_none=True)
        if self.opt_A is not None:
            self.opt_A.zero_grad(set_to_none=True)
            for group in self.opt_A.param_groups:   # the adapter steps once per generator step
                group["lr"] = student_lr(self.c, self.adapter_updates, self.g_steps)
        self.scaler_G.scale(loss).backward()
        self.scaler_G.step(opt)
        if self.opt_A is not None:
            self.scaler_G.step(self.opt_A)
            self.adapter_updates += 1
        self.scaler_G.update()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def student_step(self, z=None, y=None) -> Dict[str, torch.Tensor]:
        self._set_phase(False)
        z, y = self._sample(z, y)
        for group in self.opt_S.param_groups:
            group["lr"] = student_lr(self.c, self.student_updates, self.s_steps)
        loss, terms = self._s_loss(z, y)
        self.opt_S.zero_grad(set_to_none=True)
        self.scaler_S.scale(loss).backward()
        self.scaler_S.step(self.opt_S)
        self.scaler_S.update()
        self.student_updates += 1
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def generator_phase(self):
        return [self.generator_step() for _ in range(self.g_steps)]

    def student_phase(self):
        return [self.student_step() for _ in range(self.s_steps)]

    def iteration(self):
        """One full DFKD iteration; returns the last generator and student losses (tensors)."""
        g = self.generator_phase()
        s = self.student_phase()
        return g[-1]["loss"], s[-1]["loss"]

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
