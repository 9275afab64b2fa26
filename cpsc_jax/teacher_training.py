"""Supervised training of a teacher classifier on a real training split (the released recipe).

SGD with momentum 0.9, weight decay 5e-4 added to the gradient (as PyTorch's SGD does), a cosine
learning-rate schedule, random crops after 4 pixels of zero padding and horizontal flips (done on
device, in pixel space before normalisation, as torchvision does). The step is data-parallel over
the local devices (pmap semantics, written as jit + shard_map; see `make_train_chunk`): the train
state stays unreplicated, each device takes its share of the global batch, gradients are averaged
and BatchNorm uses the moments of the global batch.

A run in WORKDIR writes
    WORKDIR/teacher_state/         orbax checkpoints of the train state, every epoch (resume)
    WORKDIR/teacher_metrics.jsonl  one JSON object per epoch
    WORKDIR/teacher/               the final model checkpoint (`checkpoint.save_model`)
Re-running with the same WORKDIR resumes from the last finished epoch; a finished run returns
at once. `train.py` calls `train_teacher(config.teacher.training, workdir)` for the embedded
digits default; `scripts/train_teacher.py` calls it with a config from configs/teachers/.
"""
import json
import math
import os
import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cpsc_jax import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax.evaluation import accuracy
from cpsc_jax.train_state import TrainState

AXIS = "batch"
METRICS_FILE = "teacher_metrics.jsonl"
STATE_DIR = "teacher_state"
MODEL_DIR = "teacher"


def default_teacher_config(**overrides) -> ml_collections.ConfigDict:
    """The released teacher recipe; configs/teachers/*.py start from this."""
    c = ml_collections.ConfigDict()
    c.arch = "resnet34"
    c.data = ml_collections.ConfigDict(dict(name="cifar10", dir="", protocol="standard",
                                            extra_eval="", tfds_dir=""))
    c.mean = data_lib.NORMALIZATION["cifar10"][0]
    c.std = data_lib.NORMALIZATION["cifar10"][1]
    c.batch_size = 128           # global batch, split over the local devices
    c.epochs = 200
    c.lr = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.crop_padding = 4           # random crop after zero padding; 0: none
    c.flip = True                # random horizontal flips
    c.seed = 0
    c.eval_every = 1             # epochs between test evaluations (the last epoch always)
    c.eval_batch_size = 500
    c.steps_per_call = 0         # train steps per device call (lax.scan); 0: min(50, epoch)
    c.log_every_s = 30.0         # seconds between progress lines
    # The train state is saved after each epoch that ends at least this long after the last
    # save (every epoch of a real dataset; tiny runs save less often), and after the last.
    c.checkpoint_min_interval_s = 10.0
    for k, v in overrides.items():
        if isinstance(v, dict):
            c[k].update(v)
        else:
            c[k] = v
    return c


def _get(config, key, default):
    try:
        value = config.get(key, default)
    except AttributeError:
        value = getattr(config, key, default)
    return default if value is None else value


# --- Augmentation ------------------------------------------------------------------------------

def random_crop_flip(rng, x, padding: int, flip: bool):
    """Per-image random crop after zero padding, and horizontal flips, on device."""
    b, h, w, _ = x.shape
    k_crop, k_flip = jax.random.split(rng)
    if padding:
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(
            img, (o[0], o[1], 0), (h, w, img.shape[-1])))(xp, offsets)
    if flip:
        mask = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        x = jnp.where(mask, x[:, :, ::-1, :], x)
    return x


# --- Training ----------------------------------------------------------------------------------

def _shard_map(f, mesh, in_specs, out_specs):
    try:
        from jax import shard_map
    except ImportError:  # older JAX
        from jax.experimental.shard_map import shard_map
    try:
        return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except TypeError:  # older JAX: check_rep
        return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def device_mesh(devices=None) -> Mesh:
    """A 1-D mesh over the local devices, axis `AXIS` ('batch')."""
    return Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))


