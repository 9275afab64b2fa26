"""Class faithfulness of the conditional generator: does the teacher see y in G(z, y)?

Measured at every evaluation on one fixed probe set (same z and y each time): for every class
k, `per_class` latents with label k (64 by default, fewer when K is large so the probe stays
under `max_total` images). The generator runs as in training (batch statistics, batches of the
run's batch size with the labels mixed); the teacher runs in inference mode. Reported:

  agreement            fraction of probe images whose teacher argmax is the requested label
  per_class_agreement  the same per class
  confidence           the teacher's mean softmax probability of the requested label
  diversity            mean over classes of the mean pairwise distance between the teacher's
                       L2-normalised features of the probe images of that class (0: one image
                       repeated; sqrt(2) ~ 1.41: orthogonal features)
  real_diversity       the same figure on real test images of each class (when given): what a
                       class-faithful and diverse generator should come close to
"""
import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

PER_CLASS = 64
MAX_TOTAL = 2048


class Probe:
    """Fixed latents and labels; `order` mixes the classes the way training batches do."""

    def __init__(self, num_classes: int, nz: int, seed: int, per_class: int = PER_CLASS,
                 max_total: int = MAX_TOTAL):
        self.per_class = max(1, min(per_class, max_total // num_classes))
        self.num_classes = num_classes
        rng = np.random.default_rng([seed, 0xFA17])
        self.labels = np.repeat(np.arange(num_classes, dtype=np.int32), self.per_class)
        self.latents = rng.standard_normal((len(self.labels), nz)).astype(np.float32)
        self.order = rng.permutation(len(self.labels))

    def __len__(self):
        return len(self.labels)


def _pairwise_distance(features: np.ndarray) -> float:
    """Mean distance between distinct rows of unit vectors (nan for fewer than 2)."""
    n = len(features)
    if n < 2:
        return float("nan")
    gram = np.clip(features @ features.T, -1.0, 1.0)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * gram, 0.0))
    return float((dist.sum() - np.trace(dist)) / (n * (n - 1)))


def class_diversity(features: np.ndarray, labels: np.ndarray, num_classes: int):
    """Per-class mean pairwise distance of L2-normalised features."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return [_pairwise_distance(f[labels == k]) for k in range(num_classes)]


def _nanmean(values) -> Optional[float]:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


@functools.partial(jax.jit, static_argnums=0)
def _teacher_outputs(model, variables, x):
    logits, feature = model.apply(variables, x, train=False, features=True)
    return jax.nn.softmax(logits.astype(jnp.float32), -1), feature.astype(jnp.float32)


def teacher_outputs(model, variables, images: np.ndarray, batch: int = 500):
    """(probabilities, features) of normalised float images, in batches of one shape."""
    n = len(images)
    bs = max(1, min(batch, n))
    probs, feats = [], []
    for i in range(0, n, bs):
        x = images[i:i + bs]
        if len(x) < bs:
            x = np.concatenate([x, np.zeros((bs - len(x),) + x.shape[1:], x.dtype)])
        p, f = _teacher_outputs(model, variables, jnp.asarray(x))
        probs.append(np.asarray(p))
        feats.append(np.asarray(f))
    return np.concatenate(probs)[:n], np.concatenate(feats)[:n]


def real_class_diversity(model, variables, images_uint8: np.ndarray, labels: np.ndarray,
                         num_classes: int, mean, std, per_class: int) -> list:
    """The diversity figure on up to `per_class` real images of each class (computed once)."""
    keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)])
    x = (images_uint8[keep].astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) \
        / np.asarray(std, np.float32)
    _, feats = teacher_outputs(model, variables, x)
    return class_diversity(feats, labels[keep], num_classes)


def generate_probe(generate: Callable[[Any, Any], Any], probe: Probe, batch_size: int) -> np.ndarray:
    """G(z, y) of the whole probe, in batches of `batch_size` with the classes mixed (the
    last batch is padded), back in probe order."""
    order = probe.order
    pad = (-len(order)) % batch_size
    order = np.concatenate([order, order[:pad]])
    images = None
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x = np.asarray(generate(jnp.asarray(probe.latents[idx]), jnp.asarray(probe.labels[idx])))
        if images is None:
            images = np.zeros((len(probe),) + x.shape[1:], np.float32)
        images[idx] = x
    return images


def probe_statistics(images: np.ndarray, probe: Probe, teacher_model, teacher_vars,
                     real_diversity: Optional[list] = None) -> Dict[str, Any]:
    """Agreement, confidence and diversity of generated probe images (see the module doc)."""
    k = probe.num_classes
    probs, feats = teacher_outputs(teacher_model, teacher_vars, images)
    y = probe.labels
    agrees = np.argmax(probs, -1) == y
    conf = probs[np.arange(len(y)), y]
    diversity = class_diversity(feats, y, k)
    out = {
        "agreement": float(np.mean(agrees)),
        "confidence": float(np.mean(conf)),
        "diversity": _nanmean(diversity),
        "real_diversity": _nanmean(real_diversity) if real_diversity is not None else None,
        "per_class_agreement": [round(float(np.mean(agrees[y == c])), 4) for c in range(k)],
        "per_class_confidence": [round(float(np.mean(conf[y == c])), 4) for c in range(k)],
        "per_class_diversity": [None if not np.isfinite(d) else round(d, 4) for d in diversity],
        "per_class_real_diversity": (None if real_diversity is None else
                                     [None if not np.isfinite(d) else round(d, 4)
                                      for d in real_diversity]),
        "probe_size": len(probe),
        "predicted": np.argmax(probs, -1).astype(np.int32),   # for the sample grid; not logged
    }
    return out


def scalars(stats: Dict[str, Any]) -> Dict[str, float]:
    """The figures that go into metrics.jsonl and the progress line."""
    return {f"faithfulness/{k}": stats[k] for k in ("agreement", "confidence", "diversity",
                                                     "real_diversity") if stats.get(k) is not None}


def summary(stats: Dict[str, Any]) -> str:
    real = stats.get("real_diversity")
    div = f"div {stats['diversity']:.2f}" + (f"/{real:.2f}" if real is not None else "")
    return f"G agrees {stats['agreement']:.2f} conf {stats['confidence']:.2f} {div}"
