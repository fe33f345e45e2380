"""Prompts simulated from a true mask, as SAM's own training makes them.

SAM is trained interactively: a first prompt (a point inside the object, or
its box with noise), then corrective points taken from where the previous
prediction is wrong, each labelled by the truth there, with the previous
logits fed back as ``mask_input``. These functions make those prompts from a
mask in the model frame (pixel coordinates of the padded square input); they
are pure numpy, seeded by the caller's generator.
"""

from __future__ import annotations

import numpy as np

#: Box noise as in SAM: 10 % of each side, at most 20 px at 1024 scale.
BOX_NOISE = 0.1
BOX_NOISE_MAX_PX = 20.0


def sample_in(rng: np.random.Generator, region: np.ndarray) -> np.ndarray | None:
    """A random ``(x, y)`` point inside ``region`` (continuous pixel coordinates), or None if it is empty.

    Example:
        >>> mask = np.zeros((8, 8), bool); mask[2:4, 5:7] = True
        >>> x, y = sample_in(np.random.default_rng(0), mask)
        >>> bool(5 <= x < 7 and 2 <= y < 4)
        True
    """
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return None
    i = rng.integers(len(xs))
    return np.array([xs[i] + rng.random(), ys[i] + rng.random()], dtype=np.float32)


def jittered_box(rng: np.random.Generator, mask: np.ndarray, size: int) -> np.ndarray:
    """The mask's box ``[[x0, y0], [x1, y1]]``, each side moved by SAM's training noise, inside ``size``.

    Example:
        >>> mask = np.zeros((64, 64), bool); mask[10:30, 20:40] = True
        >>> jittered_box(np.random.default_rng(0), mask, 64).shape
        (2, 2)
    """
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    sx, sy = BOX_NOISE * (x1 - x0), BOX_NOISE * (y1 - y0)
    limit = BOX_NOISE_MAX_PX * size / 1024
    noise = np.clip(rng.normal(0, 1, 4) * np.array([sx, sy, sx, sy]), -limit, limit)
    box = np.clip(np.array([x0, y0, x1, y1], dtype=np.float32) + noise.astype(np.float32), 0, size)
    box[2:] = np.maximum(box[2:], box[:2] + 1)
    return box.reshape(2, 2)


def negative_point(rng: np.random.Generator, mask: np.ndarray, others: np.ndarray, size: int) -> np.ndarray:
    """A point outside the object: on a neighbouring object if one is near, else near the object, else anywhere."""
    ys, xs = np.nonzero(mask)
    pad = max(4, int(0.25 * max(xs.max() - xs.min(), ys.max() - ys.min())))
    near = np.zeros_like(mask)
    near[max(0, ys.min() - pad) : ys.max() + pad, max(0, xs.min() - pad) : xs.max() + pad] = True
    for region in (others & near, near & ~mask, ~mask):
        if region.any():
            return sample_in(rng, region)
    return np.array([rng.uniform(0, size), rng.uniform(0, size)], dtype=np.float32)


def corrective_point(rng: np.random.Generator, predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, float]:
    """A point from the error region of ``predicted`` against ``truth``, and its label (1 inside the truth).

    Where the prediction is right everywhere, a point inside the truth
    (label 1), as SAM does when there is nothing to correct.

    Example:
        >>> truth = np.zeros((8, 8), bool); truth[:4] = True
        >>> point, label = corrective_point(np.random.default_rng(0), np.zeros((8, 8), bool), truth)
        >>> label, bool(point[1] < 4)
        (1.0, True)
    """
    point = sample_in(rng, predicted ^ truth)
    if point is None:
        point = sample_in(rng, truth)
    x = min(int(point[0]), truth.shape[1] - 1)
    y = min(int(point[1]), truth.shape[0] - 1)
    return point, 1.0 if truth[y, x] else 0.0


def corrective_points(rng: np.random.Generator, predicted: np.ndarray, truths: np.ndarray):
    """:func:`corrective_point` for each of a batch: points ``(B, 1, 2)`` and labels ``(B, 1)``."""
    pairs = [corrective_point(rng, p, t) for p, t in zip(predicted, truths)]
    points = np.stack([p for p, _ in pairs])[:, None].astype(np.float32)
    labels = np.array([[label] for _, label in pairs], dtype=np.float32)
    return points, labels
