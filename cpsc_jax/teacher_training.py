"""Supervised training of a teacher classifier on a real training split (the released recipe).

SGD with momentum 0.9, weight decay 5e-4 added to the gradient (as PyTorch's SGD does), a cosine
learning-rate schedule, random crops after zero padding and horizontal flips (on device, in
pixel space before normalisation, as torchvision does). The step is data-parallel through
`cpsc_jax.runtime` (the same pmap SPMD as distillation): the state stays unreplicated, each
device takes its share of the global batch (indices drawn from one global permutation, so any
number of processes x devices runs the same global batches), gradients are averaged and
BatchNorm uses the moments of the global batch.

A run in WORKDIR writes
    WORKDIR/teacher_state/         orbax checkpoints of the train state (resume)
    WORKDIR/teacher_metrics.jsonl  one JSON object per epoch
    WORKDIR/teacher_config.json    the run's config (a resume with other values is refused)
    WORKDIR/teacher/               the final model checkpoint (`checkpoint.save_model`)
Re-running with the same WORKDIR resumes from the last saved epoch; a finished run returns at
once. Configs: `cpsc_jax.config_defaults.teacher_config` (`configs/teacher.py:DATASET[,ARCH]`).
"""
import math
import os
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpsc_jax import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax import runtime
from cpsc_jax.augment import random_crop_flip
from cpsc_jax.config_validation import validate_teacher_config
from cpsc_jax.evaluation import accuracy
from cpsc_jax.metrics import JsonlWriter, format_duration
from cpsc_jax.runtime import AXIS
from cpsc_jax.train_state import TrainState

METRICS_FILE = "teacher_metrics.jsonl"
STATE_DIR = "teacher_state"
MODEL_DIR = "teacher"
CONFIG_FILE = "teacher_config.json"
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
    topo = runtime.topology()
    workdir = runtime.prepare_workdir(workdir)
    say = log if topo.is_writer else (lambda *_: None)
    out = os.path.join(workdir, MODEL_DIR)
    if ckpt_lib.is_model_checkpoint(out):  # written last: the run is complete
        say(f"teacher: {out} already holds a model checkpoint; nothing to train "
            "(remove it, or use a fresh workdir, to train again)")
        return out
    with runtime.WorkdirLock(workdir, enabled=topo.is_writer):
        return _train(config, workdir, out, topo, say)


