"""What polygon output adds to a click: a full-HD SAM-like mask to Label Studio polygon regions.

Usage: python bench/polygons.py [--repeat 20] [--width 1920] [--height 1080]

Times :func:`~sam_backend.labelstudio.polygons.mask_to_polygon_regions` (the
corner outline, ``findContours``, ``approxPolyDP``, percent points, the
region dicts) at the default settings on smooth masks (one large ellipse, a
tilted ellipse beside a disc) and on a ragged one (an ellipse with a noisy
edge and specks), next to the brush region of the same mask, and prints the
median, the vertices and the IoU of the polygons drawn back with the mask.
The issue's budget is 10 ms per click on a smooth 1920x1080 mask.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from sam_backend.labelstudio.labelconfig import LabelConfig  # noqa: E402
from sam_backend.labelstudio.polygons import PolygonSettings, mask_to_polygon_regions  # noqa: E402
from sam_backend.labelstudio.regions import mask_to_brush_region  # noqa: E402
from timing import timed  # noqa: E402

CONFIG = LabelConfig("image", "image", "brush", ("Object",), (), (), "polygon", ("Object",))
BUDGET_MS = 10.0


def masks(height: int, width: int) -> dict[str, np.ndarray]:
    y, x = np.ogrid[:height, :width]
    ellipse = ((y - height / 2) / (0.4 * height)) ** 2 + ((x - width / 2) / (0.35 * width)) ** 2 <= 1
    c, s = np.cos(0.5), np.sin(0.5)
    dx, dy = x - 0.35 * width, y - 0.5 * height
    tilted = ((c * dx + s * dy) / (0.25 * width)) ** 2 + ((c * dy - s * dx) / (0.15 * height)) ** 2 <= 1
    disc = (x - 0.8 * width) ** 2 + (y - 0.3 * height) ** 2 <= (0.12 * height) ** 2
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 3)
    ragged = (((y - height / 2) / (0.4 * height)) ** 2 + ((x - width / 2) / (0.35 * width)) ** 2 + 3 * noise <= 1)
    ragged |= rng.random((height, width)) < 2e-4  # specks
    return {"ellipse": ellipse, "ellipse + disc": tilted | disc, "ragged + specks": ragged}


def drawn_back(regions: list[dict], height: int, width: int) -> np.ndarray:
    """The regions filled again with OpenCV (sub-pixel vertices; it also takes pixels an edge touches)."""
    canvas = np.zeros((height, width), np.uint8)
    for region in regions:
        points = np.asarray(region["value"]["points"]) * [width / 100.0, height / 100.0]
        # fillPoly's 8-bit fixed point: coordinates in 1/256 px, pixel centres at integers.
        fixed = np.round((points - 0.5) * 256).astype(np.int32)
        cv2.fillPoly(canvas, [fixed], 1, shift=8)
    return canvas.astype(bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="repetitions of each (median reported)")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    args = parser.parse_args()
    settings = PolygonSettings()

    print(f"{args.width}x{args.height} mask, median of {args.repeat}; {os.cpu_count()} CPU core(s), "
          f"OpenCV {cv2.__version__}; {settings}")
    print(f"{'mask':<16} {'polygons':>8} {'vertices':>8} {'IoU':>6} {'polygons':>10} {'brush RLE':>10}")
    smooth_worst = 0.0
    for name, mask in masks(args.height, args.width).items():
        regions = mask_to_polygon_regions(mask, "Object", 0.9, CONFIG, settings)
        vertices = sum(len(r["value"]["points"]) for r in regions)
        drawn = drawn_back(regions, args.height, args.width)
        iou = np.logical_and(drawn, mask).sum() / np.logical_or(drawn, mask).sum()
        polygon_s = statistics.median(timed(lambda: mask_to_polygon_regions(mask, "Object", 0.9, CONFIG), args.repeat))
        brush_s = statistics.median(timed(lambda: mask_to_brush_region(mask, "Object", 0.9, CONFIG), args.repeat))
        if not name.startswith("ragged"):
            smooth_worst = max(smooth_worst, polygon_s)
        print(f"{name:<16} {len(regions):>8} {vertices:>8} {iou:>6.3f} {polygon_s * 1000:>7.2f} ms "
              f"{brush_s * 1000:>7.2f} ms")
    verdict = "within" if smooth_worst * 1000 <= BUDGET_MS else "OVER"
    print(f"Smooth masks: at most {smooth_worst * 1000:.2f} ms per click, {verdict} the {BUDGET_MS:.0f} ms budget.")


if __name__ == "__main__":
    main()
