"""Fine-tuning SAM's prompt encoder and mask decoder on a project's annotated images, and scoring the result.

The image encoder stays frozen: its embeddings (from the embedding store) are
the inputs, so a training step costs only the decoder's forward and backward
passes, tens of milliseconds. Each step takes a batch of annotated objects
and plays SAM's interactive training on them (:mod:`.prompts`): a first
prompt (one positive point, or a jittered box, in turn), then corrective
points from the error region with the previous logits as ``mask_input``,
under SAM's loss (:mod:`.objective`).

:func:`evaluate` scores a decoder the way the server serves it: one click at
each held-out object's most interior pixel, and its tight box, through
:meth:`SamEngine.decode`, IoU against the true mask at the image's size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from sam_backend.env import env_number
from sam_backend.learning.objective import SamObjective
from sam_backend.learning.prompts import corrective_points, jittered_box, sample_in
from sam_backend.sam.engine import Embedding, SamEngine
from sam_backend.sam.synthetic import bounding_box, interior_point, iou

logger = logging.getLogger(__name__)


@dataclass
class AnnotatedImage:
    """An image's embedding and the true masks of its annotated objects.

    Attributes:
        task_id: the Label Studio task (for logs and the held-out split).
        embedding: from the embedding store or the encoder.
        masks: ``(H, W)`` bool masks at the image's size, one per object.
    """

    task_id: int
    embedding: Embedding
    masks: list[np.ndarray]


@dataclass
class Scores:
    """Held-out IoU of a decoder: mean over objects, for one click and for the tight box.

    Example:
        >>> Scores(click=0.7, box=0.9, objects=12).mean
        0.8
    """

    click: float
    box: float
    objects: int

    @property
    def mean(self) -> float:
        """What the gate compares: the mean of the click and box IoUs."""
        return round((self.click + self.box) / 2, 6)

    def as_dict(self) -> dict:
        return {"click_iou": round(self.click, 4), "box_iou": round(self.box, 4), "mean_iou": round(self.mean, 4),
                "objects": self.objects}


@dataclass
class TuneSettings:
    """How a version is trained.

    Attributes:
        steps: optimizer steps (``SAM_TRAIN_STEPS``, default 120).
        batch: objects per step (``SAM_TRAIN_BATCH``, default 4).
        learning_rate: AdamW's peak rate (``SAM_TRAIN_LR``, default 3e-4), reached after a 10 %
            warm-up and decayed along a cosine.
        rounds: corrective rounds after the first prompt, as SAM trains (``SAM_TRAIN_ROUNDS``, default 1).

    The defaults fit a ViT-B decoder's training on 40 annotated images into
    about five minutes of two CPU cores (``bench/learning.py``): each object
    prompt costs a full-resolution decode forward and backward, so steps x
    batch x (1 + rounds) is the cost. On the benchmark's domain they gain as
    much held-out IoU as 300 steps of 8 objects with two rounds did.
        max_seconds: stop early after this long (``SAM_TRAIN_MAX_SECONDS``, default 600).
        seed: for the prompts and the batches: the same data gives the same version.
    """

    steps: int = 120
    batch: int = 4
    learning_rate: float = 3e-4
    rounds: int = 1
    max_seconds: float = 600.0
    seed: int = 0

    @classmethod
    def from_env(cls) -> "TuneSettings":
        """The defaults, overridden by ``SAM_TRAIN_STEPS``, ``SAM_TRAIN_BATCH``, ``SAM_TRAIN_LR``,
        ``SAM_TRAIN_ROUNDS``, ``SAM_TRAIN_MAX_SECONDS`` (a malformed one is logged and its default used)."""
        return cls(
            steps=max(1, int(env_number("SAM_TRAIN_STEPS", cls.steps))),
            batch=max(1, int(env_number("SAM_TRAIN_BATCH", cls.batch))),
            learning_rate=env_number("SAM_TRAIN_LR", cls.learning_rate),
            rounds=max(0, int(env_number("SAM_TRAIN_ROUNDS", cls.rounds))),
            max_seconds=env_number("SAM_TRAIN_MAX_SECONDS", cls.max_seconds),
        )


@dataclass
class TuneReport:
    """What a training run did."""

    steps: int = 0
    seconds: float = 0.0
    objects: int = 0
    losses: list[float] = field(default_factory=list)
    stopped: str | None = None


class Interrupted(Exception):
    """The training was asked to stop (shutdown); nothing is saved."""


def evaluate(engine: SamEngine, images: list[AnnotatedImage]) -> Scores:
    """Held-out IoU of ``engine``'s decoder: a click at each object's most interior pixel, and its tight box.

    Example:
        >>> evaluate(engine, held_out).mean  # doctest: +SKIP
        0.74
    """
    clicks, boxes = [], []
    for image in images:
        for mask in image.masks:
            x, y = interior_point(mask)
            clicked = engine.decode_uncounted(image.embedding, np.array([[x + 0.5, y + 0.5]], np.float32),
                                              np.ones(1, np.float32), None)
            clicks.append(iou(clicked.mask, mask))
            boxed = engine.decode_uncounted(image.embedding, np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                                            bounding_box(mask))
            boxes.append(iou(boxed.mask, mask))
    if not clicks:
        return Scores(0.0, 0.0, 0)
    return Scores(float(np.mean(clicks)), float(np.mean(boxes)), len(clicks))


class DecoderTuner:
    """Trains a copy of an engine's prompt encoder and mask decoder on annotated images.

    Args:
        engine: the engine to start from (the preset, or the project's current version).
        settings: steps, batch, rate...

    Example:
        >>> tuned, report = DecoderTuner(engine, TuneSettings(steps=200)).fit(train_images)  # doctest: +SKIP
        >>> evaluate(tuned, held_out).mean > evaluate(engine, held_out).mean  # doctest: +SKIP
        True
    """

    def __init__(self, engine: SamEngine, settings: TuneSettings | None = None):
        self.engine = engine
        self.settings = settings or TuneSettings()
        self.objective = SamObjective()

    def fit(self, images: list[AnnotatedImage], should_stop: Callable[[], bool] | None = None):
        """A new engine (a decoder copy) trained on ``images``, and a :class:`TuneReport`.

        Raises:
            ValueError: no object to train on.
            Interrupted: ``should_stop`` said so.
        """
        import torch

        settings = self.settings
        started = time.perf_counter()
        features, owners, targets = self._targets(images)
        if not len(owners):
            raise ValueError("no annotated object to train on")
        targets = targets.to(features.device)  # the embeddings' device: a GPU where the model runs on one
        tuned = self.engine.with_decoder()
        params = tuned.decoder_parameters()
        decay = [p for p in params if p.ndim >= 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=settings.learning_rate,
        )
        rng = np.random.default_rng(settings.seed)
        torch.manual_seed(settings.seed)
        report = TuneReport(objects=len(owners))
        warmup = max(1, settings.steps // 10)
        for step in range(settings.steps):
            if should_stop is not None and should_stop():
                raise Interrupted("asked to stop")
            if time.perf_counter() - started > settings.max_seconds:
                report.stopped = f"the time limit ({settings.max_seconds:.0f}s) after {step} steps"
                break
            rate = settings.learning_rate * (
                (step + 1) / warmup if step < warmup
                else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))
            )
            for group in optimizer.param_groups:
                group["lr"] = rate
            chosen = rng.choice(len(owners), size=min(settings.batch, len(owners)), replace=False)
            loss = self._step(tuned, rng, features[owners[chosen]], targets[chosen], box=step % 2 == 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            report.losses.append(float(loss.item()))
            report.steps = step + 1
        report.seconds = time.perf_counter() - started
        logger.info("Trained %d step(s) on %d object(s) in %.1fs; loss %.3f -> %.3f", report.steps, report.objects,
                    report.seconds, _mean(report.losses[:10]), _mean(report.losses[-10:]))
        return tuned, report

    def _targets(self, images: list[AnnotatedImage]):
        """Features ``(N, h, w, C)``, each object's image index, and its low-resolution target ``(P, L, L)`` in [0, 1].

        Targets are the true masks brought into the model frame (longest-side
        resize, bottom/right padding) at the decoder's output resolution, as
        area averages, so soft at the borders.
        """
        import torch

        size, low = self.engine.input_size, self.engine.mask_input_size
        owners, targets = [], []
        for index, image in enumerate(images):
            frame = image.embedding.frame
            height, width = (round(d * low[0] / size) for d in frame.resized_size)
            for mask in image.masks:
                small = Image.fromarray(mask.astype(np.float32)).resize((max(1, width), max(1, height)),
                                                                         Image.Resampling.BOX)
                target = np.zeros(low, np.float32)
                target[:height, :width] = np.asarray(small)
                if (target > 0.5).any():  # an object too small to see at this resolution teaches nothing
                    owners.append(index)
                    targets.append(target)
        features = torch.cat([image.embedding.features.float() for image in images]).clone() if images else None
        return features, np.array(owners, dtype=np.int64), torch.as_tensor(np.stack(targets)) if targets else None

    def _step(self, tuned: SamEngine, rng: np.random.Generator, features, targets, box: bool):
        """One step's loss: a first prompt (a click, or a box when ``box``), then the corrective rounds."""
        low = targets.shape[-1]
        scale = tuned.input_size / low  # low-resolution pixels to model-frame pixels
        truths = (targets > 0.5).cpu().numpy()
        count = len(truths)
        if box:
            boxes = np.stack([jittered_box(rng, t, low) for t in truths])[:, None] * scale
            points, labels = np.zeros((count, 0, 2), np.float32), np.zeros((count, 0), np.float32)
        else:
            boxes = None
            points = np.stack([sample_in(rng, t) for t in truths])[:, None] * scale
            labels = np.ones((count, 1), np.float32)
        logits, iou_pred = tuned.decode_tensors(features, points, labels, boxes)
        step = self.objective(logits, iou_pred, targets, multimask=not box)
        total = step.loss
        for _ in range(self.settings.rounds):
            extra, extra_labels = corrective_points(rng, (step.logits > 0).cpu().numpy(), truths)
            points = np.concatenate([points, extra * scale], 1)
            labels = np.concatenate([labels, extra_labels], 1)
            logits, iou_pred = tuned.decode_tensors(features, points, labels, boxes, step.logits)
            step = self.objective(logits, iou_pred, targets, multimask=False)
            total = total + step.loss
        return total


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
