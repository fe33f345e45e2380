"""Encode once, decode many, against the naive full-model call per click.

Usage: python bench/engine_split.py [--arch sam_base_sa1b] [--device cpu] [--encodes 3] [--decodes 20]

Prints a table of median times; random weights (the timing does not depend on them).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from architectures import build_segmenter  # noqa: E402
from timing import timed  # noqa: E402
from sam_backend.sam.engine import SamEngine  # noqa: E402
from sam_backend.sam.transforms import preprocess  # noqa: E402

logger = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sam_base_sa1b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--encodes", type=int, default=3)
    parser.add_argument("--decodes", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    started = time.perf_counter()
    segmenter = build_segmenter(args.arch)
    engine = SamEngine(segmenter, preset=args.arch, device=args.device)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    click = dict(points=[[600.0, 400.0]], labels=[1])

    engine.encode(image)  # warm-up (first call allocates)
    encode = timed(lambda: engine.encode(image), args.encodes)
    embedding = engine.encode(image)
    engine.decode(embedding, **click).mask
    decode = timed(lambda: engine.decode(embedding, **click).mask, args.decodes)

    frame = embedding.frame
    inputs = {
        "images": preprocess(image, engine.input_size)[None],
        "points": np.concatenate([frame.to_model(np.array(click["points"], np.float32)), [[0, 0]]])[None].astype(np.float32),
        "labels": np.array([[1, -1]], np.float32),
        # What predict() fills in; predict itself needs grain or TensorFlow to batch, which the install leaves out.
        "boxes": np.zeros((1, 0, 2, 2), np.float32),
        "masks": np.zeros((1, 0, *engine.mask_input_size, 1), np.float32),
    }
    # What the keras-hub docs show for one prompt: the whole model on the image (predict's one call).

    def whole_model():
        with torch.no_grad():
            return segmenter(inputs)

    naive = timed(whole_model, args.encodes)

    med = statistics.median
    rows = [
        ("encode (image encoder, once per image)", med(encode)),
        ("decode (prompt encoder + mask decoder + upsampling)", med(decode)),
        ("naive: SAMImageSegmenter.predict per click", med(naive)),
    ]
    params = segmenter.count_params()
    print(f"\n{args.arch} architecture, {params / 1e6:.1f} M parameters, random weights; "
          f"device {engine.device_name}, torch threads {torch.get_num_threads()}; image 1280x720; "
          f"built in {build_s:.1f}s")
    print(f"{'step':<55} {'median':>10}")
    for name, seconds in rows:
        print(f"{name:<55} {seconds * 1000:>8.1f} ms")
    print(f"\nper click after the first: naive / decode = {med(naive) / med(decode):.0f}x")
    n = 10
    print(f"{n} clicks on one image: split {(med(encode) + n * med(decode)):.2f}s, naive {n * med(naive):.2f}s "
          f"({n * med(naive) / (med(encode) + n * med(decode)):.1f}x)")


if __name__ == "__main__":
    main()
