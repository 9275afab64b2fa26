"""The CPSC-DFKD trainer: a teacher in, a distilled student out, resumable at any iteration.

`train_and_evaluate(config, workdir, teacher)` runs `epochs x epoch_itrs` iterations on every
device of every process and after each epoch evaluates the student on real data (if any),
measures the generator's class faithfulness and the student's health, and checkpoints.

WORKDIR after a run:
    config.json           the run's config (a resume with other values is refused)
    checkpoints/          resumable state, after every epoch
    metrics.jsonl         losses every `log_every` iterations; evaluations every epoch
    samples/epoch_N.png   one labelled row per class; red frames: the teacher sees another class
    student/              the final student (a model checkpoint)
    student_best/         the student of the best epoch (when evaluated)
    results.json          accuracies (final, best), faithfulness, wall time, history
"""
import os
import signal
import time
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from cpsc_jax import data as data_lib
from cpsc_jax.config.validation import validate_config, validate_teacher
from cpsc_jax.infra import checkpoint as ckpt_lib
from cpsc_jax.infra import images as images_lib
from cpsc_jax.infra import plots, runtime
from cpsc_jax.infra.metrics import ProfileWindow, Progress, format_duration
from cpsc_jax.method import collapse, faithfulness, steps
from cpsc_jax.method import conditioning as conditioning_lib
from cpsc_jax.models import get_model
from cpsc_jax.teachers.teacher import Teacher, check_teacher_identity
from cpsc_jax.teachers.training import resolve_teacher
from cpsc_jax.training.evaluation import accuracy
from cpsc_jax.training.run import Run, open_run

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
    results = runtime.read_record(os.path.join(workdir, RESULTS))
    return results if results is not None and results.get("iterations") == total else None


def train_and_evaluate(config, workdir: str, teacher: Optional[Teacher] = None,
                       log: Callable = print, stop_after_epochs: Optional[int] = None,
                       eval_sets: Any = "config") -> Dict[str, Any]:
    """Runs (or resumes) a distillation; returns and writes WORKDIR/results.json.

    `teacher`: a `Teacher`; None takes the config's (`teachers.training.resolve_teacher`:
    `config.teacher.checkpoint`, else WORKDIR/teacher, trained first when the config says so).
    `eval_sets`: "config" (the splits `config.data` names), a dict {key: data.Split}, or None
    (no evaluation at all: data-free). `stop_after_epochs` ends this invocation after that many
    epochs (checkpointed); calling again with the same workdir continues.
    """
    validate_config(config, runtime.topology().num_devices)   # before a teacher is trained
    if teacher is None:
        teacher = resolve_teacher(config, runtime.prepare_workdir(workdir),
                                  log if runtime.topology().is_writer else (lambda *_: None))
    validate_teacher(config, teacher)
    total = config.epochs * config.epoch_itrs
    finished = lambda wd, latest: _finished_results(wd, total) if latest == total else None
    with open_run(config, workdir, log, "checkpoints", "config.json", HARMLESS, EXTENDABLE,
                  finished=finished) as run:
        check_teacher_identity(run.workdir, teacher, resuming=run.resuming,
                               write=run.topo.is_writer)
        if run.finished is not None:
            done = run.finished
            run.say(f"{run.workdir} holds a finished run ({total} iterations): student "
                    + (f"{done['student_accuracy']:.2f}% final, "
                       f"{done['best_student_accuracy']:.2f}% best"
                       if done.get("student_accuracy") is not None else "not evaluated")
                    + f" -> {os.path.join(run.workdir, RESULTS)}")
            return done
        return Distillation(config, run, teacher, eval_sets).run(stop_after_epochs)