def make_train_chunk(mesh: Mesh, mean, std, crop_padding: int, flip: bool,
                     steps_per_call: int = 1, donate: bool = False):
    """The data-parallel training function: `steps_per_call` SGD steps per call.

    chunk(state, images, labels, idx, valid, key) -> (state, sums). The state is unreplicated
    (the same on every device: gradients are averaged with `pmean` over the 'batch' axis and
    the model's BatchNorm uses the moments of the global batch); images/labels are the whole
    training set held on each device ([D, N, ...], `put_on_devices`); idx [D, K, b] holds each
    device's batch indices for K steps; valid [K] marks real steps (padding steps past the end of
    an epoch leave the state untouched). sums: loss (sum over steps of the global-batch mean),
    correct predictions and examples, over the global batch.

    This is `jax.pmap(chunk, axis_name='batch', in_axes=(None, 0, 0, 0, None, None),
    out_axes=None)` spelled as jit(shard_map) over an explicit mesh, which is what pmap lowers to
    in JAX 0.10; with JAX 0.10.2's pmap, feeding its outputs back in recompiled the program at
    every call (~100 ms a step for the digits CNN on CPU against ~10 ms here).
    On CPU keep steps_per_call=1: XLA:CPU runs convolutions inside a while loop (lax.scan) ~10x
    slower than at the top level.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    def one_step(state, images, labels, idx_s, valid_s, key):
        device = jax.lax.axis_index(AXIS)
        x = images[idx_s].astype(jnp.float32) / 255.0
        y = labels[idx_s]
        rng = jax.random.fold_in(jax.random.fold_in(key, state.step), device)
        x = random_crop_flip(rng, x, crop_padding, flip)
        x = (x - mean) / std

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        new = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        if valid_s is not None:
            new = jax.tree.map(lambda a, b: jnp.where(valid_s, a, b), new, state)
            v = valid_s.astype(jnp.int32)
        else:
            v = jnp.int32(1)
        correct = jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32)
        return new, (loss * v.astype(jnp.float32), correct * v, y.shape[0] * v)

    def chunk(state, images, labels, idx, valid, key):
        images, labels, idx = images[0], labels[0], idx[0]  # this device's block
        if steps_per_call == 1:
            state, (loss, correct, count) = one_step(state, images, labels, idx[0], None, key)
        else:
            state, (loss, correct, count) = jax.lax.scan(
                lambda s, inp: one_step(s, images, labels, inp[0], inp[1], key), state,
                (idx, valid))
            loss, correct, count = jnp.sum(loss), jnp.sum(correct), jnp.sum(count)
        sums = {"loss_sum": jax.lax.pmean(loss, AXIS), "correct": jax.lax.psum(correct, AXIS),
                "count": jax.lax.psum(count, AXIS)}
        return state, sums

    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    mapped = _shard_map(chunk, mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(), P()),
                        out_specs=(P(), P()))
    return jax.jit(mapped, in_shardings=(rep, shard, shard, shard, rep, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,) if donate else ())


def put_on_devices(x: np.ndarray, mesh: Mesh):
    """[N, ...] host array -> [D, N, ...]: a full copy resident on each device of the mesh."""
    x = np.asarray(x)
    d = mesh.devices.size
    return jax.device_put(np.broadcast_to(x[None], (d,) + x.shape), NamedSharding(mesh, P(AXIS)))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _state_tree(state):
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _rewrite_metrics(path: str, last_epoch: int) -> None:
    """Keeps the metric lines of epochs <= last_epoch (after a resume)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("epoch", 0) <= last_epoch:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _identity(config, spec) -> Dict[str, Any]:
    return {"arch": spec.arch, "dataset": data_lib.protocol_label(config.data),
            "num_classes": spec.num_classes, "image_size": spec.image_size,
            "channels": spec.channels}


def _hyper(config) -> Dict[str, Any]:
    keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "crop_padding", "flip",
            "seed")
    return {k: _get(config, k, None) for k in keys}


