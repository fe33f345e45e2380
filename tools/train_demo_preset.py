"""Train the small ``demo`` SAM preset on generated scenes and save it with ``save_to_preset``.

The model is keras-hub's own SAM architecture (``ViTDetBackbone``,
``SAMPromptEncoder``, ``SAMMaskDecoder``, ``SAMBackbone``), scaled down to a
256-pixel input and about 2 M parameters, so that it trains on a laptop CPU
in well under an hour and ships inside the package. It learns one thing:
segmenting the shapes of :mod:`sam_backend.sam.synthetic` from SAM-style prompts.

The objective follows the SAM paper: a per-pixel loss + dice loss on the masks
(SAM's focal x20 with ``--focal-weight 20 --bce-weight 0``; cross-entropy by
default, which is what the shipped preset used), MSE between the IoU head and
each mask's real IoU; prompts are a random point
inside the object (ambiguous: three outputs, only the best one is trained),
a jittered box, a box with points, several positive and negative points, and
a second round that adds a point from the error region and feeds the first
round's logits back as ``mask_input``.

Usage::

    python tools/train_demo_preset.py                    # ~27 min on 2 CPU cores
    python tools/train_demo_preset.py --steps 50 --output /tmp/demo   # smoke test
    python tools/evaluate_preset.py sam_backend/presets/demo

Everything is seeded; the same command gives the same weights on the same
machine and library versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sam_backend  # noqa: F401  (sets KERAS_BACKEND before keras loads)
from sam_backend.learning.objective import SamObjective
from sam_backend.learning.prompts import corrective_points as corrective_batch
from sam_backend.learning.prompts import jittered_box, negative_point, sample_in
from sam_backend.sam.architectures import SamArchitecture, build_sam
from sam_backend.sam.engine import SamEngine
from sam_backend.sam.synthetic import generate_scene
from sam_backend.sam.transforms import preprocess, resized_shape

logger = logging.getLogger("train_demo_preset")

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "sam_backend" / "presets" / "demo"

#: The demo architecture: small enough to train on a CPU and ship (< 10 MB).
ARCHITECTURE = SamArchitecture(
    input_size=256,
    encoder_width=128,
    encoder_depth=6,
    encoder_heads=4,
    encoder_mlp=384,
    window_size=8,
    global_layers=(2, 5),
    embed_dim=128,
    decoder_heads=4,
    decoder_mlp=384,
)


# ------------------------------------------------------------------ data


class Batch:
    """Preprocessed images and, per sampled object, its image index and true mask."""

    def __init__(self, images: np.ndarray, owners: np.ndarray, masks: np.ndarray, others: list[np.ndarray]):
        self.images = images  # (B, S, S, 3) float32
        self.owners = owners  # (P,) index of each object's image
        self.masks = masks  # (P, S, S) bool, in the padded model frame
        self.others = others  # per object: union of the other objects' masks


def make_batch(rng: np.random.Generator, images: int, objects: int, size: int) -> Batch:
    """``images`` generated scenes and up to ``objects`` objects from each."""
    inputs, owners, masks, others = [], [], [], []
    while len(inputs) < images:
        scene = generate_scene(rng)
        if len(scene.masks) == 0:
            continue
        h, w = resized_shape(scene.size, size)
        framed = np.zeros((len(scene.masks), size, size), dtype=bool)
        for i, m in enumerate(scene.masks):
            small = Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)
            framed[i, :h, :w] = np.asarray(small) > 127
        areas = framed.reshape(len(framed), -1).sum(1)
        candidates = np.flatnonzero(areas >= 12)
        if len(candidates) == 0:
            continue
        chosen = rng.choice(candidates, size=min(objects, len(candidates)), replace=False)
        everything = framed.any(0)
        for i in chosen:
            owners.append(len(inputs))
            masks.append(framed[i])
            others.append(everything & ~framed[i])
        inputs.append(preprocess(scene.image, size))
    return Batch(np.stack(inputs), np.array(owners), np.stack(masks), others)


# ------------------------------------------------------------------ loss


class Trainer:
    """SAM's loss over the engine's own prompt encoder and mask decoder path, with gradients."""

    def __init__(self, model, size: int, focal_weight: float = 20.0, bce_weight: float = 0.0):
        self.objective = SamObjective(focal_weight, bce_weight)
        self.engine = SamEngine(model, preset="demo-training")
        self.size = size

    def decode(self, features, owners, points, labels, boxes=None, mask_inputs=None):
        import torch

        return self.engine.decode_tensors(features[torch.as_tensor(owners)], points, labels, boxes, mask_inputs)

    def loss(self, logits, iou_pred, targets, multimask: bool):
        """SAM's loss for one group of prompts; returns (loss, chosen low-res logits, IoU of chosen)."""
        step = self.objective(logits, iou_pred, targets, multimask)
        return step.loss, step.logits, step.iou


