"""Supervised training of a teacher classifier on a real training split (the released recipe).

SGD with momentum 0.9, weight decay 5e-4 added to the gradient (as PyTorch's SGD does), a cosine
learning-rate schedule, random crops after zero padding and horizontal flips (on device, in
pixel space before normalisation, as torchvision does). The step is data-parallel through
`cpsc_jax.infra.runtime` (the same pmap SPMD as distillation): the state stays unreplicated, each
device takes its share of the global batch (indices drawn from one global permutation, so any
number of processes x devices runs the same global batches), gradients are averaged and
BatchNorm uses the moments of the global batch.

A run in WORKDIR writes
    WORKDIR/teacher_state/         orbax checkpoints of the train state (resume)
    WORKDIR/teacher_metrics.jsonl  one JSON object per epoch
    WORKDIR/teacher_config.json    the run's config (a resume with other values is refused)
    WORKDIR/teacher/               the final model checkpoint (`checkpoint.save_model`)
Re-running with the same WORKDIR resumes from the last saved epoch; a finished run returns at
once. Configs: `cpsc_jax.config.defaults.teacher_config` (`configs/teacher.py:DATASET[,ARCH]`).
"""
import math
import os
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpsc_jax import data as data_lib
from cpsc_jax.config.validation import ConfigError, validate_teacher_config
from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax.infra import runtime
from cpsc_jax.infra.metrics import format_duration
from cpsc_jax.infra.runtime import AXIS
from cpsc_jax.teachers.teacher import Teacher, load_teacher
from cpsc_jax.training.augment import random_crop_flip
from cpsc_jax.training.evaluation import accuracy
from cpsc_jax.training.run import Run, open_run
from cpsc_jax.training.state import TrainState

METRICS_FILE = "teacher_metrics.jsonl"
STATE_DIR = "teacher_state"
MODEL_DIR = "teacher"
CONFIG_FILE = "teacher_config.json"
ELAPSED_FILE = "teacher_elapsed.json"
# Changing these on resume only warns; `epochs` may grow (the cosine then stretches).
HARMLESS = ("log_every_s", "eval_every", "eval_batch_size", "steps_per_call",
            "checkpoint_min_interval_s", "checkpoint_every_minutes", "data.dir", "data.tfds_dir",
            "data.extra_eval")
EXTENDABLE = ("epochs",)


# --- state and step ----------------------------------------------------------------------------

def learning_rate_schedule(config, total_steps: int):
    return optax.cosine_decay_schedule(float(config.lr), total_steps)


def create_train_state(config, spec: ckpt_lib.ModelSpec, total_steps: int) -> TrainState:
    tx = optax.chain(optax.add_decayed_weights(float(config.weight_decay)),
                     optax.sgd(learning_rate_schedule(config, total_steps),
                               momentum=float(config.momentum)))
    variables = ckpt_lib.init_variables(spec, jax.random.PRNGKey(int(config.seed)))
    return TrainState.create(apply_fn=spec.build(axis_name=AXIS).apply,
                             params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx)


