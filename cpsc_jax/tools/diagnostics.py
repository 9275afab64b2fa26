"""How a student dies: its dead units, and a trace of the first iterations of a run
(learning rate, loss, accuracy, most predicted class, dead units after each)."""
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np


def dead_units(model, variables, x) -> Dict[str, float]:
    """Per layer, the fraction of output channels with no positive value on any image of `x`
    (a ReLU after them passes nothing, so no gradient reaches their weights again). Every
    submodule output is counted except the logits."""
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    flat = jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0]
    out = {}
    for path, v in flat[:-1]:   # the last one recorded is the whole model's output
        names = [getattr(p, "key", "") for p in path if isinstance(getattr(p, "key", None), str)]
        name = "/".join(n for n in names if n != "__call__")
        if v.ndim < 2 or not name or name.startswith("bn"):
            continue
        peak = jnp.max(v.reshape(-1, v.shape[-1]), axis=0)
        out[name] = float(jnp.mean(peak <= 0))
    return out


def student_trace(config, teacher, images, labels, iterations: int, seed: int = 0,
                  log=print):
    """Runs the first `iterations` iterations of a distillation (one device) and after each
    records what a dying student shows: its learning rate and loss, its accuracy and its most
    predicted class's share on `images` (normalised, with `labels`), its dead units
    (`dead_units`) and the norm of its last layer's bias against its weights. A list of dicts."""
    from cpsc_jax.method import collapse, steps
    from cpsc_jax.infra import runtime
    from cpsc_jax.models import get_model
    topo = runtime.topology(1)
    nets = steps.build_networks(config, teacher)
    iteration = steps.make_train_iteration(nets, config, 1, report_learning_rates=True)
    state = runtime.replicate(steps.init_state(nets, config, jax.random.PRNGKey(seed)), topo)
    teacher_vars = runtime.replicate(teacher.variables, topo)
    student = get_model(config.student.arch, config.num_classes)
    predict = jax.jit(lambda v, x: jnp.argmax(student.apply(v, x, train=False), -1))
    teacher_pred = np.asarray(jax.jit(lambda x: jnp.argmax(
        nets.teacher.apply(teacher.variables, x, train=False), -1))(images))
    rows = []
    for i in range(1, iterations + 1):
        state, metrics = iteration(state, teacher_vars, topo.device_ids())
        v = {"params": state.student.params, "batch_stats": state.student.batch_stats}
        pred = np.asarray(predict(v, images))
        health = collapse.check(pred, teacher_pred, config.num_classes)
        row = {"iteration": i, "lr/student": float(metrics["lr/student"]),
               "lr/generator": float(metrics["lr/generator"]),
               "student_loss": float(metrics["student/loss"]),
               "accuracy": round(100 * float(np.mean(pred == labels)), 2),
               "top_class": health["class"], "top_share": health["student_share"],
               "dead": {k: round(d, 3) for k, d in dead_units(student, v, images).items()}}
        rows.append(row)
        log(row)
    return rows
