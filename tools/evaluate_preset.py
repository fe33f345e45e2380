"""Score a SAM preset on held-out generated scenes, through the same engine the server uses.

For every shape of every scene it asks for masks the way an annotator would:

- ``click``: one positive click at the shape's most interior pixel;
- ``random click``: one positive click anywhere inside the shape;
- ``box``: the shape's tight bounding box;
- ``box + points``: that box, the interior click, and a negative click on a
  neighbouring shape when there is one;
- ``click + fix``: the click, then a second click on the largest error and the
  first mask's logits as ``mask_input`` (SAM's refinement loop).

IoU is measured at the original image size against the true visible mask.
The scenes come from :func:`sam_backend.sam.synthetic.generate_scene` with a seed
that training never uses.

Usage::

    python tools/evaluate_preset.py demo --scenes 200 --json scores.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam_backend.accel.attention import fuse_vitdet_attention  # noqa: E402
from sam_backend.accel.precision import choose_precision  # noqa: E402
from sam_backend.sam.engine import SamEngine  # noqa: E402
from sam_backend.sam.synthetic import bounding_box, generate_scene, interior_point, iou  # noqa: E402

logger = logging.getLogger("evaluate_preset")

#: Training draws from seed 0; held-out scenes start far from it.
HELD_OUT_SEED = 2024_11_21


def neighbour_point(scene, index: int) -> np.ndarray | None:
    """The interior point of the largest other shape that touches shape ``index``'s box."""
    x0, y0, x1, y1 = bounding_box(scene.masks[index]).astype(int)
    best, best_area = None, 0
    for j, other in enumerate(scene.masks):
        if j == index:
            continue
        inside = other[y0:y1, x0:x1].sum()
        if inside > best_area:
            best, best_area = j, inside
    if best is None or best_area < 20:
        return None
    near = np.zeros_like(scene.masks[best])
    near[y0:y1, x0:x1] = scene.masks[best][y0:y1, x0:x1]
    return np.array(interior_point(near), dtype=np.float32)


def largest_error_point(mask: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int]:
    """The most interior pixel of the larger error (missed or extra), and its true label."""
    missed, extra = truth & ~mask, mask & ~truth
    region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
    if not region.any():
        return np.array(interior_point(truth), dtype=np.float32), 1
    return np.array(interior_point(region), dtype=np.float32), label


def evaluate(engine: SamEngine, scenes: int, seed: int = HELD_OUT_SEED) -> dict:
    """Mean IoU per prompt kind over ``scenes`` generated scenes."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {k: [] for k in ("click", "random click", "box", "box + points", "click + fix")}
    encode_seconds = decode_seconds = 0.0
    decodes = 0
    for number in range(scenes):
        scene = generate_scene(rng)
        started = time.perf_counter()
        embedding = engine.encode(scene.image)
        encode_seconds += time.perf_counter() - started
        started = time.perf_counter()
        for index, truth in enumerate(scene.masks):
            center = np.array(interior_point(truth), dtype=np.float32)
            ys, xs = np.nonzero(truth)
            pick = rng.integers(len(xs))
            anywhere = np.array([xs[pick] + 0.5, ys[pick] + 0.5], dtype=np.float32)
            box = bounding_box(truth)
            negative = neighbour_point(scene, index)

            click = engine.decode(embedding, points=[center + 0.5], labels=[1])
            scores["click"].append(iou(click.mask, truth))
            scores["random click"].append(iou(engine.decode(embedding, points=[anywhere], labels=[1]).mask, truth))
            scores["box"].append(iou(engine.decode(embedding, box=box).mask, truth))
            points, labels = [center + 0.5], [1]
            if negative is not None:
                points, labels = points + [negative + 0.5], labels + [0]
            scores["box + points"].append(iou(engine.decode(embedding, points=points, labels=labels, box=box).mask, truth))
            fix, fix_label = largest_error_point(click.mask, truth)
            refined = engine.decode(
                embedding,
                points=[center + 0.5, fix + 0.5],
                labels=[1, fix_label],
                mask_input=click.low_res_logits[0],
            )
            scores["click + fix"].append(iou(refined.mask, truth))
            decodes += 5
        decode_seconds += time.perf_counter() - started
        if (number + 1) % 25 == 0:
            logger.info("%d/%d scenes: %s", number + 1, scenes, _summary(scores))
    return {
        "scenes": scenes,
        "shapes": len(scores["click"]),
        "seed": seed,
        "mean_iou": {k: round(float(np.mean(v)), 4) for k, v in scores.items()},
        "median_iou": {k: round(float(np.median(v)), 4) for k, v in scores.items()},
        "encode_ms": round(1000 * encode_seconds / scenes, 1),
        "decode_ms": round(1000 * decode_seconds / max(decodes, 1), 1),
    }


def _summary(scores: dict) -> str:
    return ", ".join(f"{k} {np.mean(v):.3f}" for k, v in scores.items())


def markdown(result: dict) -> str:
    """The result as the table in the model card."""
    lines = ["| prompt | mean IoU | median IoU |", "| --- | --- | --- |"]
    for kind, value in result["mean_iou"].items():
        lines.append(f"| {kind} | {value:.3f} | {result['median_iou'][kind]:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="demo", help="preset name or directory (default: demo)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--json", help="also write the scores to this file")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="float32",
                        help="the image encoder's precision, chosen as the server does (a reduced one only if it "
                             "passes the parity check; default float32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    engine = SamEngine.from_preset(args.preset)
    fuse_vitdet_attention(engine.model)  # as served
    choose_precision(engine, args.precision)
    result = evaluate(engine, args.scenes, args.seed)
    result["preset"] = args.preset
    result["precision"] = engine.precision
    logger.info("%d shapes in %d scenes; encode %.1f ms, decode %.1f ms", result["shapes"], result["scenes"],
                result["encode_ms"], result["decode_ms"])
    sys.stdout.write(markdown(result) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