def make_train_step(mean, std, crop_padding: int, flip: bool, steps_per_call: int = 1,
                    donate: bool = False):
    """The data-parallel training function: `steps_per_call` SGD steps per call.

    steps(state, valid, key, images, labels, idx) -> (state, sums). state, valid [K] (real steps:
    padding steps past the end of an epoch leave the state untouched) and key are unreplicated;
    images/labels ([L, N, ...], the training set on each local device, `runtime.shard_local`)
    and idx ([L, K, b]: each local device's batch indices for K steps) are mapped. sums: loss
    (sum over steps of the global-batch mean), correct predictions and examples, global.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    def one_step(state, images, labels, idx_s, valid_s, key):
        device = jax.lax.axis_index(AXIS)   # global over processes
        x = images[idx_s].astype(jnp.float32) / 255.0
        y = labels[idx_s]
        rng = jax.random.fold_in(jax.random.fold_in(key, state.step), device)
        x = (random_crop_flip(rng, x, crop_padding, flip) - mean) / std

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        grads = jax.lax.pmean(grads, AXIS)
        new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        if valid_s is not None:
            new = jax.tree.map(lambda a, b: jnp.where(valid_s, a, b), new, state)
            v = valid_s.astype(jnp.int32)
        else:
            v = jnp.int32(1)
        correct = jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32)
        return new, (loss * v.astype(jnp.float32), correct * v, y.shape[0] * v)

    def steps(state, valid, key, images, labels, idx):
        if steps_per_call == 1:
            state, (loss, correct, count) = one_step(state, images, labels, idx[0], None, key)
        else:
            state, (loss, correct, count) = jax.lax.scan(
                lambda s, inp: one_step(s, images, labels, inp[0], inp[1], key), state,
                (idx, valid))
            loss, correct, count = jnp.sum(loss), jnp.sum(correct), jnp.sum(count)
        return state, {"loss_sum": jax.lax.pmean(loss, AXIS),
                       "correct": jax.lax.psum(correct, AXIS),
                       "count": jax.lax.psum(count, AXIS)}

    return runtime.data_parallel(steps, num_unmapped=3, num_mapped=3, donate_state=donate)


def epoch_indices(seed: int, epoch: int, num_examples: int, steps_per_epoch: int,
                  batch_size: int, steps_per_call: int, topo: runtime.Topology):
    """This process's batch indices for one epoch, [L, chunks*K, b], and the valid mask: one
    global permutation per epoch, each global device taking its slice of every global batch."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    per_dev = batch_size // topo.num_devices
    idx = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, topo.num_devices, per_dev)
    pad = math.ceil(steps_per_epoch / steps_per_call) * steps_per_call - steps_per_epoch
    valid = np.concatenate([np.ones(steps_per_epoch, bool), np.zeros(pad, bool)])
    idx = np.concatenate([idx, np.zeros((pad,) + idx.shape[1:], idx.dtype)]).astype(np.int32)
    return topo.local_slice(np.ascontiguousarray(idx.transpose(1, 0, 2))), valid


def _state_tree(state):
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _normalisation(config, dataset):
    mean = tuple(float(v) for v in (config.get("mean") or dataset.mean))
    std = tuple(float(v) for v in (config.get("std") or dataset.std))
    return mean, std


# --- the run -----------------------------------------------------------------------------------

def train_teacher(config, workdir: str, log: Callable[[str], None] = print) -> str:
    """Trains `config.arch` on `config.data`'s train split; returns WORKDIR/teacher, the model
    checkpoint. Resumes from WORKDIR/teacher_state when present."""
    out = os.path.join(os.path.abspath(os.path.expanduser(workdir)), MODEL_DIR)
    if ckpt_lib.is_model_checkpoint(out):  # written last: the run is complete
        if runtime.topology().is_writer:
            log(f"teacher: {out} already holds a model checkpoint; nothing to train (remove it, "
                "or use a fresh workdir, to train again)")
        return out
    training = TeacherTraining(config)   # loads the data and checks the config: nothing written
    with open_run(config, workdir, log, STATE_DIR, CONFIG_FILE, HARMLESS, EXTENDABLE,
                  elapsed_record=ELAPSED_FILE) as run:
        return training.train(run)