def train_teacher(config, workdir: str, log: Callable[[str], None] = print) -> str:
    """Trains `config.arch` on `config.data`'s train split; returns WORKDIR/teacher, the model
    checkpoint. Resumes from WORKDIR/teacher_state when present."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    out = os.path.join(workdir, MODEL_DIR)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    os.makedirs(workdir, exist_ok=True)

    epochs = int(config.epochs)
    batch_size = int(config.batch_size)
    seed = int(_get(config, "seed", 0))
    crop_padding = int(_get(config, "crop_padding", 0))
    flip = bool(_get(config, "flip", False))
    eval_every = max(1, int(_get(config, "eval_every", 1)))
    eval_bs = int(_get(config, "eval_batch_size", 500))
    log_every_s = float(_get(config, "log_every_s", 30.0))
    name = data_lib.protocol_label(config.data)
    mean = tuple(float(v) for v in (_get(config, "mean", None) or
                                    data_lib.NORMALIZATION[config.data.name][0]))
    std = tuple(float(v) for v in (_get(config, "std", None) or
                                   data_lib.NORMALIZATION[config.data.name][1]))

    state_dir = os.path.join(workdir, STATE_DIR)
    if ckpt_lib.is_model_checkpoint(out):  # written last: the run is complete
        log(f"teacher: {out} already holds a model checkpoint; nothing to train "
            "(remove it, or use a fresh workdir, to train again)")
        return out

    train = data_lib.load_split(config.data, "train")
    evals = data_lib.eval_splits(config.data)
    spec = ckpt_lib.ModelSpec(config.arch, train.num_classes, train.images.shape[1],
                              train.images.shape[-1], mean, std)
    if len(mean) != spec.channels or len(std) != spec.channels:
        raise ValueError(f"teacher mean/std have {len(mean)}/{len(std)} values; {name} images "
                         f"have {spec.channels} channels")
    devices = jax.local_devices()
    n_dev = len(devices)
    platform = devices[0].platform
    if batch_size % n_dev:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {n_dev} local devices")
    steps_per_epoch = len(train) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train)} training images")
    total_steps = steps_per_epoch * epochs
    k = int(_get(config, "steps_per_call", 0)) or (1 if platform == "cpu" else 50)
    k = max(1, min(k, steps_per_epoch))
    chunks_per_epoch = math.ceil(steps_per_epoch / k)

    schedule = optax.cosine_decay_schedule(float(config.lr), total_steps)
    tx = optax.chain(optax.add_decayed_weights(float(config.weight_decay)),
                     optax.sgd(schedule, momentum=float(config.momentum)))
    model = spec.build(axis_name=AXIS)
    eval_model = spec.build()
    variables = ckpt_lib.init_variables(spec, jax.random.PRNGKey(seed))
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx)

    # Resume.
    checkpointer = ckpt_lib.RunCheckpointer(state_dir, max_to_keep=2)
    start_epoch, prior_elapsed = 0, 0.0
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype),
                                _state_tree(state))
        ident = _identity(config, spec)
        try:
            restored, meta = checkpointer.restore(latest, abstract)
        except Exception as e:  # another architecture, a torn directory, ...
            checkpointer.close()
            raise ValueError(f"{state_dir} (step {latest}) cannot be resumed as {ident}: "
                             f"{type(e).__name__}: {str(e)[:300]}; use a fresh --workdir") from e
        if meta.get("identity") != ident:
            checkpointer.close()
            raise ValueError(f"{state_dir} holds a run of {meta.get('identity')}, not {ident}; "
                             "use a fresh --workdir")
        if meta.get("hyper") != _hyper(config):
            log(f"teacher: warning: resuming with changed settings {meta.get('hyper')} -> "
                f"{_hyper(config)}")
        state = state.replace(step=restored["step"], params=restored["params"],
                              batch_stats=restored["batch_stats"], opt_state=restored["opt_state"])
        start_epoch = int(meta["epoch"])
        prior_elapsed = float(meta.get("elapsed_s", 0.0))
        _rewrite_metrics(metrics_path, start_epoch)
        log(f"teacher: resuming {spec.arch} on {name} after epoch {start_epoch}/{epochs} "
            f"(step {int(state.step)})")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    mesh = device_mesh(devices)
    if start_epoch < epochs:
        log(f"teacher: {spec.arch} on {name}: {len(train)} train images, "
            + ", ".join(f"{k_} {len(v)}" for k_, v in evals.items())
            + f"; {epochs} epochs x {steps_per_epoch} steps of {batch_size} on {n_dev} "
            f"{platform} device(s)")
        images_dev = put_on_devices(train.images, mesh)
        labels_dev = put_on_devices(train.labels.astype(np.int32), mesh)
        train_chunk = make_train_chunk(mesh, mean, std, crop_padding, flip, k,
                                       donate=platform != "cpu")
        state = replicate(state, mesh)
    key = replicate(jax.random.PRNGKey(seed + 1), mesh)
    per_dev = batch_size // n_dev
    run_start = time.time()
    last_log = last_epoch_log = last_save = run_start
    min_save_s = float(_get(config, "checkpoint_min_interval_s", 10.0))
    timed_steps, timed_since = 0, None
    accs: Dict[str, float] = {}

    def progress_rate(now):
        return timed_steps / max(now - timed_since, 1e-9) if timed_steps else 0.0

    for epoch in range(start_epoch + 1, epochs + 1):
        epoch_start = time.time()
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        idx = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, n_dev, per_dev)
        pad = chunks_per_epoch * k - steps_per_epoch
        valid = np.concatenate([np.ones(steps_per_epoch, bool), np.zeros(pad, bool)])
        idx = np.concatenate([idx, np.zeros((pad, n_dev, per_dev), idx.dtype)]).astype(np.int32)
        idx = np.ascontiguousarray(idx.transpose(1, 0, 2))  # [D, steps, b]
        pending, loss_sum, correct, count = [], 0.0, 0, 0

        def drain():
            nonlocal pending, loss_sum, correct, count
            for sums in jax.device_get(pending):
                loss_sum += float(sums["loss_sum"])
                correct += int(sums["correct"])
                count += int(sums["count"])
            pending = []

        for c in range(chunks_per_epoch):
            sl = slice(c * k, (c + 1) * k)
            state, sums = train_chunk(state, images_dev, labels_dev, idx[:, sl], valid[sl], key)
            pending.append(sums)
            steps_done = min((c + 1) * k, steps_per_epoch)
            if timed_since is None:  # the first call compiles: time the rest from its end
                jax.block_until_ready(sums)
                timed_since = time.time()
            else:
                timed_steps += min(k, steps_per_epoch - c * k)
            now = time.time()
            if now - last_log >= log_every_s and c < chunks_per_epoch - 1:
                drain()
                now = last_log = time.time()
                rate = progress_rate(now)
                done = (epoch - 1) * steps_per_epoch + steps_done
                eta = _fmt_time((total_steps - done) / rate) if rate else "?"
                log(f"teacher epoch {epoch}/{epochs} step {steps_done}/{steps_per_epoch} "
                    f"loss {loss_sum / steps_done:.4f} "
                    f"train {100.0 * correct / max(count, 1):.2f}% "
                    f"lr {float(schedule(done)):.4g} {rate * batch_size:.0f} img/s ETA {eta}")
        drain()
        epoch_time = time.time() - epoch_start
        record = {"epoch": epoch, "step": int(epoch * steps_per_epoch),
                  "lr": float(schedule(epoch * steps_per_epoch)),
                  "train_loss": loss_sum / steps_per_epoch,
                  "train_accuracy": 100.0 * correct / max(count, 1)}
        if epoch % eval_every == 0 or epoch == epochs:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            accs = {k_: accuracy(eval_model, variables, s, mean, std, eval_bs)
                    for k_, s in evals.items()}
            record.update({f"{k_}_accuracy": v for k_, v in accs.items()})
        elapsed = prior_elapsed + time.time() - run_start
        record.update({"epoch_time_s": round(epoch_time, 3), "elapsed_s": round(elapsed, 3),
                       "images_per_s": round(steps_per_epoch * batch_size
                                             / max(epoch_time, 1e-9), 1)})
        if epoch == epochs or time.time() - last_save >= min_save_s:
            checkpointer.save(epoch, _state_tree(state),
                              {"epoch": epoch, "elapsed_s": elapsed, "record": record,
                               "identity": _identity(config, spec), "hyper": _hyper(config)})
            last_save = time.time()
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        now = time.time()
        if now - last_epoch_log >= log_every_s or epoch == epochs or epoch == start_epoch + 1:
            last_log = last_epoch_log = now
            rate = progress_rate(now)
            eta = _fmt_time((epochs - epoch) * steps_per_epoch / rate) if rate else "?"
            evals_txt = "".join(f" {k_} {record[k_ + '_accuracy']:.2f}%"
                                for k_ in evals if k_ + "_accuracy" in record)
            log(f"teacher epoch {epoch}/{epochs} loss {record['train_loss']:.4f} "
                f"train {record['train_accuracy']:.2f}%{evals_txt} "
                f"({epoch_time:.1f}s/epoch, {record['images_per_s']:.0f} img/s, ETA {eta})")
    checkpointer.close()

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if not accs:  # resumed a finished run whose model checkpoint was not written
        accs = {k_: accuracy(eval_model, variables, s, mean, std, eval_bs)
                for k_, s in evals.items()}
    extra = {"trained_on": name, "train_images": len(train), "epochs": epochs,
             "accuracy": {evals[k_].name: round(v, 4) for k_, v in accs.items()}}
    spec = ckpt_lib.ModelSpec(spec.arch, spec.num_classes, spec.image_size, spec.channels,
                              spec.mean, spec.std, extra)
    ckpt_lib.save_model(out, spec, variables)
    summary = ", ".join(f"{evals[k_].name} {v:.2f}%" for k_, v in accs.items())
    total = _fmt_time(prior_elapsed + time.time() - run_start)
    log(f"teacher {spec.arch}: {epochs} epochs in {total}, accuracy {summary}; saved {out}")
    return out
