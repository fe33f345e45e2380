"""Automatic masks for a whole image, in the manner of SAM's automatic mask generator.

A grid of single-point prompts is decoded in batches against one embedding;
candidates are kept when SAM's predicted IoU and their stability score are
high, duplicates are removed by non-maximum suppression on their boxes, and
small islands and holes are cleaned away. Only the prompt encoder and mask
decoder run per point, so a whole image costs one encode plus milliseconds
per batch.

Unlike Meta's generator, scores, boxes and stability are computed on the
decoder's low-resolution logits (256 px for a 1024 px model) rather than on
full-size masks: on a CPU that is what keeps a 32x32 grid (3072 candidates)
cheap. Only the masks that survive are brought to the original size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

import numpy as np

from sam_backend.errors import BadRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoMaskSettings:
    """How automatic masks are generated; defaults are SAM's where it has one.

    Attributes:
        points_per_side: the grid is ``n x n`` points; None picks 32 for
            models with a 1024 px input (SAM's default) and 16 for smaller ones.
        points_per_batch: prompts decoded together.
        pred_iou_thresh: drop masks whose predicted IoU is lower.
        stability_score_thresh: drop masks whose stability score is lower.
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which the lower-scored of two masks is a duplicate.
        min_region_area: islands and holes smaller than this many pixels (of
            the original image) are removed and filled (0: keep them).
        min_area, max_area: keep masks covering this fraction of the image
            (``max_area`` drops "the whole background" masks).
        max_masks: keep at most this many, best first.

    Example:
        >>> AutoMaskSettings.from_mapping({"points_per_side": "8", "max_area": 0.5}).points_per_side
        8
    """

    points_per_side: int | None = None
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_region_area: int = 100
    min_area: float = 0.0
    max_area: float = 0.95
    max_masks: int = 100

    def grid_size(self, input_size: int) -> int:
        """Points per side for a model of ``input_size``."""
        if self.points_per_side is not None:
            return self.points_per_side
        return 32 if input_size >= 1024 else 16

    @classmethod
    def from_mapping(cls, values: dict, base: "AutoMaskSettings | None" = None) -> "AutoMaskSettings":
        """Settings from strings or numbers (environment, ``extra_params``), on top of ``base``.

        Unknown keys are ignored; a value of the wrong kind raises.

        Raises:
            BadRequestError: a value that is not a number, or out of range.
        """
        base = base or cls()
        changes = {}
        for spec in fields(cls):
            if spec.name not in values or values[spec.name] in (None, ""):
                continue
            raw = values[spec.name]
            kind = int if spec.name in ("points_per_side", "points_per_batch", "min_region_area", "max_masks") else float
            try:
                changes[spec.name] = kind(raw)
            except (TypeError, ValueError):
                raise BadRequestError(f"Automatic mask setting {spec.name} must be a number; got {raw!r}.") from None
        settings = replace(base, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`BadRequestError` for settings that cannot work."""
        if self.points_per_side is not None and not 1 <= self.points_per_side <= 128:
            raise BadRequestError("points_per_side must be between 1 and 128.")
        if self.points_per_batch < 1:
            raise BadRequestError("points_per_batch must be at least 1.")
        if not 0.0 <= self.min_area <= self.max_area <= 1.0:
            raise BadRequestError("min_area and max_area are fractions of the image with min_area <= max_area.")
        if self.max_masks < 1:
            raise BadRequestError("max_masks must be at least 1.")


@dataclass
class AutoMask:
    """One automatically found object.

    Attributes:
        mask: ``(H, W)`` bool at the original image size.
        score: SAM's predicted IoU.
        stability: the stability score.
        box: ``[x0, y0, x1, y1]`` in original pixels.
        point: the grid point ``[x, y]`` that produced it.
    """

    mask: np.ndarray
    score: float
    stability: float
    box: list[float]
    point: list[float]

    @property
    def area(self) -> int:
        """Pixels in the mask."""
        return int(self.mask.sum())


def point_grid(n: int, size: tuple[int, int]) -> np.ndarray:
    """``n x n`` points at cell centres of an image of ``(height, width)``, ``(n*n, 2)`` x/y pixels."""
    offsets = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs, ys = np.meshgrid(offsets * size[1], offsets * size[0])
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def stability_scores(logits, threshold: float, offset: float):
    """IoU between the masks thresholded at ``threshold + offset`` and ``threshold - offset``.

    ``logits`` is an ``(N, h, w)`` torch tensor; a mask that barely changes
    when the threshold moves is stable.
    """
    high = (logits > threshold + offset).flatten(1).sum(1)
    low = (logits > threshold - offset).flatten(1).sum(1)
    return high.float() / low.clamp(min=1).float()


def masks_to_boxes(masks) -> np.ndarray:
    """``(N, h, w)`` bool torch masks -> ``(N, 4)`` ``x0, y0, x1, y1`` (exclusive ends); zeros when empty."""
    import torch

    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, 4), np.float32)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ys, h).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x0 = torch.where(cols, xs, w).min(dim=1).values
    x1 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0
    return boxes.cpu().numpy()