def _train(config, workdir, out, topo, say) -> str:
    dataset = data_lib.dataset_info(config.data.name)
    mean, std = _normalisation(config, dataset)
    name = data_lib.protocol_label(config.data)
    train = data_lib.load_split(config.data, "train")
    evals = data_lib.eval_splits(config.data)
    spec = ckpt_lib.ModelSpec(config.arch, train.num_classes, train.images.shape[1],
                              train.images.shape[-1], mean, std)
    validate_teacher_config(config, spec, len(train), topo)

    epochs, batch_size, seed = int(config.epochs), int(config.batch_size), int(config.seed)
    steps_per_epoch = len(train) // batch_size
    total_steps = steps_per_epoch * epochs
    k = int(config.steps_per_call) or (1 if topo.platform == "cpu" else 50)
    k = max(1, min(k, steps_per_epoch))
    state = create_train_state(config, spec, total_steps)
    schedule = learning_rate_schedule(config, total_steps)

    state_dir = os.path.join(workdir, STATE_DIR)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    checkpointer = ckpt_lib.RunCheckpointer(state_dir, max_to_keep=2)
    latest = checkpointer.latest_step()
    runtime.check_run_config(workdir, config, HARMLESS, EXTENDABLE, resuming=latest is not None,
                             write=topo.is_writer, log=say, name=CONFIG_FILE)
    start_epoch, start_chunk, partial = 0, 0, {"loss_sum": 0.0, "correct": 0, "count": 0}
    if latest is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype),
                                _state_tree(state))
        restored, meta, latest = checkpointer.restore_latest_intact(abstract, log=say)
        state = state.replace(**restored)
        start_epoch = int(meta["epoch"])
        start_chunk = int(meta.get("chunk", 0))   # > 0: saved mid-epoch (a stop, or the clock)
        partial.update(meta.get("partial", {}))
        where = (f"at step {int(state.step)} (epoch {start_epoch + 1}, {start_chunk * k} of "
                 f"{steps_per_epoch} steps done)" if start_chunk else
                 f"after epoch {start_epoch}/{epochs} (step {int(state.step)})")
        say(f"teacher: resuming {spec.arch} on {name} {where}")
    writer = JsonlWriter(metrics_path, resume_step=start_epoch if latest is not None else None,
                         enabled=topo.is_writer, step_key="epoch")
    elapsed = runtime.Elapsed(workdir, fresh=latest is None, enabled=topo.is_writer)

    if start_epoch < epochs:
        say(f"teacher: {spec.arch} on {name}: {len(train)} train images, "
            + ", ".join(f"{k_} {len(v)}" for k_, v in evals.items())
            + f"; {epochs} epochs x {steps_per_epoch} steps of {batch_size} on {topo.describe()}")
        local = lambda a: runtime.shard_local(np.broadcast_to(a[None], (topo.num_local,) + a.shape),
                                              topo)
        images_dev, labels_dev = local(train.images), local(train.labels.astype(np.int32))
        train_steps = make_train_step(mean, std, int(config.crop_padding), bool(config.flip), k,
                                      donate=topo.platform != "cpu")
        state = runtime.replicate(state, topo)
    key = runtime.replicate(jax.random.PRNGKey(seed + 1), topo)
    eval_model = spec.build()
    log_every_s = float(config.log_every_s)
    min_save_s = float(config.checkpoint_min_interval_s)
    last_log = last_epoch_log = last_save = time.time()
    timed_steps, timed_since = 0, None
    accs: Dict[str, float] = {}

    def evaluate(variables):
        return {k_: accuracy(eval_model, variables, s, mean, std, int(config.eval_batch_size))
                for k_, s in evals.items()}

    every_s = 60.0 * float(config.checkpoint_every_minutes)
    for epoch in range(start_epoch + 1, epochs + 1):
        epoch_start = time.time()
        idx, valid = epoch_indices(seed, epoch, len(train), steps_per_epoch, batch_size, k, topo)
        chunks = len(valid) // k
        pending, loss_sum, correct, count = [], 0.0, 0, 0
        first_chunk = 0
        if epoch == start_epoch + 1 and start_chunk:
            first_chunk = start_chunk
            loss_sum, correct, count = (float(partial["loss_sum"]), int(partial["correct"]),
                                        int(partial["count"]))

        def drain():
            nonlocal pending, loss_sum, correct, count
            for sums in jax.device_get(pending):
                loss_sum += float(sums["loss_sum"])
                correct += int(sums["correct"])
                count += int(sums["count"])
            pending = []

        def save_within(c, stopping=False):
            # The state after c chunks of this epoch, with the epoch's running sums: a re-run
            # goes on from there bit-identically (the same batches, the same keys).
            nonlocal last_save
            drain()
            if (c > 0 and jax.process_count() == 1
                    and int(jax.device_get(state.step)) != checkpointer.latest_step()):
                checkpointer.save(int(jax.device_get(state.step)), _state_tree(state),
                                  {"epoch": epoch - 1, "chunk": c, "partial": {
                                      "loss_sum": loss_sum, "correct": correct, "count": count}})
                last_save = time.time()
                if stopping:
                    say(f"teacher: saved step {int(jax.device_get(state.step))} (epoch {epoch}, "
                        f"{min(c * k, steps_per_epoch)} of {steps_per_epoch} steps) to {state_dir}")
            elif stopping:
                say(f"teacher: nothing new to save; {state_dir} holds "
                    + (f"step {checkpointer.latest_step()}" if checkpointer.latest_step() is not None
                       else "no checkpoint yet"))

        for c in range(first_chunk, chunks):
            if every_s and time.time() - last_save >= every_s and c > first_chunk:
                save_within(c)
            runtime.stop_if_requested(on_stop=lambda: save_within(c, stopping=True))
            sl = slice(c * k, (c + 1) * k)
            state, sums = train_steps(state, valid[sl], key, images_dev, labels_dev, idx[:, sl])
            pending.append(sums)
            steps_done = min((c + 1) * k, steps_per_epoch)
            if timed_since is None:  # the first call compiles: time the rest from its end
                jax.block_until_ready(sums)
                timed_since = time.time()
            else:
                timed_steps += min(k, steps_per_epoch - c * k)
            now = time.time()
            if now - last_log >= log_every_s and c < chunks - 1:
                drain()
                last_log = time.time()
                rate = timed_steps / max(last_log - timed_since, 1e-9)
                done = (epoch - 1) * steps_per_epoch + steps_done
                eta = format_duration((total_steps - done) / rate) if rate else "?"
                elapsed.tick()
                say(f"teacher epoch {epoch}/{epochs} step {steps_done}/{steps_per_epoch} "
                    f"loss {loss_sum / steps_done:.4f} train {100.0 * correct / max(count, 1):.2f}% "
                    f"lr {float(schedule(done)):.4g} {rate * batch_size:.0f} img/s ETA {eta}")
        drain()
        epoch_time = time.time() - epoch_start
        record = {"epoch": epoch, "step": int(epoch * steps_per_epoch),
                  "lr": float(schedule(epoch * steps_per_epoch)),
                  "train_loss": loss_sum / steps_per_epoch,
                  "train_accuracy": 100.0 * correct / max(count, 1)}
        runtime.check_finite({"train_loss": record["train_loss"]}, f"in teacher epoch {epoch}",
                             f"Training diverged; lower --config.lr (now {config.lr}). The last "
                             f"good checkpoint in {state_dir} is intact.")
        if epoch % int(config.eval_every) == 0 or epoch == epochs:
            accs = evaluate({"params": state.params, "batch_stats": state.batch_stats})
            record.update({f"{k_}_accuracy": v for k_, v in accs.items()})
        total_elapsed = elapsed.tick()
        record.update({"epoch_time_s": round(epoch_time, 3), "elapsed_s": round(total_elapsed, 3),
                       "images_per_s": round(steps_per_epoch * batch_size
                                             / max(epoch_time, 1e-9), 1)})
        writer.write(epoch, record)   # before the checkpoint: a kill in between only repeats it
        if epoch == epochs or time.time() - last_save >= min_save_s:
            checkpointer.save(int(jax.device_get(state.step)), _state_tree(state),
                              {"epoch": epoch, "record": record})
            last_save = time.time()
        now = time.time()
        if now - last_epoch_log >= log_every_s or epoch == epochs or epoch == start_epoch + 1:
            last_log = last_epoch_log = now
            rate = timed_steps / max(now - timed_since, 1e-9) if timed_steps else 0.0
            eta = format_duration((epochs - epoch) * steps_per_epoch / rate) if rate else "?"
            evals_txt = "".join(f" {k_} {record[k_ + '_accuracy']:.2f}%"
                                for k_ in evals if k_ + "_accuracy" in record)
            say(f"teacher epoch {epoch}/{epochs} loss {record['train_loss']:.4f} "
                f"train {record['train_accuracy']:.2f}%{evals_txt} "
                f"({epoch_time:.1f}s/epoch, {record['images_per_s']:.0f} img/s, ETA {eta})")
    checkpointer.close()

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if not runtime.all_finite(variables):
        raise runtime.NonFiniteError(f"the trained teacher has non-finite weights; lower "
                                     f"--config.lr (now {config.lr}); nothing was saved")
    if not accs:  # resumed a finished run whose model checkpoint was not written
        accs = evaluate(variables)
    extra = {"trained_on": name, "train_images": len(train), "epochs": epochs,
             "accuracy": {evals[k_].name: round(v, 4) for k_, v in accs.items()}}
    spec = ckpt_lib.ModelSpec(spec.arch, spec.num_classes, spec.image_size, spec.channels,
                              spec.mean, spec.std, extra)
    ckpt_lib.save_model(out, spec, variables)
    summary = ", ".join(f"{evals[k_].name} {v:.2f}%" for k_, v in accs.items())
    say(f"teacher {spec.arch}: {epochs} epochs in {format_duration(elapsed.tick())}, accuracy "
        f"{summary}; saved {out}")
    return out
