"""Brush RLE of a full-HD mask: label-studio-sdk's mask2rle against our numpy encoder.

Usage: python bench/rle.py [--repeat 5] [--width 1920] [--height 1080]

Times both on a noise mask (each pixel inside with probability 0.5: about a
million runs, the worst case) and on a smooth one (a large ellipse: a few
thousand runs, like a SAM mask), checks that they give the same list, and
prints the median times and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from label_studio_sdk.converter.brush import mask2rle  # noqa: E402

from sam_backend.labelstudio.rle import mask_to_rle  # noqa: E402
from timing import timed  # noqa: E402


def masks(height: int, width: int) -> dict[str, np.ndarray]:
    y, x = np.ogrid[:height, :width]
    return {
        "noise p=0.5": np.random.default_rng(0).random((height, width)) < 0.5,
        "ellipse": ((y - height / 2) / (0.4 * height)) ** 2 + ((x - width / 2) / (0.35 * width)) ** 2 <= 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each (median reported)")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    args = parser.parse_args()

    print(f"{args.width}x{args.height} mask, median of {args.repeat}; "
          f"{os.cpu_count()} CPU core(s), numpy {np.__version__}")
    print(f"{'mask':<12} {'runs':>9} {'RLE bytes':>10} {'SDK mask2rle':>13} {'mask_to_rle':>12} {'speed-up':>9}")
    for name, mask in masks(args.height, args.width).items():
        as_uint8 = mask.astype(np.uint8) * 255
        if mask_to_rle(mask) != mask2rle(as_uint8):
            sys.exit(f"{name}: mask_to_rle differs from mask2rle")
        sdk = statistics.median(timed(lambda: mask2rle(as_uint8), args.repeat))
        ours = statistics.median(timed(lambda: mask_to_rle(mask), args.repeat))
        runs = 1 + int(np.count_nonzero(mask.ravel()[1:] != mask.ravel()[:-1]))
        print(f"{name:<12} {runs:>9,} {len(mask_to_rle(mask)):>10,} {sdk * 1000:>10.1f} ms {ours * 1000:>9.1f} ms "
              f"{sdk / ours:>8.0f}x")


if __name__ == "__main__":
    main()
