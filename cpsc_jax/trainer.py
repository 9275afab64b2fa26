"""The generic CPSC-DFKD trainer: a teacher in, a distilled student out.

`train_and_evaluate(config, workdir, teacher)` distils for `epochs x epoch_itrs` iterations on
every device of every process (`cpsc_jax.runtime`), evaluates the student on real labelled data
after every epoch (when there is any: a truly data-free run has none), measures the
generator's class faithfulness on a fixed probe set, writes a labelled sample grid, checkpoints
(orbax) and resumes exactly when called again with the same workdir. The teacher comes from the
caller (`cpsc_jax.teacher`): loaded, converted or freshly trained.

WORKDIR after a run:
    config.json           the run's config (a resume with other values is refused)
    checkpoints/          resumable state, after every epoch
    metrics.jsonl         losses every `log_every` iterations; evaluations every epoch
    samples/epoch_N.png   one labelled row per class; red frames: the teacher sees another class
    student/              the final student (a model checkpoint)
    student_best/         the student of the best epoch (when evaluated)
    results.json          accuracies (final, best), faithfulness, wall time, history
"""
import contextlib
import json
import os
import signal
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpsc_jax import checkpoint as ckpt_lib
from cpsc_jax import data as data_lib
from cpsc_jax import collapse, faithfulness, plots
from cpsc_jax import images as images_lib
from cpsc_jax import runtime, steps
from cpsc_jax.config_validation import validate_config, validate_teacher
from cpsc_jax.evaluation import accuracy
from cpsc_jax.metrics import (FanOut, JsonlWriter, ProfileWindow, Progress, format_duration,
                              learning_rates, summary_writer)
from cpsc_jax.models import get_model
from cpsc_jax.teacher import Teacher, check_teacher_identity

# Changing these on resume only warns; `epochs` may grow (the cosine schedule then stretches).
HARMLESS = ("log_every", "checkpoint_every_minutes", "eval_batch_size", "sample_columns",
            "log_conditioning", "profile_steps", "data.dir", "data.tfds_dir", "data.extra_eval",
            "teacher.checkpoint", "teacher.train_if_missing", "teacher.training.")
EXTENDABLE = ("epochs",)
RESULTS = "results.json"

# Kept for callers of earlier versions.
NonFiniteLossError = runtime.NonFiniteError


def _format_accuracies(accs, eval_sets) -> str:
    return ", ".join(f"{accs[k]:.2f}% on {s.name} ({len(s)})" for k, s in eval_sets.items())


def _format_metrics(m) -> str:
    return (f"L_G {m.get('generator/loss', float('nan')):+.3f} "
            f"L_S {m.get('student/loss', float('nan')):.3f} "
            f"kd {m.get('student/kd', float('nan')):.3f} "
            f"G agrees {m.get('generator/teacher_agrees', float('nan')):.2f}")


def make_sampler(nets):
    """Jitted G(z, y) in training mode (batch statistics, as the student sees its images;
    running averages untouched), on the local default device."""
    generator = nets.generator.clone(axis_name=None, dtype=None)

    @jax.jit
    def sample(params, batch_stats, z, y):
        x, _ = generator.apply({"params": params, "batch_stats": batch_stats}, z, y, train=True,
                               mutable=["batch_stats"])
        return x
    return sample