def corrective_points(rng, low_res, targets, size) -> tuple[np.ndarray, np.ndarray]:
    """A point from each prediction's error region, labelled by the truth there."""
    import torch.nn.functional as F

    pred = F.interpolate(low_res[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0] > 0
    return corrective_batch(rng, pred.numpy(), targets)


#: Each step trains one pair of prompt kinds, in turn: a first round and what follows it.
STEP_KINDS = ("click", "box", "points")


def train_step(trainer: Trainer, rng, batch: Batch, encoder, kind: str):
    """One step's loss over two groups of prompts of ``kind``; returns (loss tensor, stats).

    - ``click``: one positive point (ambiguous: three outputs, the best is
      trained), then a second round with a corrective point and the first
      round's logits as ``mask_input``;
    - ``box``: a jittered box, then its second round likewise;
    - ``points``: a box with one or two points, and 1-3 positive plus 1-2
      negative points without a box.
    """
    import torch

    size = trainer.size
    features = encoder(torch.as_tensor(batch.images))
    targets_np = batch.masks
    low_res = trainer.engine.mask_input_size
    targets = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(targets_np, dtype=torch.float32)[:, None], low_res)[:, 0]
    owners = batch.owners
    count = len(owners)
    stats = {}
    positives = np.stack([sample_in(rng, m) for m in targets_np])[:, None]
    boxes = np.stack([jittered_box(rng, m, size) for m in targets_np])[:, None]
    ones = np.ones((count, 1), np.float32)

    def negatives():
        return np.stack([negative_point(rng, m, o, size) for m, o in zip(targets_np, batch.others)])

    if kind == "click":
        logits, iou = trainer.decode(features, owners, positives, ones)
        first, previous, stats["click"] = trainer.loss(logits, iou, targets, multimask=True)
        new_pts, new_labels = corrective_points(rng, previous, targets_np, size)
        logits, iou = trainer.decode(
            features, owners, np.concatenate([positives, new_pts], 1), np.concatenate([ones, new_labels], 1),
            mask_inputs=previous,
        )
        second, _, stats["click+fix"] = trainer.loss(logits, iou, targets, multimask=False)
    elif kind == "box":
        logits, iou = trainer.decode(features, owners, np.zeros((count, 0, 2)), np.zeros((count, 0)), boxes)
        first, previous, stats["box"] = trainer.loss(logits, iou, targets, multimask=False)
        new_pts, new_labels = corrective_points(rng, previous, targets_np, size)
        logits, iou = trainer.decode(features, owners, new_pts, new_labels, boxes, mask_inputs=previous)
        second, _, stats["box+fix"] = trainer.loss(logits, iou, targets, multimask=False)
    else:
        extra = int(rng.integers(0, 2))
        pts = np.stack([positives[:, 0]] + [negatives() for _ in range(extra)], 1)
        labels = np.tile(np.array([1.0] + [0.0] * extra, np.float32), (count, 1))
        logits, iou = trainer.decode(features, owners, pts, labels, boxes)
        first, _, stats["box+points"] = trainer.loss(logits, iou, targets, multimask=False)
        n_pos, n_neg = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        pts = [np.stack([sample_in(rng, m) for m in targets_np]) for _ in range(n_pos)]
        pts += [negatives() for _ in range(n_neg)]
        labels = np.tile(np.array([1.0] * n_pos + [0.0] * n_neg, np.float32), (count, 1))
        logits, iou = trainer.decode(features, owners, np.stack(pts, 1), labels)
        second, _, stats["points"] = trainer.loss(logits, iou, targets, multimask=False)
    return first + second, stats