def box_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    suppressed = np.zeros(len(boxes), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        x0 = np.maximum(boxes[i, 0], boxes[:, 0])
        y0 = np.maximum(boxes[i, 1], boxes[:, 1])
        x1 = np.minimum(boxes[i, 2], boxes[:, 2])
        y1 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        iou = inter / np.maximum(areas[i] + areas - inter, 1e-9)
        suppressed |= iou > threshold
    return keep


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and drop islands smaller than ``min_area`` pixels (SAM's post-processing)."""
    if min_area <= 0:
        return mask
    import cv2

    cleaned = mask.copy()
    for fill, source in ((True, ~mask), (False, mask)):  # holes first, then islands
        count, labels, stats, _ = cv2.connectedComponentsWithStats(source.astype(np.uint8), connectivity=8)
        small = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] < min_area]
        if small:
            cleaned[np.isin(labels, small)] = fill
    return cleaned


class AutoMaskGenerator:
    """Find every object in an image with one embedding and a grid of point prompts.

    Args:
        engine: a :class:`~sam_backend.sam.engine.SamEngine`.
        settings: :class:`AutoMaskSettings`.

    Example:
        >>> generator = AutoMaskGenerator(engine, AutoMaskSettings(points_per_side=16))  # doctest: +SKIP
        >>> masks = generator.generate(engine.encode(image))  # doctest: +SKIP
        >>> [(m.area, round(m.score, 2)) for m in masks][:2]  # doctest: +SKIP
        [(5120, 0.97), (1834, 0.95)]
    """

    def __init__(self, engine, settings: AutoMaskSettings | None = None):
        self.engine = engine
        self.settings = settings or AutoMaskSettings()
        self.settings.validate()

    def generate(self, embedding) -> list[AutoMask]:
        """Masks of ``embedding``'s image, best predicted IoU first."""
        import torch

        from sam_backend.sam.transforms import postprocess_logits

        s = self.settings
        frame = embedding.frame
        height, width = frame.original_size
        grid = point_grid(s.grid_size(self.engine.input_size), frame.original_size)
        low_res = self.engine.mask_input_size
        # The part of the low-resolution logits that covers the image, not the padding.
        valid = (
            max(1, math.ceil(frame.resized_size[0] * low_res[0] / frame.input_size)),
            max(1, math.ceil(frame.resized_size[1] * low_res[1] / frame.input_size)),
        )
        kept_logits, kept_scores, kept_stability, kept_points = [], [], [], []
        for start in range(0, len(grid), s.points_per_batch):
            points = grid[start : start + s.points_per_batch]
            model_points = frame.to_model(points)[:, None, :]
            logits, iou = self.engine.decode_batch(
                embedding.features, model_points, np.ones((len(points), 1), np.float32)
            )
            # SAM's three multimask outputs per point; output 0 is the single-mask one.
            logits = logits[:, 1:].flatten(0, 1)
            iou = iou[:, 1:].flatten()
            stability = stability_scores(logits[:, : valid[0], : valid[1]], 0.0, s.stability_score_offset)
            keep = (iou > s.pred_iou_thresh) & (stability >= s.stability_score_thresh)
            if keep.any():
                kept_logits.append(logits[keep])
                kept_scores.append(iou[keep])
                kept_stability.append(stability[keep])
                kept_points.append(np.repeat(points, 3, axis=0)[keep.cpu().numpy()])
        if not kept_logits:
            logger.info("Automatic masks: none of %d grid points gave a confident, stable mask", len(grid))
            return []
        logits = torch.cat(kept_logits)
        scores = torch.cat(kept_scores).cpu().numpy()
        stability = torch.cat(kept_stability).cpu().numpy()
        points = np.concatenate(kept_points)

        # Duplicates: many grid points land on the same object.
        scale = np.array([width / valid[1], height / valid[0]] * 2, np.float32)
        boxes = masks_to_boxes(logits[:, : valid[0], : valid[1]] > 0.0) * scale
        order = box_nms(boxes, scores, s.box_nms_thresh)
        candidates = len(scores)

        results: list[AutoMask] = []
        total = float(height * width)
        for start in range(0, len(order), s.points_per_batch):
            chunk = order[start : start + s.points_per_batch]
            with torch.inference_mode():
                masks = (postprocess_logits(logits[chunk], frame) > 0.0).cpu().numpy()
            for index, mask in zip(chunk, masks):
                mask = remove_small_regions(mask, s.min_region_area)
                area = mask.sum() / total
                if area == 0 or area < s.min_area or area > s.max_area:
                    continue
                ys, xs = np.nonzero(mask)
                results.append(
                    AutoMask(
                        mask=mask,
                        score=float(scores[index]),
                        stability=float(stability[index]),
                        box=[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                        point=[float(v) for v in points[index]],
                    )
                )
        if results:
            # Again on the final masks: cleaning and upsampling change boxes, and
            # duplicates that differed only by a stray island now coincide.
            final = box_nms(np.array([m.box for m in results], np.float32),
                            np.array([m.score for m in results], np.float32), s.box_nms_thresh)
            results = [results[i] for i in final][: s.max_masks]
        logger.info(
            "Automatic masks: %d grid points, %d confident and stable candidates, %d kept",
            len(grid), candidates, len(results),
        )
        return results