def save_samples(path: str, images: np.ndarray, probe: faithfulness.Probe, predicted,
                 config, mean, std):
    """The sample grid: one row per class (a fixed subset for K > 20), labelled, each tile the
    teacher assigns to another class framed in red."""
    classes = images_lib.shown_classes(config.num_classes)
    cols = min(config.sample_columns, probe.per_class)
    idx = np.stack([np.flatnonzero(probe.labels == k)[:cols] for k in classes])   # [rows, cols]
    tiles = data_lib.denormalize(images[idx], mean, std)
    wrong = predicted[idx] != probe.labels[idx]
    grid = images_lib.labelled_grid(tiles, [str(k) for k in classes], wrong,
                                    scale=max(1, 32 // config.image_size))
    images_lib.write_png(path, grid)
    return grid


def _finished_results(workdir: str, total: int) -> Optional[Dict[str, Any]]:
    path = os.path.join(workdir, RESULTS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return results if results.get("iterations") == total else None


def train_and_evaluate(config, workdir: str, teacher: Teacher, log: Callable = print,
                       stop_after_epochs: Optional[int] = None,
                       eval_sets: Any = "config") -> Dict[str, Any]:
    """Runs (or resumes) a distillation from `teacher`; returns and writes WORKDIR/results.json.

    `eval_sets`: "config" (the splits `config.data` names), a dict {key: data.Split}, or None
    (no evaluation at all: data-free). `stop_after_epochs` ends this invocation after that many
    epochs (checkpointed); calling again with the same workdir continues.
    """
    topo = runtime.topology()
    validate_config(config, topo.num_devices)
    validate_teacher(config, teacher)
    workdir = runtime.prepare_workdir(workdir)
    say = log if topo.is_writer else (lambda *_: None)
    total = config.epochs * config.epoch_itrs
    with runtime.WorkdirLock(workdir, enabled=topo.is_writer):
        checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, "checkpoints"))
        try:
            latest = checkpointer.latest_step()
            runtime.check_run_config(workdir, config, HARMLESS, EXTENDABLE,
                                     resuming=latest is not None, write=topo.is_writer, log=say)
            check_teacher_identity(workdir, teacher, resuming=latest is not None,
                                   write=topo.is_writer)
            done = _finished_results(workdir, total) if latest == total else None
            if done is not None:
                say(f"{workdir} holds a finished run ({total} iterations): student "
                    + (f"{done['student_accuracy']:.2f}% final, {done['best_student_accuracy']:.2f}%"
                       " best" if done.get("student_accuracy") is not None else "not evaluated")
                    + f" -> {os.path.join(workdir, RESULTS)}")
                return done
            with contextlib.ExitStack() as outputs:   # TensorBoard, profiler: closed on any exit
                return _run(config, workdir, teacher, topo, checkpointer, latest, say,
                            stop_after_epochs, eval_sets, outputs)
        finally:
            checkpointer.close()


def _run(config, workdir, teacher, topo, checkpointer, latest, say, stop_after_epochs,
         eval_sets, outputs) -> Dict[str, Any]:
    mean, std = teacher.mean, teacher.std   # the normalisation the teacher was trained with
    if eval_sets == "config":
        eval_sets = data_lib.eval_splits(config.data)
    eval_sets = dict(eval_sets or {})
    protocol = data_lib.protocol_label(config.data) if eval_sets else "none (data-free)"
    teacher_vars = teacher.variables

    def evaluate(model, variables):
        return {k: accuracy(model, variables, s, mean, std, config.eval_batch_size)
                for k, s in eval_sets.items()}

    teacher_model = teacher.build()
    teacher_accs = evaluate(teacher_model, teacher_vars)
    say(f"teacher {teacher.name} ({teacher.path or 'given in memory'}), protocol {protocol}"
        + (": " + _format_accuracies(teacher_accs, eval_sets) if eval_sets else ""))

    # Class faithfulness of the generator, on one fixed probe set (cpsc_jax.faithfulness).
    probe = faithfulness.Probe(config.num_classes, config.generator.nz, config.seed)
    real_diversity = None
    if "test" in eval_sets:
        real_diversity = faithfulness.real_class_diversity(
            teacher_model, teacher_vars, eval_sets["test"].images, eval_sets["test"].labels,
            config.num_classes, mean, std, probe.per_class)

    nets = steps.build_networks(config, teacher)
    iteration = steps.make_train_iteration(nets, config, topo.num_devices)
    student_model = get_model(config.student.arch, config.num_classes)
    sample = make_sampler(nets)

    state = steps.init_state(nets, config, jax.random.PRNGKey(config.seed))
    meta = {"best_student_accuracy": None, "best_epoch": None, "best_accuracies": {},
            "history": []}
    if latest is not None:
        state, restored, latest = checkpointer.restore_latest_intact(
            jax.eval_shape(lambda: state), log=say)
        meta.update(restored)
        say(f"resuming from iteration {latest} ({workdir}/checkpoints)")
    elapsed = runtime.Elapsed(workdir, fresh=latest is None, enabled=topo.is_writer)
    state = runtime.replicate(state, topo)
    teacher_vars = runtime.replicate(teacher_vars, topo)
    ids = topo.device_ids()
    writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=latest,
                         enabled=topo.is_writer)
    tb = outputs.enter_context(summary_writer(os.path.join(workdir, "tensorboard"),
                                              resume_step=latest, enabled=topo.is_writer))
    out = FanOut(writer, tb)   # every record to metrics.jsonl and TensorBoard
    if topo.is_writer and latest is None:
        missing = ([f"no tensorboard/ is written: {tb.reason}"] if not tb.enabled else []) + (
            [] if plots.available() else ["no plots/ are drawn (pip install matplotlib)"])
        if missing:
            say("note: " + "; ".join(missing))
    if latest is None:
        tb.write_hparams(config)
        tb.write(0, {f"teacher_accuracy/{k}": v for k, v in teacher_accs.items()})
    if topo.is_writer:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

    conditioning = None
    if config.log_conditioning:
        from cpsc_jax import diagnostics
        conditioning = diagnostics.make_conditioning_gradients(
            steps.build_networks(config, teacher, axis_name=None), config)

    def log_conditioning(step):
        figures = diagnostics.conditioning_gradients(
            conditioning, state, teacher_vars, config,
            jax.random.fold_in(jax.random.PRNGKey(config.seed + 777), step))
        out.write(step, diagnostics.flatten(figures))

    total = config.epochs * config.epoch_itrs
    start = int(state.step)
    profiler = outputs.enter_context(ProfileWindow(
        os.path.join(workdir, "profile"), config.get("profile_steps", 0), start_after=start + 1,
        enabled=topo.is_writer))
    progress = Progress(total, start, enabled=topo.is_writer, emit=say)
    epochs_run, step = 0, start
    say(f"distilling {config.student.arch} from {teacher.name}: {total} iterations "
        f"({config.epochs} epochs x {config.epoch_itrs}), batch {config.batch_size} on "
        f"{topo.describe()}")
    if conditioning is not None and start == 0:
        log_conditioning(0)
    saved = {"step": start, "at": time.time()}

    def save_now(stopping: bool = False, all_processes: bool = False):
        # The current state, not the last epoch's: a re-run resumes here bit-identically. Several
        # processes save together only at a step they agreed on (JAX's preemption sync).
        if step > saved["step"] and (jax.process_count() == 1 or all_processes):
            checkpointer.save(step, state, meta)
            saved.update(step=step, at=time.time())
        if stopping:
            say(f"saved iteration {saved['step']} of {total} to {workdir}/checkpoints"
                if saved["step"] else "stopped before the first iteration: nothing to save")

    while step < total:
        if (config.checkpoint_every_minutes
                and time.time() - saved["at"] >= 60 * config.checkpoint_every_minutes):
            save_now()
        if runtime.preemption_sync_point(step):
            save_now(stopping=True, all_processes=True)
            runtime.request_stop(signal.SIGTERM)
            runtime.stop_if_requested()
        runtime.stop_if_requested(on_stop=lambda: save_now(stopping=True))
        if step == start:
            say(f"compiling the iteration ({config.g_steps} generator + {config.s_steps} student "
                f"steps of batch {config.batch_size}; XLA compiles once per run) ...")
            t_first = time.time()
        state, metrics = iteration(state, teacher_vars, ids)
        step += 1
        if step == start + 1:
            jax.block_until_ready(metrics)
            say(f"compiled and ran the first iteration in {format_duration(time.time() - t_first)}")
            progress.mark(step)   # rate and ETA exclude compilation
        if step == start + LONG_RUN_CHECK_AFTER + 1 and step < total:
            jax.block_until_ready(metrics)
            _warn_if_long(config, progress, step, total, say)
        profiler.after_iteration(step, state)
        epoch_end = step % config.epoch_itrs == 0
        logged = runtime.is_time(step, config.log_every) or epoch_end
        if step == start + 2 and not logged:
            jax.block_until_ready(metrics)
            progress.line(step, "first timed iteration")   # an ETA at once, not after log_every
        if logged:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            runtime.check_finite(m, f"at iteration {step}",
                                 _divergence_advice(checkpointer, workdir, teacher))
            m.update(learning_rates(config, step))
            out.write(step, m)
            acc_text = ""
            if meta["history"]:
                last = meta["history"][-1]
                if last.get("student_accuracy") is not None:
                    acc_text = (f" | student {last['student_accuracy']:.2f}% "
                                f"(best {meta['best_student_accuracy']:.2f}%)")
            if meta["history"] and meta["history"][-1].get("collapse", {}).get("collapsed"):
                acc_text += " | COLLAPSED student (see the last epoch line)"
            elapsed.tick()
            progress.line(step, _format_metrics(m) + acc_text)
        if not epoch_end:
            continue
        epoch = step // config.epoch_itrs
        if not runtime.all_finite((state.student.params, state.generator.params)):
            raise runtime.NonFiniteError(
                f"non-finite parameters at iteration {step}. "
                + _divergence_advice(checkpointer, workdir, teacher))
        student_vars = {"params": state.student.params, "batch_stats": state.student.batch_stats}
        accs = evaluate(student_model, student_vars)
        acc = accs.get("test")
        improved = acc is not None and (meta["best_student_accuracy"] is None
                                        or acc > meta["best_student_accuracy"])
        if improved:
            meta["best_student_accuracy"], meta["best_epoch"] = acc, epoch
        meta["best_accuracies"] = {k: max(v, meta["best_accuracies"].get(k, v))
                                   for k, v in accs.items()}
        generated = faithfulness.generate_probe(
            lambda z, y: sample(state.generator.params, state.generator.batch_stats, z, y),
            probe, config.batch_size)
        faithful = faithfulness.probe_statistics(generated, probe, teacher_model, teacher_vars,
                                                 real_diversity)
        predicted = faithful.pop("predicted")
        student_probs, _ = faithfulness.teacher_outputs(student_model, student_vars, generated)
        health = collapse.check(np.argmax(student_probs, -1), predicted, config.num_classes)
        total_elapsed = elapsed.tick()
        meta["history"].append({"epoch": epoch, "step": step, "student_accuracy": acc,
                                "accuracies": accs, "faithfulness": faithful,
                                "collapse": health, "elapsed_s": round(total_elapsed, 1)})
        if topo.is_writer:
            grid = save_samples(os.path.join(workdir, "samples", f"epoch_{epoch:04d}.png"),
                                generated, probe, predicted, config, mean, std)
            tb.write_image(step, "samples", grid)
            if plots.available():
                plots.run_curves(meta["history"], os.path.join(workdir, "plots", "curves.png"),
                                 f"{config.student.arch} from {teacher.name}")
        # The record goes first: a kill before the checkpoint below only repeats this epoch.
        record = {"epoch": epoch, "student_accuracy": acc,
                  "best_student_accuracy": meta["best_student_accuracy"],
                  **{f"student_accuracy/{k}": v for k, v in accs.items()},
                  **faithfulness.scalars(faithful), **collapse.scalars(health),
                  "elapsed_s": total_elapsed}
        out.write(step, record)
        tb.flush()
        if conditioning is not None:
            log_conditioning(step)
        if improved:
            _save_student(os.path.join(workdir, "student_best"), config, teacher, mean, std,
                          student_vars, {"epoch": epoch, "student_accuracy": acc})
        if config.generator_reinit_every and epoch % config.generator_reinit_every == 0:
            state = runtime.replicate(steps.reinit_generator(nets, config, state, epoch), topo)
        checkpointer.save(step, state, meta)
        saved.update(step=step, at=time.time())
        acc_text = ("student " + _format_accuracies(accs, eval_sets)
                    + f" (best {meta['best_student_accuracy']:.2f}% at epoch {meta['best_epoch']}),"
                    f" teacher {teacher_accs['test']:.2f}%; ") if acc is not None else ""
        say(f"epoch {epoch}/{config.epochs}: {acc_text}{faithfulness.summary(faithful)}"
            + (" | " + collapse.warning(health) if health["collapsed"] else ""))
        epochs_run += 1
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs and step < total:
            say(f"stopping after {epochs_run} epoch(s) as asked; re-run to resume")
            return {"stopped_at_step": step}

    student_vars = {"params": state.student.params, "batch_stats": state.student.batch_stats}
    student_path = os.path.join(workdir, "student")
    _save_student(student_path, config, teacher, mean, std, student_vars, {})
    final = meta["history"][-1]["accuracies"] if meta["history"] else {}
    elapsed_total = elapsed.tick()
    results = {
        "protocol": protocol,
        "eval_sets": {k: {"name": s.name, "num_examples": len(s)} for k, s in eval_sets.items()},
        "teacher_accuracy": teacher_accs.get("test"),
        "student_accuracy": final.get("test"),
        "best_student_accuracy": meta["best_student_accuracy"],
        "best_epoch": meta["best_epoch"],
        "teacher_accuracies": teacher_accs,
        "student_accuracies": final,
        "best_student_accuracies": meta["best_accuracies"],
        "student_teacher_ratio": (final["test"] / teacher_accs["test"]
                                  if final.get("test") is not None and teacher_accs.get("test")
                                  else None),
        "faithfulness": meta["history"][-1].get("faithfulness") if meta["history"] else None,
        # A student that answers one class (cpsc_jax.collapse): at the end, and every epoch it was.
        "collapsed": bool(meta["history"] and meta["history"][-1].get("collapse", {}).get(
            "collapsed")),
        "collapsed_epochs": [h["epoch"] for h in meta["history"]
                             if h.get("collapse", {}).get("collapsed")],
        "iterations": total,
        "teacher_checkpoint": teacher.path,
        "student_checkpoint": student_path,
        "best_student_checkpoint": (os.path.join(workdir, "student_best")
                                    if meta["best_epoch"] is not None else None),
        "elapsed_s": round(elapsed_total, 1),
        "history": meta["history"],
    }
    if topo.is_writer:
        tmp = os.path.join(workdir, RESULTS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(workdir, RESULTS))
    if results["collapsed"]:
        say(collapse.warning(meta["history"][-1]["collapse"]) + ": the final student is useless")
    if results["student_accuracy"] is not None:
        say(f"done in {format_duration(elapsed_total)}: student {results['student_accuracy']:.2f}%"
            f" final, {meta['best_student_accuracy']:.2f}% best; teacher "
            f"{teacher_accs['test']:.2f}% ({protocol}) -> {workdir}/{RESULTS}")
    else:
        say(f"done in {format_duration(elapsed_total)} (no evaluation data) -> {workdir}/{RESULTS}")
    return results


