"""The generic CPSC-DFKD trainer: teacher in, distilled student out.

`train_and_evaluate(config, workdir)` gets the teacher, distils for `epochs x epoch_itrs`
iterations, evaluates the student on the real test split after every epoch, writes a sample grid,
checkpoints (orbax) and resumes exactly when called again with the same workdir.
"""
import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax import steps
from cpsc_jax.config_validation import ConfigError, validate_config, validate_teacher
from cpsc_jax.evaluation import accuracy
from cpsc_jax.images import image_grid, write_png
from cpsc_jax.metrics import JsonlWriter, Progress, format_duration
from cpsc_jax.models import get_model


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf; the last good checkpoint is left untouched."""


def resolve_teacher(config, workdir: str, log: Callable = print) -> str:
    """The teacher checkpoint named in the config, or WORKDIR/teacher, trained there if allowed."""
    path = config.teacher.checkpoint or os.path.join(workdir, "teacher")
    if ckpt_lib.is_model_checkpoint(path):
        return path
    if config.teacher.checkpoint and not config.teacher.get("train_if_missing", False):
        raise ConfigError(f"config.teacher.checkpoint={path!r} is not a model checkpoint (no "
                          "model.json): point it at the output of scripts/convert_teacher.py or "
                          "scripts/train_teacher.py")
    if not config.teacher.get("train_if_missing", False):
        raise ConfigError("no teacher: set --config.teacher.checkpoint=DIR to a checkpoint written "
                          "by scripts/convert_teacher.py or scripts/train_teacher.py")
    from cpsc_jax.teacher_training import train_teacher
    log(f"no teacher checkpoint at {path}: training {config.teacher.training.arch} first")
    return train_teacher(config.teacher.training, workdir, log=log)


def _all_finite(tree) -> bool:
    return bool(all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
                    if np.issubdtype(np.asarray(x).dtype, np.floating)))


def _format_accuracies(accs, eval_sets) -> str:
    return ", ".join(f"{accs[k]:.2f}% on {s.name} ({len(s)})" for k, s in eval_sets.items())


def _format_metrics(m) -> str:
    g = m.get("generator/loss", float("nan"))
    s = m.get("student/loss", float("nan"))
    return f"L_G {g:+.3f} L_S {s:.3f} kd {m.get('student/kd', float('nan')):.3f}"


def _sample_fn(nets, config):
    generator = nets.generator.clone(axis_name=None, dtype=None)

    @jax.jit
    def sample(params, batch_stats, z, y):
        # Training-mode batch statistics, as the student sees them; running averages untouched.
        x, _ = generator.apply({"params": params, "batch_stats": batch_stats}, z, y, train=True,
                               mutable=["batch_stats"])
        return x
    return sample


def save_samples(path: str, sample, state, config, mean, std):
    cols, k = config.sample_columns, config.num_classes
    z = jax.random.normal(jax.random.PRNGKey(config.seed + 12345), (k * cols, config.generator.nz))
    y = jnp.repeat(jnp.arange(k), cols)   # one row per class
    x = np.asarray(sample(state.generator.params, state.generator.batch_stats, z, y))
    grid = image_grid(data_lib.denormalize(x, mean, std), rows=k,
                      scale=max(1, 32 // config.image_size))
    write_png(path, grid)


def train_and_evaluate(config, workdir: str, log: Callable = print,
                       stop_after_epochs: Optional[int] = None) -> dict:
    """Runs (or resumes) a distillation; returns and writes WORKDIR/results.json.

    `stop_after_epochs` ends this invocation after that many epochs (checkpointed), for runs
    split over several sessions; calling again with the same workdir continues.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    num_devices = jax.local_device_count()
    validate_config(config, num_devices)
    t_start = time.time()

    teacher_path = resolve_teacher(config, workdir, log)
    spec, teacher_vars = ckpt_lib.load_model(teacher_path)
    validate_teacher(config, spec)
    mean, std = spec.mean, spec.std   # the normalisation the teacher was trained with
    eval_sets = data_lib.eval_splits(config.data)   # "test", and "extra" when data.extra_eval is set
    protocol = data_lib.protocol_label(config.data)

    def evaluate(model, variables):
        return {k: accuracy(model, variables, s, mean, std, config.eval_batch_size)
                for k, s in eval_sets.items()}

    teacher_accs = evaluate(spec.build(), teacher_vars)
    log(f"teacher {spec.arch} ({teacher_path}), protocol {protocol}: "
        + _format_accuracies(teacher_accs, eval_sets))

    nets = steps.build_networks(config, spec.arch)
    iteration = steps.make_train_iteration(nets, config, num_devices)
    student_eval = get_model(config.student.arch, config.num_classes)
    sample = _sample_fn(nets, config)

    state = steps.init_state(nets, config, jax.random.PRNGKey(config.seed))
    checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpointer.latest_step()
    meta = {"best_student_accuracy": None, "best_epoch": None, "best_accuracies": {},
            "elapsed_s": 0.0, "history": []}
    if latest is not None:
        state, restored = checkpointer.restore(latest, jax.eval_shape(lambda: state))
        meta.update(restored)
        log(f"resuming from iteration {latest} ({workdir}/checkpoints)")
    prior_elapsed = float(meta["elapsed_s"])   # wall time of earlier invocations of this run
    state = steps.replicate(state, num_devices)
    teacher_vars = steps.replicate(teacher_vars, num_devices)
    ids = steps.device_ids(num_devices)
    writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=latest)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

    total = config.epochs * config.epoch_itrs
    start = int(state.step)
    progress = Progress(total, start)
    epochs_run = 0
    step = start
    log(f"distilling {config.student.arch} from {spec.arch}: {total} iterations "
        f"({config.epochs} epochs x {config.epoch_itrs}), batch {config.batch_size} on "
        f"{num_devices} {jax.default_backend()} device(s)")
    while step < total:
        state, metrics = iteration(state, teacher_vars, ids)
        step += 1
        if step == start + 1:
            progress.mark(step)   # rate and ETA exclude compilation
        epoch_end = step % config.epoch_itrs == 0
        if step % config.log_every == 0 or epoch_end:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not all(np.isfinite(v) for v in m.values()):
                bad = ", ".join(f"{k}={v}" for k, v in m.items() if not np.isfinite(v))
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {step}: {bad}. The last good checkpoint "
                    f"(iteration {checkpointer.latest_step()}) in {workdir}/checkpoints is intact; "
                    "lower the adversarial weights (config.loss.alpha) or the learning rates.")
            writer.write(step, m)
            acc_text = ""
            if meta["history"]:
                acc_text = (f" | student {meta['history'][-1]['student_accuracy']:.2f}% "
                            f"(best {meta['best_student_accuracy']:.2f}%)")
            progress.line(step, _format_metrics(m) + acc_text)
        if epoch_end:
            epoch = step // config.epoch_itrs
            if not _all_finite(state.student.params) or not _all_finite(state.generator.params):
                raise NonFiniteLossError(
                    f"non-finite parameters at iteration {step}; the last good checkpoint "
                    f"(iteration {checkpointer.latest_step()}) is intact")
            student_vars = {"params": state.student.params, "batch_stats": state.student.batch_stats}
            accs = evaluate(student_eval, student_vars)
            acc = accs["test"]
            if meta["best_student_accuracy"] is None or acc > meta["best_student_accuracy"]:
                meta["best_student_accuracy"], meta["best_epoch"] = acc, epoch
            meta["best_accuracies"] = {k: max(v, meta["best_accuracies"].get(k, v))
                                       for k, v in accs.items()}
            meta["elapsed_s"] = prior_elapsed + time.time() - t_start
            meta["history"].append({"epoch": epoch, "step": step, "student_accuracy": acc,
                                    "accuracies": accs, "elapsed_s": round(meta["elapsed_s"], 1)})
            save_samples(os.path.join(workdir, "samples", f"epoch_{epoch:04d}.png"), sample, state,
                         config, mean, std)
            checkpointer.save(step, state, meta)
            writer.write(step, {"epoch": epoch, "student_accuracy": acc,
                                "best_student_accuracy": meta["best_student_accuracy"],
                                **{f"student_accuracy/{k}": v for k, v in accs.items()},
                                "elapsed_s": meta["elapsed_s"]})
            log(f"epoch {epoch}/{config.epochs}: student " + _format_accuracies(accs, eval_sets)
                + f" (best {meta['best_student_accuracy']:.2f}% at epoch {meta['best_epoch']}), "
                f"teacher {teacher_accs['test']:.2f}%")
            epochs_run += 1
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs and step < total:
                log(f"stopping after {epochs_run} epoch(s) as asked; re-run to resume")
                checkpointer.close()
                return {"stopped_at_step": step}
    checkpointer.close()

    student_spec = ckpt_lib.ModelSpec(config.student.arch, config.num_classes, config.image_size,
                                      config.channels, mean, std,
                                      {"distilled_from": spec.arch, "teacher_checkpoint": teacher_path})
    student_path = os.path.join(workdir, "student")
    ckpt_lib.save_model(student_path, student_spec,
                        {"params": state.student.params, "batch_stats": state.student.batch_stats})
    final = meta["history"][-1]["accuracies"] if meta["history"] else {}
    elapsed = prior_elapsed + time.time() - t_start
    results = {
        "protocol": protocol,
        "eval_sets": {k: {"name": s.name, "num_examples": len(s)} for k, s in eval_sets.items()},
        "teacher_accuracy": teacher_accs["test"],
        "student_accuracy": final.get("test"),
        "best_student_accuracy": meta["best_student_accuracy"],
        "best_epoch": meta["best_epoch"],
        "teacher_accuracies": teacher_accs,
        "student_accuracies": final,
        "best_student_accuracies": meta["best_accuracies"],
        "student_teacher_ratio": (final["test"] / teacher_accs["test"]
                                  if final and teacher_accs["test"] else None),
        "iterations": total,
        "teacher_checkpoint": teacher_path,
        "student_checkpoint": student_path,
        "elapsed_s": round(elapsed, 1),
        "history": meta["history"],
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log(f"done in {format_duration(elapsed)}: student {results['student_accuracy']:.2f}% final, "
        f"{meta['best_student_accuracy']:.2f}% best; teacher {teacher_accs['test']:.2f}% "
        f"({protocol}) -> {workdir}/results.json")
    return results