def trainable_parameters(model) -> list:
    """The torch parameters of all three SAM parts.

    ``SAMBackbone.trainable_variables`` leaves out the mask decoder's, so the
    parts are asked one by one (and shared variables counted once).
    """
    backbone = model.backbone
    seen, params = set(), []
    for part in (backbone.image_encoder, backbone.prompt_encoder, backbone.mask_decoder):
        for variable in part.trainable_variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                params.append(variable.value)
    return params


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = dataclasses.replace(ARCHITECTURE, input_size=args.input_size, patch_size=args.patch_size)
    if args.init:
        # Continue from an earlier preset (a second stage with its own schedule).
        from sam_backend.sam.presets import load_segmenter

        model = load_segmenter(args.init)
        size = int(model.backbone.image_encoder.input.shape[1])
    else:
        model = build_sam(arch, args.seed)
        size = arch.input_size
    params = trainable_parameters(model)
    count = sum(p.numel() for p in params)
    logger.info("Model: %.2f M parameters, %d px input; %d steps of %d images", count / 1e6, size, args.steps, args.images)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    trainer = Trainer(model, size, args.focal_weight, args.bce_weight)
    encoder = model.backbone.image_encoder
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(args.steps):
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = make_batch(rng, args.images, args.objects, size)
        loss, stats = train_step(trainer, rng, batch, encoder, STEP_KINDS[step % len(STEP_KINDS)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        stats["loss"] = loss.item()
        for key, value in stats.items():
            running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            logger.info(
                "step %d/%d  lr %.2e  %s  %.2f s/step  elapsed %s  eta %s",
                step + 1,
                args.steps,
                lr,
                "  ".join(f"{k} {v:.3f}" for k, v in running.items()),
                elapsed / (step + 1),
                _clock(elapsed),
                _clock(eta),
            )
    save(model, Path(args.output))
    logger.info("Trained in %s; saved to %s", _clock(time.perf_counter() - started), args.output)


def save(model, output: Path) -> None:
    """``save_to_preset``, replacing an earlier preset in the same directory."""
    output.mkdir(parents=True, exist_ok=True)
    for stale in ("config.json", "model.weights.h5", "metadata.json", "task.json"):
        (output / stale).unlink(missing_ok=True)
    model.save_to_preset(str(output))
    for weights in output.glob("*.weights.h5"):
        store_as_float16(weights)


def store_as_float16(path: Path) -> None:
    """Rewrite a keras weights file with float16 arrays, halving the shipped preset.

    keras casts each array to its variable's dtype when loading, so the model
    still runs in float32; the rounding moves logits by about 1e-3.
    """
    import h5py

    compact = path.with_suffix(".tmp")
    with h5py.File(path, "r") as source, h5py.File(compact, "w") as target:
        target.attrs.update(dict(source.attrs))

        def copy(name, item):
            if isinstance(item, h5py.Group):
                target.require_group(name).attrs.update(dict(item.attrs))
                return
            data = item[()]
            if getattr(data, "dtype", None) == np.float32:
                data = data.astype(np.float16)
            target.create_dataset(name, data=data)
            target[name].attrs.update(dict(item.attrs))

        source.visititems(copy)
    compact.replace(path)


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="preset directory to write")
    parser.add_argument("--input-size", type=int, default=ARCHITECTURE.input_size)
    parser.add_argument("--patch-size", type=int, default=ARCHITECTURE.patch_size)
    parser.add_argument("--init", help="start from this preset's weights instead of random ones")
    parser.add_argument("--steps", type=int, default=4200)
    parser.add_argument("--images", type=int, default=4, help="images per step")
    parser.add_argument("--objects", type=int, default=4, help="objects per image per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--focal-weight", type=float, default=0.0, help="SAM's focal loss weight")
    parser.add_argument("--bce-weight", type=float, default=1.0, help="plain cross-entropy weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    train(parse_args())