class TeacherTraining:
    """A teacher's training: its data and checked config, then (`train`) the chunked epoch
    loop of one invocation in a run directory."""

    def __init__(self, config):
        self.config, self.topo = config, runtime.topology()
        dataset = data_lib.dataset_info(config.data.name)
        self.mean, self.std = _normalisation(config, dataset)
        self.name = data_lib.protocol_label(config.data)
        self.train_split = data_lib.load_split(config.data, "train")
        self.evals = data_lib.eval_splits(config.data)
        images = self.train_split.images
        self.spec = ckpt_lib.ModelSpec(config.arch, self.train_split.num_classes, images.shape[1],
                                       images.shape[-1], self.mean, self.std)
        validate_teacher_config(config, self.spec, len(self.train_split), self.topo)
        self.epochs, self.batch_size = int(config.epochs), int(config.batch_size)
        self.steps_per_epoch = len(self.train_split) // self.batch_size
        self.total_steps = self.steps_per_epoch * self.epochs
        k = int(config.steps_per_call) or (1 if self.topo.platform == "cpu" else 50)
        self.k = max(1, min(k, self.steps_per_epoch))   # steps per call
        self.schedule = learning_rate_schedule(config, self.total_steps)
        self.eval_model = self.spec.build()

    def _restore(self):
        state = create_train_state(self.config, self.spec, self.total_steps)
        self.start_epoch, self.start_chunk = 0, 0
        self.partial = {"loss_sum": 0.0, "correct": 0, "count": 0}
        if self.run.resuming:
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype),
                _state_tree(state))
            restored, meta, _ = self.run.checkpointer.restore_latest_intact(abstract, log=self.say)
            state = state.replace(**restored)
            self.start_epoch = int(meta["epoch"])
            self.start_chunk = int(meta.get("chunk", 0))   # > 0: saved mid-epoch
            self.partial.update(meta.get("partial", {}))
            where = (f"at step {int(state.step)} (epoch {self.start_epoch + 1}, "
                     f"{self.start_chunk * self.k} of {self.steps_per_epoch} steps done)"
                     if self.start_chunk else
                     f"after epoch {self.start_epoch}/{self.epochs} (step {int(state.step)})")
            self.say(f"teacher: resuming {self.spec.arch} on {self.name} {where}")
        self.state = state
        self.key = runtime.replicate(jax.random.PRNGKey(int(self.config.seed) + 1), self.topo)

    def evaluate(self, variables) -> Dict[str, float]:
        return {k: accuracy(self.eval_model, variables, s, self.mean, self.std,
                            int(self.config.eval_batch_size)) for k, s in self.evals.items()}

    def train(self, run: Run) -> str:
        self.run, self.say = run, run.say
        self.state_dir = os.path.join(run.workdir, STATE_DIR)
        self._restore()
        self.writer = run.writer(self.start_epoch if run.resuming else None, jsonl=METRICS_FILE,
                                 tensorboard=None, step_key="epoch")
        self.accs: Dict[str, float] = {}
        self.last_log = self.last_epoch_log = self.last_save = time.time()
        self.timed_steps, self.timed_since = 0, None
        config, topo, train = self.config, self.topo, self.train_split
        if self.start_epoch < self.epochs:
            self.say(f"teacher: {self.spec.arch} on {self.name}: {len(train)} train images, "
                     + ", ".join(f"{k} {len(v)}" for k, v in self.evals.items())
                     + f"; {self.epochs} epochs x {self.steps_per_epoch} steps of "
                     f"{self.batch_size} on {topo.describe()}")
            local = lambda a: runtime.shard_local(
                np.broadcast_to(a[None], (topo.num_local,) + a.shape), topo)
            self.data = local(train.images), local(train.labels.astype(np.int32))
            self.train_steps = make_train_step(self.mean, self.std, int(config.crop_padding),
                                               bool(config.flip), self.k,
                                               donate=topo.platform != "cpu")
            self.state = runtime.replicate(self.state, topo)
        for epoch in range(self.start_epoch + 1, self.epochs + 1):
            self.train_epoch(epoch)
        return self.save_model()

    def train_epoch(self, epoch: int):
        """One epoch in calls of `k` steps; its record, evaluation and checkpoint."""
        epoch_start = time.time()
        idx, valid = epoch_indices(int(self.config.seed), epoch, len(self.train_split),
                                   self.steps_per_epoch, self.batch_size, self.k, self.topo)
        self.pending, self.sums = [], {"loss_sum": 0.0, "correct": 0, "count": 0}
        first_chunk = 0
        if epoch == self.start_epoch + 1 and self.start_chunk:
            first_chunk = self.start_chunk
            self.sums = {"loss_sum": float(self.partial["loss_sum"]),
                         "correct": int(self.partial["correct"]),
                         "count": int(self.partial["count"])}
        every_s = 60.0 * float(self.config.checkpoint_every_minutes)
        chunks = len(valid) // self.k
        for c in range(first_chunk, chunks):
            if every_s and time.time() - self.last_save >= every_s and c > first_chunk:
                self.save_within(epoch, c)
            runtime.stop_if_requested(on_stop=lambda: self.save_within(epoch, c, stopping=True))
            sl = slice(c * self.k, (c + 1) * self.k)
            self.state, sums = self.train_steps(self.state, valid[sl], self.key, *self.data,
                                                idx[:, sl])
            self.pending.append(sums)
            self.after_call(epoch, c, chunks, sums)
        self.drain()
        self.end_epoch(epoch, time.time() - epoch_start)

    def drain(self):
        for sums in jax.device_get(self.pending):
            self.sums["loss_sum"] += float(sums["loss_sum"])
            self.sums["correct"] += int(sums["correct"])
            self.sums["count"] += int(sums["count"])
        self.pending = []

    def step_count(self) -> int:
        return int(jax.device_get(self.state.step))

    def save_within(self, epoch: int, c: int, stopping: bool = False):
        # The state after c chunks of this epoch, with the epoch's running sums: a re-run goes on
        # from there bit-identically (the same batches, the same keys).
        self.drain()
        checkpointer = self.run.checkpointer
        if (c > 0 and jax.process_count() == 1
                and self.step_count() != checkpointer.latest_step()):
            checkpointer.save(self.step_count(), _state_tree(self.state),
                              {"epoch": epoch - 1, "chunk": c, "partial": dict(self.sums)})
            self.last_save = time.time()
            if stopping:
                self.say(f"teacher: saved step {self.step_count()} (epoch {epoch}, "
                         f"{min(c * self.k, self.steps_per_epoch)} of {self.steps_per_epoch} "
                         f"steps) to {self.state_dir}")
        elif stopping:
            latest = checkpointer.latest_step()
            self.say(f"teacher: nothing new to save; {self.state_dir} holds "
                     + (f"step {latest}" if latest is not None else "no checkpoint yet"))

    def after_call(self, epoch: int, c: int, chunks: int, sums):
        """Times the calls after the first (which compiles) and logs now and then."""
        k, spe = self.k, self.steps_per_epoch
        steps_done = min((c + 1) * k, spe)
        if self.timed_since is None:
            jax.block_until_ready(sums)
            self.timed_since = time.time()
        else:
            self.timed_steps += min(k, spe - c * k)
        if time.time() - self.last_log < float(self.config.log_every_s) or c >= chunks - 1:
            return
        self.drain()
        self.last_log = time.time()
        rate = self.timed_steps / max(self.last_log - self.timed_since, 1e-9)
        done = (epoch - 1) * spe + steps_done
        eta = format_duration((self.total_steps - done) / rate) if rate else "?"
        self.run.elapsed.tick()
        self.say(f"teacher epoch {epoch}/{self.epochs} step {steps_done}/{spe} loss "
                 f"{self.sums['loss_sum'] / steps_done:.4f} train "
                 f"{100.0 * self.sums['correct'] / max(self.sums['count'], 1):.2f}% lr "
                 f"{float(self.schedule(done)):.4g} {rate * self.batch_size:.0f} img/s ETA {eta}")

    def end_epoch(self, epoch: int, epoch_time: float):
        config, spe = self.config, self.steps_per_epoch
        record = {"epoch": epoch, "step": int(epoch * spe),
                  "lr": float(self.schedule(epoch * spe)),
                  "train_loss": self.sums["loss_sum"] / spe,
                  "train_accuracy": 100.0 * self.sums["correct"] / max(self.sums["count"], 1)}
        runtime.check_finite({"train_loss": record["train_loss"]}, f"in teacher epoch {epoch}",
                             f"Training diverged; lower --config.lr (now {config.lr}). The last "
                             f"good checkpoint in {self.state_dir} is intact.")
        if epoch % int(config.eval_every) == 0 or epoch == self.epochs:
            self.accs = self.evaluate({"params": self.state.params,
                                       "batch_stats": self.state.batch_stats})
            record.update({f"{k}_accuracy": v for k, v in self.accs.items()})
        total_elapsed = self.run.elapsed.tick()
        record.update({"epoch_time_s": round(epoch_time, 3), "elapsed_s": round(total_elapsed, 3),
                       "images_per_s": round(spe * self.batch_size / max(epoch_time, 1e-9), 1)})
        self.writer.write(epoch, record)   # before the checkpoint: a kill in between repeats it
        if (epoch == self.epochs
                or time.time() - self.last_save >= float(config.checkpoint_min_interval_s)):
            self.run.checkpointer.save(self.step_count(), _state_tree(self.state),
                                       {"epoch": epoch, "record": record})
            self.last_save = time.time()
        now = time.time()
        if (now - self.last_epoch_log >= float(config.log_every_s) or epoch == self.epochs
                or epoch == self.start_epoch + 1):
            self.last_log = self.last_epoch_log = now
            rate = (self.timed_steps / max(now - self.timed_since, 1e-9)
                    if self.timed_steps else 0.0)
            eta = format_duration((self.epochs - epoch) * spe / rate) if rate else "?"
            evals_txt = "".join(f" {k} {record[k + '_accuracy']:.2f}%"
                                for k in self.evals if k + "_accuracy" in record)
            self.say(f"teacher epoch {epoch}/{self.epochs} loss {record['train_loss']:.4f} "
                     f"train {record['train_accuracy']:.2f}%{evals_txt} "
                     f"({epoch_time:.1f}s/epoch, {record['images_per_s']:.0f} img/s, ETA {eta})")

    def save_model(self) -> str:
        """WORKDIR/teacher, the model checkpoint, written last (it marks a finished run)."""
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        if not runtime.all_finite(variables):
            raise runtime.NonFiniteError(f"the trained teacher has non-finite weights; lower "
                                         f"--config.lr (now {self.config.lr}); nothing was saved")
        if not self.accs:  # resumed a finished run whose model checkpoint was not written
            self.accs = self.evaluate(variables)
        spec = self.spec
        extra = {"trained_on": self.name, "train_images": len(self.train_split),
                 "epochs": self.epochs,
                 "accuracy": {self.evals[k].name: round(v, 4) for k, v in self.accs.items()}}
        spec = ckpt_lib.ModelSpec(spec.arch, spec.num_classes, spec.image_size, spec.channels,
                                  spec.mean, spec.std, extra)
        out = os.path.join(self.run.workdir, MODEL_DIR)
        ckpt_lib.save_model(out, spec, variables)
        summary = ", ".join(f"{self.evals[k].name} {v:.2f}%" for k, v in self.accs.items())
        self.say(f"teacher {spec.arch}: {self.epochs} epochs in "
                 f"{format_duration(self.run.elapsed.tick())}, accuracy {summary}; saved {out}")
        return out


def resolve_teacher(config, workdir: str, log: Callable[[str], None] = print) -> Teacher:
    """The command line's teacher: `config.teacher.checkpoint` (which must exist), else
    WORKDIR/teacher, trained there first when the config allows it
    (`teacher.train_if_missing`, the embedded default)."""
    path = config.teacher.checkpoint or os.path.join(workdir, "teacher")
    if ckpt_lib.is_model_checkpoint(path):
        return load_teacher(path)
    train_if_missing = config.teacher.get("train_if_missing", False)
    if config.teacher.checkpoint:   # named explicitly: never trained somewhere else instead
        raise ConfigError(f"config.teacher.checkpoint={path!r} is not a model checkpoint (no "
                          "model.json): point it at the output of cpsc-convert-teacher or "
                          "cpsc-train-teacher")
    if not train_if_missing:
        raise ConfigError("no teacher: set --config.teacher.checkpoint=DIR to a checkpoint written "
                          "by cpsc-convert-teacher or cpsc-train-teacher")
    log(f"no teacher checkpoint at {path}: training {config.teacher.training.arch} first")
    return load_teacher(train_teacher(config.teacher.training, workdir, log=log))