# A run longer than this at the pace of its first iterations is said to be one, once.
LONG_RUN_S = 3 * 3600
LONG_RUN_CHECK_AFTER = 3


def _warn_if_long(config, progress, step, total, say) -> None:
    per_iteration = (time.time() - progress.t0) / max(step - progress.i0, 1)
    estimate = per_iteration * (total - step)
    if estimate > LONG_RUN_S:
        say(f"note: at this machine's pace ({per_iteration:.2f} s per iteration, measured over "
            f"the first {step - progress.i0}) this run needs about {format_duration(estimate)} "
            "more: a recipe sized for GPUs. On a CPU use a CPU-sized config: digits, mnist, "
            "cifar10_cpu.")


def _save_student(path, config, teacher, mean, std, variables, extra):
    spec = ckpt_lib.ModelSpec(config.student.arch, config.num_classes, config.image_size,
                              config.channels, mean, std,
                              {"distilled_from": teacher.name, "teacher_checkpoint": teacher.path,
                               **extra})
    ckpt_lib.save_model(path, spec, variables)


def _divergence_advice(checkpointer, workdir, teacher) -> str:
    if not runtime.all_finite(teacher.variables):
        return (f"The teacher ({teacher.path or teacher.name}) itself has non-finite weights: "
                "train or convert it again.")
    good = checkpointer.latest_step()
    kept = (f"The last good checkpoint (iteration {good}) in {workdir}/checkpoints is intact"
            if good is not None else "No checkpoint was written yet")
    return (f"{kept}; lower the adversarial weight (config.loss.alpha) or the learning rates "
            "and re-run.")
