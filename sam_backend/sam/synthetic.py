"""Procedurally generated scenes of overlapping shapes, with their true masks.

The demo preset is trained on these, and tests and benchmarks judge masks
against them: every scene knows exactly which pixels belong to which shape.
Shapes (discs and ellipses, rotated rectangles, polygons, blobs) are filled
with flat colours, gradients or textures and drawn over varied backgrounds;
later shapes occlude earlier ones, and each mask is the *visible* part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPE_KINDS = ("ellipse", "rectangle", "polygon", "blob")


@dataclass
class Shape:
    """One shape: its kind, its outline in pixels and its fill.

    Attributes:
        kind: one of :data:`SHAPE_KINDS`.
        outline: ``(N, 2)`` x/y vertices of the closed outline.
        colors: two RGB colours; a flat fill uses the first.
        fill: ``"flat"``, ``"gradient"``, ``"stripes"``, ``"checker"`` or ``"noise"``.
    """

    kind: str
    outline: np.ndarray
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    fill: str = "flat"
    angle: float = 0.0
    period: float = 8.0

    def mask(self, size: tuple[int, int]) -> np.ndarray:
        """The full (unoccluded) ``(H, W)`` boolean mask of the shape."""
        height, width = size
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in self.outline.tolist()], fill=255)
        return np.asarray(canvas) > 127


@dataclass
class Scene:
    """An RGB image and the visible masks of its shapes, bottom to top.

    Example:
        >>> scene = generate_scene(np.random.default_rng(0), (240, 320))
        >>> scene.image.shape, scene.masks.shape[1:]
        ((240, 320, 3), (240, 320))
    """

    image: np.ndarray
    masks: np.ndarray
    shapes: list[Shape] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[:2]

    def areas(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).sum(axis=1)


# ------------------------------------------------------------------ outlines


def ellipse(center, radii, angle: float = 0.0, vertices: int = 96) -> np.ndarray:
    """Outline of an ellipse (a disc when both radii are equal)."""
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    return _place(np.stack([radii[0] * np.cos(t), radii[1] * np.sin(t)], 1), center, angle)


def rectangle(center, half_sides, angle: float = 0.0) -> np.ndarray:
    """Outline of a rectangle rotated by ``angle`` radians."""
    hx, hy = half_sides
    corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]], dtype=np.float64)
    return _place(corners, center, angle)


def polygon(rng: np.random.Generator, center, radius: float) -> np.ndarray:
    """A random simple polygon (3 to 8 vertices, star-shaped around ``center``)."""
    n = int(rng.integers(3, 9))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.55, 1.0, n)
    return _place(np.stack([r * np.cos(t), r * np.sin(t)], 1), center, 0.0)


def blob(rng: np.random.Generator, center, radius: float, vertices: int = 96) -> np.ndarray:
    """A smooth random blob: a radius that varies with a few low harmonics."""
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, 5):
        r += rng.uniform(0, 0.35 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = radius * r / r.max()
    return _place(np.stack([r * np.cos(t), r * np.sin(t)], 1), center, 0.0)


def _place(points: np.ndarray, center, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]])
    return rotated + np.asarray(center, dtype=np.float64)


# ---------------------------------------------------------------- painting


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _distinct_color(rng: np.random.Generator, avoid: list[np.ndarray], min_distance: float = 90.0):
    """A colour at least ``min_distance`` (RGB) away from every colour in ``avoid``."""
    best, best_distance = None, -1.0
    for _ in range(24):
        color = np.array(_random_color(rng), dtype=np.float64)
        distance = min((np.linalg.norm(color - a) for a in avoid), default=1e9)
        if distance >= min_distance:
            return tuple(int(v) for v in color)
        if distance > best_distance:
            best, best_distance = color, distance
    return tuple(int(v) for v in best)


def paint(size: tuple[int, int], colors, fill: str, angle: float = 0.0, period: float = 8.0) -> np.ndarray:
    """An ``(H, W, 3)`` float layer: a flat colour, gradient or texture between ``colors``."""
    height, width = size
    a = np.asarray(colors[0], dtype=np.float32)
    b = np.asarray(colors[1], dtype=np.float32)
    if fill == "flat":
        return np.broadcast_to(a, (height, width, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u = xs * math.cos(angle) + ys * math.sin(angle)
    if fill == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif fill == "stripes":
        t = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32) * 0.5
    elif fill == "checker":
        v = -xs * math.sin(angle) + ys * math.cos(angle)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2) * 0.5
    elif fill == "noise":
        seed = int(abs(angle) * 1e6 + period * 1e3) % (2**31)
        t = np.random.default_rng(seed).random((height, width), dtype=np.float32) * 0.6
    else:
        raise ValueError(f"unknown fill {fill!r}")
    return a + (b - a) * t[..., None]


def _random_fill(rng: np.random.Generator, fills=("flat", "flat", "gradient", "stripes", "checker", "noise")):
    return str(rng.choice(fills)), float(rng.uniform(0, np.pi)), float(rng.uniform(4, 14))


def render(
    size: tuple[int, int],
    shapes: list[Shape],
    background: tuple | None = None,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Scene:
    """Paint ``shapes`` in order over a background; masks are what stays visible.

    Args:
        size: ``(height, width)``.
        shapes: bottom to top.
        background: ``(colors, fill, angle, period)``; a flat mid-grey when None.
        noise: standard deviation of Gaussian pixel noise (0-255 units).
        rng: for the noise.
    """
    height, width = size
    colors, fill, angle, period = background or (((128, 128, 128), (128, 128, 128)), "flat", 0.0, 8.0)
    image = paint(size, colors, fill, angle, period).copy()
    visible = np.zeros((len(shapes), height, width), dtype=bool)
    for index, shape in enumerate(shapes):
        full = shape.mask(size)
        layer = paint(size, shape.colors, shape.fill, shape.angle, shape.period)
        image[full] = layer[full]
        visible[:index] &= ~full
        visible[index] = full
    if noise > 0:
        rng = rng or np.random.default_rng(0)
        image += rng.normal(0, noise, image.shape).astype(np.float32)
    return Scene(np.clip(image + 0.5, 0, 255).astype(np.uint8), visible, list(shapes))


def random_shape(rng: np.random.Generator, size: tuple[int, int], avoid_colors: list[np.ndarray]) -> Shape:
    """A shape of a random kind, position, size and fill that fits in ``size``."""
    height, width = size
    short = min(height, width)
    radius = short * rng.uniform(0.1, 0.32)
    center = (rng.uniform(radius * 0.6, width - radius * 0.6), rng.uniform(radius * 0.6, height - radius * 0.6))
    kind = str(rng.choice(SHAPE_KINDS))
    if kind == "ellipse":
        outline = ellipse(center, (radius, radius * rng.uniform(0.5, 1.0)), rng.uniform(0, np.pi))
    elif kind == "rectangle":
        outline = rectangle(center, (radius, radius * rng.uniform(0.4, 1.0)), rng.choice([0.0, rng.uniform(0, np.pi)]))
    elif kind == "polygon":
        outline = polygon(rng, center, radius)
    else:
        outline = blob(rng, center, radius)
    first = _distinct_color(rng, avoid_colors)
    second = _distinct_color(rng, avoid_colors, min_distance=40.0)
    fill, angle, period = _random_fill(rng)
    return Shape(kind, outline, (first, second), fill, angle, period)


def generate_scene(
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
    num_shapes: tuple[int, int] = (2, 7),
    min_visible_fraction: float = 0.004,
) -> Scene:
    """A random scene; shapes whose visible part is tiny are removed from the masks.

    Args:
        rng: the only source of randomness (scenes are reproducible).
        size: ``(height, width)``; random and non-square when None.
        num_shapes: inclusive-exclusive range of how many shapes are drawn.
        min_visible_fraction: visible area below this fraction of the image
            keeps a shape in the picture but not among the masks.
    """
    if size is None:
        long = int(rng.integers(256, 481))
        short = int(long * rng.uniform(0.5, 1.0))
        size = (long, short) if rng.random() < 0.4 else (short, long)
    bg_colors = (_random_color(rng), _random_color(rng))
    bg_fill, bg_angle, bg_period = _random_fill(rng, ("flat", "gradient", "gradient", "stripes", "checker", "noise"))
    avoid = [np.array(c, dtype=np.float64) for c in bg_colors]
    shapes = []
    for _ in range(int(rng.integers(*num_shapes))):
        shape = random_shape(rng, size, avoid)
        avoid.append(np.array(shape.colors[0], dtype=np.float64))
        shapes.append(shape)
    scene = render(size, shapes, (bg_colors, bg_fill, bg_angle, bg_period), float(rng.uniform(0, 12)), rng)
    if rng.random() < 0.3:
        blurred = Image.fromarray(scene.image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
        scene.image = np.asarray(blurred)
    keep = scene.areas() >= min_visible_fraction * size[0] * size[1]
    scene.masks = scene.masks[keep]
    scene.shapes = [s for s, k in zip(scene.shapes, keep) if k]
    return scene


def generate_cell_scene(rng: np.random.Generator, size: tuple[int, int] | None = None,
                        num_cells: tuple[int, int] = (2, 6)) -> Scene:
    """A scene of "cells": each object is a body with a nucleus of another colour inside it.

    A domain that the demo preset (trained on :func:`generate_scene`, where
    every colour region is an object of its own) gets wrong from one click:
    a click in the middle of a cell selects the nucleus, while the object is
    the whole cell. Learning from annotations (:mod:`sam_backend.learning`)
    is benchmarked on it.

    Example:
        >>> scene = generate_cell_scene(np.random.default_rng(0), (200, 300))
        >>> bool(scene.masks.any(axis=(1, 2)).all())
        True
    """
    if size is None:
        long = int(rng.integers(256, 481))
        short = int(long * rng.uniform(0.6, 1.0))
        size = (long, short) if rng.random() < 0.4 else (short, long)
    height, width = size
    background = (_random_color(rng), _random_color(rng))
    avoid = [np.array(c, dtype=np.float64) for c in background]
    shapes, placed = [], []
    for _ in range(int(rng.integers(*num_cells))):
        for _attempt in range(20):  # cells do not overlap: each object is whole
            radius = min(size) * rng.uniform(0.12, 0.22)
            center = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
            if all(np.hypot(*(center - c)) > radius + r + 4 for c, r in placed):
                break
        else:
            continue
        placed.append((center, radius))
        body_colors = (_distinct_color(rng, avoid), _distinct_color(rng, avoid, min_distance=40.0))
        nucleus_colors = (_distinct_color(rng, avoid + [np.array(body_colors[0], np.float64)], min_distance=120.0),) * 2
        fill, angle, period = _random_fill(rng, ("flat", "flat", "gradient", "noise"))
        shapes.append(Shape("blob", blob(rng, tuple(center), radius), body_colors, fill, angle, period))
        nucleus = ellipse(tuple(center + rng.uniform(-0.15, 0.15, 2) * radius),
                          (radius * rng.uniform(0.35, 0.5), radius * rng.uniform(0.3, 0.45)), rng.uniform(0, np.pi))
        shapes.append(Shape("ellipse", nucleus, nucleus_colors))
    bg_fill, bg_angle, bg_period = _random_fill(rng, ("flat", "gradient", "noise"))
    scene = render(size, shapes, (background, bg_fill, bg_angle, bg_period), float(rng.uniform(0, 8)), rng)
    scene.masks = scene.masks[0::2] | scene.masks[1::2]
    scene.shapes = scene.shapes[0::2]
    return scene


# ---------------------------------------------------------------- judging


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The ``(x, y)`` pixel of ``mask`` farthest from its border (by repeated erosion).

    This is where an annotator clicks to select an object, and where
    interactive-segmentation benchmarks put their first click.
    """
    current = mask.astype(bool)
    if not current.any():
        raise ValueError("empty mask")
    while True:
        eroded = current.copy()
        eroded[1:, :] &= current[:-1, :]
        eroded[:-1, :] &= current[1:, :]
        eroded[:, 1:] &= current[:, :-1]
        eroded[:, :-1] &= current[:, 1:]
        eroded[0, :] = eroded[-1, :] = False
        eroded[:, 0] = eroded[:, -1] = False
        if not eroded.any():
            break
        current = eroded
    ys, xs = np.nonzero(current)
    middle = len(xs) // 2
    return int(xs[middle]), int(ys[middle])


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """``x0, y0, x1, y1`` of a mask's pixels (inclusive pixel edges)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    """``python -m sam_backend.sam.synthetic OUT.png [OUT2.jpg ...] [--seed N]``: images to try the demo preset on."""
    import argparse

    parser = argparse.ArgumentParser(description="Write generated scenes of shapes, to label with the demo preset.")
    parser.add_argument("outputs", nargs="+", help="image files to write (.png, .jpg)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=640)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for output in args.outputs:
        scene = generate_scene(rng, (args.height, args.width))
        Image.fromarray(scene.image).save(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
