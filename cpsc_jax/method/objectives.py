"""The loss of each phase (docs/method.md, sections 3 and 4): which terms, with which weights.

`generator_objective` and `student_objective` are the one place where the terms of
`cpsc_jax.method.losses` are composed; the step functions (`cpsc_jax.method.steps`), the benchmark and the
conditioning diagnostics all go through them. Each returns the weighted contributions by name
(the loss is their sum) and the raw terms for logging, so another generator objective is a
change here only.

Weights and forms (config.loss):
    generator: -kd*KD + alpha*IKD_G + beta*BN + gamma*SupCon + eta*CE(teacher, ce_form)
    student:    kd*KD(T = student_kd_temperature) + alpha*student_ikd_scale*IKD_S + student_eta*CE(student, student_ce_form)
A weight of 0 removes the term from the computation.
"""
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

from cpsc_jax.method import losses
from cpsc_jax.dtypes import at_least_float32
from cpsc_jax.models import BN_MOMENTS


def generator_objective(nets, w, teacher_vars, x, y, student_vars, adapter_params,
                        axis_name: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, Any], Any]:
    """Contributions, raw terms and the student's updated BN statistics for generated `x`.

    The teacher runs in inference mode (its BN-input moments captured when beta > 0); the
    student in training mode, so its running averages see these batches too (released code).
    """
    if w.beta > 0:
        (t_logits, t_feat), t_cols = nets.teacher.apply(
            teacher_vars, x, train=False, features=True, mutable=[BN_MOMENTS])
    else:
        t_logits, t_feat = nets.teacher.apply(teacher_vars, x, train=False, features=True)
    (s_logits, s_feat), s_updates = nets.student.apply(
        student_vars, x, train=True, features=True, mutable=["batch_stats"])
    t_logits, s_logits = at_least_float32(t_logits), at_least_float32(s_logits)
    terms, parts = {}, {}
    if w.kd > 0:
        terms["kd"] = losses.kd_loss(s_logits, t_logits)
        parts["kd"] = -w.kd * terms["kd"]
    if w.alpha > 0:
        terms["ikd"] = losses.ikd_generator_loss(s_logits, t_logits, w.ikd_form, axis_name)
        parts["ikd"] = w.alpha * terms["ikd"]
    if w.beta > 0:
        terms["bn"] = losses.bn_statistics_loss(t_cols[BN_MOMENTS], teacher_vars["batch_stats"])
        parts["bn"] = w.beta * terms["bn"]
    if w.gamma > 0:
        v_s = losses.l2_normalize(s_feat)
        if nets.adapter is not None:
            # The head's raw output is the student's view (released code: not normalised again).
            v_s = nets.adapter.apply({"params": adapter_params}, v_s)
        terms["supcon"] = losses.two_view_supcon_loss(
            v_s, losses.l2_normalize(t_feat), y, w.temperature, w.base_temperature, axis_name)
        parts["supcon"] = w.gamma * terms["supcon"]
    if w.eta > 0:
        terms["ce"] = losses.cross_entropy_loss(t_logits, y, w.ce_form)
        parts["ce"] = w.eta * terms["ce"]
    terms["teacher_agrees"] = jnp.mean(jnp.argmax(t_logits, -1) == y)
    return parts, terms, s_updates.get("batch_stats", {})


def student_objective(nets, w, student_vars, x, t_logits, y,
                      axis_name: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, Any], Any]:
    """Contributions, raw terms and updated BN statistics of the student on fixed `x`."""
    s_logits, updates = nets.student.apply(student_vars, x, train=True, mutable=["batch_stats"])
    s_logits = at_least_float32(s_logits)
    terms, parts = {}, {}
    if w.kd > 0:
        terms["kd"] = losses.kd_loss(s_logits, t_logits, w.student_kd_temperature)
        parts["kd"] = w.kd * terms["kd"]
    if w.alpha * w.student_ikd_scale > 0:
        terms["ikd"] = losses.ikd_student_loss(s_logits, t_logits, w.ikd_form, axis_name)
        parts["ikd"] = w.alpha * w.student_ikd_scale * terms["ikd"]
    if w.student_eta > 0:
        terms["ce"] = losses.cross_entropy_loss(s_logits, y, w.student_ce_form)
        parts["ce"] = w.student_eta * terms["ce"]
    terms["agreement"] = jnp.mean(jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1))
    return parts, terms, updates.get("batch_stats", {})


def total(parts: Dict[str, Any]):
    return sum(parts.values()) if parts else jnp.zeros(())
