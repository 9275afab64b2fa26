"""The collapsed-student check (cpsc_jax.method.collapse) and its place in a run's outputs."""

import numpy as np

from cpsc_jax.method import collapse


def test_one_class_taking_over_where_the_teacher_spreads_is_collapse():
    teacher = np.repeat(np.arange(10), 20)
    dead = np.full(200, 8)
    r = collapse.check(dead, teacher, 10)
    assert r == {"collapsed": True, "class": 8, "student_share": 1.0, "teacher_share": 0.1}
    assert "class 8 for 100%" in collapse.warning(r)
    assert collapse.scalars(r)["collapse/collapsed"] == 1.0


def test_a_healthy_student_or_one_that_follows_a_skewed_teacher_is_not():
    rng = np.random.default_rng(0)
    teacher = np.repeat(np.arange(10), 20)
    healthy = np.where(rng.random(200) < 0.9, teacher, rng.integers(0, 10, 200))
    assert not collapse.check(healthy, teacher, 10)["collapsed"]
    skewed_teacher = np.where(np.arange(200) < 140, 3, teacher)   # the images look like 3s
    follows = skewed_teacher.copy()
    r = collapse.check(follows, skewed_teacher, 10)
    assert r["class"] == 3 and r["student_share"] >= 0.5 and not r["collapsed"]
    assert collapse.warning(r) == ""
    # The threshold is a share of one half: 49% on one class is not flagged, 50% is.
    almost = np.concatenate([np.full(98, 0), teacher[-102:]])   # 49% zeros
    assert not collapse.check(almost, teacher, 10)["collapsed"]
    half = np.concatenate([np.full(100, 5), np.arange(100) % 4])
    assert collapse.check(half, teacher, 10)["collapsed"]