class Distillation:
    """One invocation of a distillation run: the networks, the state and what is reported."""

    def __init__(self, config, run: Run, teacher: Teacher, eval_sets):
        self.config, self.run_dir, self.teacher = config, run, teacher
        self.workdir, self.topo, self.say = run.workdir, run.topo, run.say
        self.mean, self.std = teacher.mean, teacher.std   # the teacher's normalisation
        if eval_sets == "config":
            eval_sets = data_lib.eval_splits(config.data)
        self.eval_sets = dict(eval_sets or {})
        self.protocol = (data_lib.protocol_label(config.data) if self.eval_sets
                         else "none (data-free)")
        self.teacher_model = teacher.build()
        self.student_model = get_model(config.student.arch, config.num_classes)
        self.teacher_accs = self.evaluate(self.teacher_model, teacher.variables)
        self.say(f"teacher {teacher.name} ({teacher.path or 'given in memory'}), protocol "
                 f"{self.protocol}" + (": " + _format_accuracies(self.teacher_accs, self.eval_sets)
                                       if self.eval_sets else ""))
        # Class faithfulness of the generator, on one fixed probe set.
        self.probe = faithfulness.Probe(config.num_classes, config.generator.nz, config.seed)
        self.real_diversity = None
        if "test" in self.eval_sets:
            test = self.eval_sets["test"]
            self.real_diversity = faithfulness.real_class_diversity(
                self.teacher_model, teacher.variables, test.images, test.labels,
                config.num_classes, self.mean, self.std, self.probe.per_class)
        self.nets = steps.build_networks(config, teacher)
        self.iteration = steps.make_train_iteration(self.nets, config, self.topo.num_devices,
                                                    report_learning_rates=True)
        self.sample = make_sampler(self.nets)
        self.total = config.epochs * config.epoch_itrs
        self._restore()
        self._open_outputs()

    def evaluate(self, model, variables) -> Dict[str, float]:
        return {k: accuracy(model, variables, s, self.mean, self.std, self.config.eval_batch_size)
                for k, s in self.eval_sets.items()}

    def _restore(self):
        state = steps.init_state(self.nets, self.config, jax.random.PRNGKey(self.config.seed))
        self.meta = {"best_student_accuracy": None, "best_epoch": None, "best_accuracies": {},
                     "history": []}
        latest = self.run_dir.latest
        if latest is not None:
            state, restored, latest = self.run_dir.checkpointer.restore_latest_intact(
                jax.eval_shape(lambda: state), log=self.say)
            self.meta.update(restored)
            self.say(f"resuming from iteration {latest} ({self.workdir}/checkpoints)")
        self.resume_step = latest
        self.state = runtime.replicate(state, self.topo)
        self.teacher_vars = runtime.replicate(self.teacher.variables, self.topo)
        self.step = self.start = int(state.step)
        self.saved = {"step": self.start, "at": time.time()}
        self.curves_drawn_at = time.time()   # the first curves after CURVES_MIN_INTERVAL_S

    def _open_outputs(self):
        config, topo = self.config, self.topo
        self.out = self.run_dir.writer(self.resume_step)
        if topo.is_writer and self.resume_step is None:
            tb = self.out.tensorboard
            missing = ([f"no tensorboard/ is written: {tb.reason}"] if not tb.enabled else []) + (
                [] if plots.available() else ["no plots/ are drawn (pip install matplotlib)"])
            if missing:
                self.say("note: " + "; ".join(missing))
        if self.resume_step is None:
            self.out.write_hparams(config)
            self.out.tensorboard.write(0, {f"teacher_accuracy/{k}": v
                                           for k, v in self.teacher_accs.items()})
        if topo.is_writer:
            os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
        self.conditioning = None
        if config.log_conditioning:
            self.conditioning = conditioning_lib.make_conditioning_gradients(
                steps.build_networks(config, self.teacher, axis_name=None), config)
        self.profiler = self.run_dir.outputs.enter_context(ProfileWindow(
            os.path.join(self.workdir, "profile"), config.get("profile_steps", 0),
            start_after=self.start + 1, enabled=topo.is_writer))
        self.progress = Progress(self.total, self.start, enabled=topo.is_writer, emit=self.say)

    def run(self, stop_after_epochs: Optional[int]) -> Dict[str, Any]:
        config, start, total = self.config, self.start, self.total
        self.say(f"distilling {config.student.arch} from {self.teacher.name}: {total} iterations "
                 f"({config.epochs} epochs x {config.epoch_itrs}), batch {config.batch_size} on "
                 f"{self.topo.describe()}")
        if self.conditioning is not None and start == 0:
            self.log_conditioning()
        epochs_run, ids = 0, self.topo.device_ids()
        while self.step < total:
            if (config.checkpoint_every_minutes
                    and time.time() - self.saved["at"] >= 60 * config.checkpoint_every_minutes):
                self.save_now()
            if runtime.preemption_sync_point(self.step):
                self.save_now(stopping=True, all_processes=True)
                runtime.request_stop(signal.SIGTERM)
                runtime.stop_if_requested()
            runtime.stop_if_requested(on_stop=lambda: self.save_now(stopping=True))
            if self.step == start:
                self.say(f"compiling the iteration ({config.g_steps} generator + "
                         f"{config.s_steps} student steps of batch {config.batch_size}; XLA "
                         "compiles once per run) ...")
                t_first = time.time()
            self.state, metrics = self.iteration(self.state, self.teacher_vars, ids)
            self.step += 1
            step = self.step
            if step == start + 1:
                jax.block_until_ready(metrics)
                self.say(f"compiled and ran the first iteration in "
                         f"{format_duration(time.time() - t_first)}")
                self.progress.mark(step)   # rate and ETA exclude compilation
            if step == start + LONG_RUN_CHECK_AFTER + 1 and step < total:
                jax.block_until_ready(metrics)
                _warn_if_long(config, self.progress, step, total, self.say)
            self.profiler.after_iteration(step, self.state)
            epoch_end = step % config.epoch_itrs == 0
            logged = runtime.is_time(step, config.log_every) or epoch_end
            if step == start + 2 and not logged:
                jax.block_until_ready(metrics)
                self.progress.line(step, "first timed iteration")   # an ETA at once
            if logged:
                self.log_iteration(metrics)
            if not epoch_end:
                continue
            epochs_run += 1
            stopping = (stop_after_epochs is not None and epochs_run >= stop_after_epochs
                        and step < total)
            self.end_epoch(last=stopping or step == total)
            if stopping:
                self.say(f"stopping after {epochs_run} epoch(s) as asked; re-run to resume")
                return {"stopped_at_step": step}
        return self.finish()

    def save_now(self, stopping: bool = False, all_processes: bool = False):
        # The current state, not the last epoch's: a re-run resumes here bit-identically. Several
        # processes save together only at a step they agreed on (JAX's preemption sync).
        if self.step > self.saved["step"] and (jax.process_count() == 1 or all_processes):
            self.run_dir.checkpointer.save(self.step, self.state, self.meta)
            self.saved.update(step=self.step, at=time.time())
        if stopping:
            self.say(f"saved iteration {self.saved['step']} of {self.total} to "
                     f"{self.workdir}/checkpoints" if self.saved["step"]
                     else "stopped before the first iteration: nothing to save")

    def log_conditioning(self):
        figures = conditioning_lib.conditioning_gradients(
            self.conditioning, self.state, self.teacher_vars, self.config,
            jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 777), self.step))
        self.out.write(self.step, conditioning_lib.flatten(figures))

    def log_iteration(self, metrics):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        runtime.check_finite(m, f"at iteration {self.step}", self.divergence_advice())
        history = self.meta["history"]
        text = ""
        if history and history[-1].get("student_accuracy") is not None:
            text = (f" | student {history[-1]['student_accuracy']:.2f}% "
                    f"(best {self.meta['best_student_accuracy']:.2f}%)")
        if history and history[-1].get("collapse", {}).get("collapsed"):
            text += " | COLLAPSED student (see the last epoch line)"
        self.run_dir.elapsed.tick()
        self.out.write(self.step, m, line=self.progress.format(self.step, _format_metrics(m) + text))

    def student_vars(self):
        return {"params": self.state.student.params,
                "batch_stats": self.state.student.batch_stats}

    def end_epoch(self, last: bool = False):
        """Evaluates, records, draws and checkpoints the epoch just run (`last`: of this
        invocation, so the curves are drawn whatever the interval)."""
        config, state, step, meta = self.config, self.state, self.step, self.meta
        epoch = step // config.epoch_itrs
        if not runtime.all_finite((state.student.params, state.generator.params)):
            raise runtime.NonFiniteError(f"non-finite parameters at iteration {step}. "
                                         + self.divergence_advice())
        student_vars = self.student_vars()
        accs = self.evaluate(self.student_model, student_vars)
        acc = accs.get("test")
        improved = acc is not None and (meta["best_student_accuracy"] is None
                                        or acc > meta["best_student_accuracy"])
        if improved:
            meta["best_student_accuracy"], meta["best_epoch"] = acc, epoch
        meta["best_accuracies"] = {k: max(v, meta["best_accuracies"].get(k, v))
                                   for k, v in accs.items()}
        generated = faithfulness.generate_probe(
            lambda z, y: self.sample(state.generator.params, state.generator.batch_stats, z, y),
            self.probe, config.batch_size)
        faithful = faithfulness.probe_statistics(generated, self.probe, self.teacher_model,
                                                 self.teacher.variables, self.real_diversity)
        predicted = faithful.pop("predicted")
        student_probs, _ = faithfulness.teacher_outputs(self.student_model, student_vars,
                                                        generated)
        health = collapse.check(np.argmax(student_probs, -1), predicted, config.num_classes)
        total_elapsed = self.run_dir.elapsed.tick()
        meta["history"].append({"epoch": epoch, "step": step, "student_accuracy": acc,
                                "accuracies": accs, "faithfulness": faithful,
                                "collapse": health, "elapsed_s": round(total_elapsed, 1)})
        if self.topo.is_writer:
            self.draw(epoch, generated, predicted, last)
        # The record goes first: a kill before the checkpoint below only repeats this epoch.
        self.out.write(step, {"epoch": epoch, "student_accuracy": acc,
                              "best_student_accuracy": meta["best_student_accuracy"],
                              **{f"student_accuracy/{k}": v for k, v in accs.items()},
                              **faithfulness.scalars(faithful), **collapse.scalars(health),
                              "elapsed_s": total_elapsed})
        self.out.flush()
        if self.conditioning is not None:
            self.log_conditioning()
        if improved:
            _save_student(os.path.join(self.workdir, "student_best"), config, self.teacher,
                          self.mean, self.std, student_vars, {"epoch": epoch,
                                                              "student_accuracy": acc})
        if config.generator_reinit_every and epoch % config.generator_reinit_every == 0:
            self.state = runtime.replicate(
                steps.reinit_generator(self.nets, config, self.state, epoch), self.topo)
        self.run_dir.checkpointer.save(step, self.state, meta)
        self.saved.update(step=step, at=time.time())
        acc_text = ("student " + _format_accuracies(accs, self.eval_sets)
                    + f" (best {meta['best_student_accuracy']:.2f}% at epoch {meta['best_epoch']}),"
                    f" teacher {self.teacher_accs['test']:.2f}%; ") if acc is not None else ""
        self.say(f"epoch {epoch}/{config.epochs}: {acc_text}{faithfulness.summary(faithful)}"
                 + (" | " + collapse.warning(health) if health["collapsed"] else ""))

    def draw(self, epoch, generated, predicted, last: bool):
        """The epoch's sample grid (PNG and TensorBoard) and the run's curves (redrawn at the
        last epoch of this invocation and at most every CURVES_MIN_INTERVAL_S: in a run of
        short epochs drawing them would cost more than training)."""
        grid = save_samples(os.path.join(self.workdir, "samples", f"epoch_{epoch:04d}.png"),
                            generated, self.probe, predicted, self.config, self.mean, self.std)
        self.out.write_image(self.step, "samples", grid)
        due = last or time.time() - self.curves_drawn_at >= CURVES_MIN_INTERVAL_S
        if due and plots.available():
            self.curves_drawn_at = time.time()
            plots.run_curves(self.meta["history"], os.path.join(self.workdir, "plots", "curves.png"),
                             f"{self.config.student.arch} from {self.teacher.name}")

    def finish(self) -> Dict[str, Any]:
        config, meta, workdir, teacher_accs = self.config, self.meta, self.workdir, self.teacher_accs
        student_path = os.path.join(workdir, "student")
        _save_student(student_path, config, self.teacher, self.mean, self.std,
                      self.student_vars(), {})
        history = meta["history"]
        final = history[-1]["accuracies"] if history else {}
        elapsed_total = self.run_dir.elapsed.tick()
        results = {
            "protocol": self.protocol,
            "eval_sets": {k: {"name": s.name, "num_examples": len(s)}
                          for k, s in self.eval_sets.items()},
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
            "faithfulness": history[-1].get("faithfulness") if history else None,
            # A student that answers one class (collapse.py): at the end, and every epoch it was.
            "collapsed": bool(history and history[-1].get("collapse", {}).get("collapsed")),
            "collapsed_epochs": [h["epoch"] for h in history
                                 if h.get("collapse", {}).get("collapsed")],
            "iterations": self.total,
            "teacher_checkpoint": self.teacher.path,
            "student_checkpoint": student_path,
            "best_student_checkpoint": (os.path.join(workdir, "student_best")
                                        if meta["best_epoch"] is not None else None),
            "elapsed_s": round(elapsed_total, 1),
            "history": history,
        }
        if self.topo.is_writer:
            runtime.write_record(os.path.join(workdir, RESULTS), results, indent=2)
        if results["collapsed"]:
            self.say(collapse.warning(history[-1]["collapse"]) + ": the final student is useless")
        if results["student_accuracy"] is not None:
            self.say(f"done in {format_duration(elapsed_total)}: student "
                     f"{results['student_accuracy']:.2f}% final, "
                     f"{meta['best_student_accuracy']:.2f}% best; teacher "
                     f"{teacher_accs['test']:.2f}% ({self.protocol}) -> {workdir}/{RESULTS}")
        else:
            self.say(f"done in {format_duration(elapsed_total)} (no evaluation data) -> "
                     f"{workdir}/{RESULTS}")
        return results

    def divergence_advice(self) -> str:
        if not runtime.all_finite(self.teacher.variables):
            return (f"The teacher ({self.teacher.path or self.teacher.name}) itself has "
                    "non-finite weights: train or convert it again.")
        good = self.run_dir.checkpointer.latest_step()
        kept = (f"The last good checkpoint (iteration {good}) in {self.workdir}/checkpoints is "
                "intact" if good is not None else "No checkpoint was written yet")
        return (f"{kept}; lower the adversarial weight (config.loss.alpha) or the learning "
                "rates and re-run.")


# The run's curves are redrawn at most this often (and at the last epoch).
CURVES_MIN_INTERVAL_S = 30.0

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
