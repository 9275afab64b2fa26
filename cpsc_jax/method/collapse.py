"""Is the student collapsed? One class taking over its predictions where the teacher's are spread.

A collapsed student (e.g. dead ReLUs after one large step: only the last bias still moves) answers
one class for every image and no later step revives it. Checked at every evaluation on the fixed
probe of generated images (data-free, the same on every process) and, when given, on real test
predictions: the student's most predicted class c takes at least `share` of its predictions and
at least twice the share the teacher gives c on the same images.
"""
from typing import Any, Dict, Optional

import numpy as np

SHARE = 0.5


def class_shares(predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of `predicted` labels in each class."""
    counts = np.bincount(np.asarray(predicted).ravel(), minlength=num_classes)[:num_classes]
    return counts / max(len(np.asarray(predicted).ravel()), 1)


def check(student_predicted: np.ndarray, teacher_predicted: np.ndarray, num_classes: int,
          share: float = SHARE) -> Dict[str, Any]:
    """{"collapsed", "class", "student_share", "teacher_share"} for predictions on one set."""
    s = class_shares(student_predicted, num_classes)
    t = class_shares(teacher_predicted, num_classes)
    c = int(np.argmax(s))
    collapsed = bool(s[c] >= share and s[c] >= 2.0 * t[c])
    return {"collapsed": collapsed, "class": c, "student_share": round(float(s[c]), 4),
            "teacher_share": round(float(t[c]), 4)}


def scalars(result: Dict[str, Any], prefix: str = "collapse") -> Dict[str, float]:
    """The figures that go into metrics.jsonl."""
    return {f"{prefix}/collapsed": float(result["collapsed"]),
            f"{prefix}/student_top_share": result["student_share"],
            f"{prefix}/teacher_share_of_that_class": result["teacher_share"]}


def warning(result: Optional[Dict[str, Any]], where: str = "the probe images") -> str:
    """The progress line's warning ("" when healthy)."""
    if not result or not result["collapsed"]:
        return ""
    return (f"WARNING: collapsed student: it answers class {result['class']} for "
            f"{100 * result['student_share']:.0f}% of {where} (teacher "
            f"{100 * result['teacher_share']:.0f}%)")
