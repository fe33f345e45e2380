"""From SAM 3's raw detections to the instances an annotator gets: pure post-processing.

keras-hub's SAM 3 stops at per-query logits; what its caller must do (and
Hugging Face's ``post_process_instance_segmentation`` does part of):

1. score = sigmoid(query logit) x sigmoid(presence logit);
2. keep scores above a threshold, best first;
3. drop a mask that overlaps a better one by more than ``nms_iou`` (mask IoU,
   at the decoder's resolution, before any upsampling);
4. keep at most ``max_instances``;
5. bring each mask to the image: bilinear upsampling of the logits to the
   original size (the inverse of SAM 3's square resize), then > 0;
6. fill holes and drop islands smaller than ``min_region_area`` pixels, as
   automatic masks do, and drop what ends up empty.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from sam_backend.sam.automask import remove_small_regions


@dataclass(frozen=True)
class ConceptSettings:
    """How detections become instances.

    Attributes:
        threshold: the least score kept (``SAM_CONCEPT_THRESHOLD``).
        nms_iou: mask IoU above which the lower-scored of two instances is a duplicate.
        max_instances: instances per phrase, best first (``SAM_CONCEPT_MAX_INSTANCES``).
        min_region_area: holes and islands smaller than this many image pixels are
            filled and removed (0: keep them).

    Example:
        >>> ConceptSettings.from_mapping({"threshold": "0.3"}).threshold
        0.3
    """

    threshold: float = 0.5
    nms_iou: float = 0.5
    max_instances: int = 100
    min_region_area: int = 100

    @classmethod
    def from_mapping(cls, values: dict, base: "ConceptSettings | None" = None) -> "ConceptSettings":
        """Settings from strings or numbers (environment, request parameters); unknown keys are ignored.

        Raises:
            ValueError: a value of the wrong kind or out of range, named.
        """
        base = base or cls()
        changes = {}
        for field in fields(cls):
            if values.get(field.name) in (None, ""):
                continue
            kind = int if field.type in ("int", int) else float
            try:
                changes[field.name] = kind(values[field.name])
            except (TypeError, ValueError):
                raise ValueError(f"{field.name} must be a number, not {values[field.name]!r}") from None
        settings = replace(base, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raises ValueError, naming the setting, when one is out of range."""
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), not {self.threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], not {self.nms_iou}")
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be at least 1, not {self.max_instances}")
        if self.min_region_area < 0:
            raise ValueError(f"min_region_area must be 0 or more, not {self.min_region_area}")


@dataclass
class ConceptInstance:
    """One object found for a concept.

    Attributes:
        mask: ``(H, W)`` bool mask at the image's size.
        score: detection score x presence score, in [0, 1].
        box: ``[x0, y0, x1, y1]`` of the detection, in image pixels.
    """

    mask: np.ndarray
    score: float
    box: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def mask_nms(masks: np.ndarray, order: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression on binary masks, visited in ``order``; indices kept."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    areas = flat.sum(axis=1)
    overlaps = flat @ flat.T
    keep: list[int] = []
    for i in order:
        if all(overlaps[i, j] / max(areas[i] + areas[j] - overlaps[i, j], 1e-9) <= iou for j in keep):
            keep.append(int(i))
    return keep


def concept_scores(query_logits: np.ndarray, presence_logit: float) -> np.ndarray:
    """``sigmoid(query) x sigmoid(presence)`` for every query."""
    return (_sigmoid(query_logits) * _sigmoid(presence_logit)).astype(np.float32)


def select_instances(mask_logits: np.ndarray, query_logits: np.ndarray, presence_logit: float,
                     boxes: np.ndarray, original_size: tuple[int, int],
                     settings: ConceptSettings | None = None) -> list[ConceptInstance]:
    """The instances of one prompt on one image, best first.

    Args:
        mask_logits: ``(Q, h, w)`` mask logits at the decoder's resolution.
        query_logits: ``(Q,)`` detection logits.
        presence_logit: the prompt's presence logit (is the concept in the image at all).
        boxes: ``(Q, 4)`` ``[x0, y0, x1, y1]`` boxes normalised to [0, 1].
        original_size: ``(height, width)`` of the image.
        settings: thresholds and caps; default :class:`ConceptSettings`.

    Example:
        >>> logits = np.full((2, 8, 8), -5.0); logits[0, 2:6, 2:6] = 5.0; logits[1, 2:6, 2:7] = 5.0
        >>> found = select_instances(logits, np.array([3.0, 2.0]), 4.0, np.zeros((2, 4)), (16, 16),
        ...                          ConceptSettings(min_region_area=0))
        >>> len(found), int(found[0].mask.sum())
        (1, 64)
    """
    import torch

    settings = settings or ConceptSettings()
    scores = concept_scores(query_logits, presence_logit)
    candidates = np.flatnonzero(scores > settings.threshold)
    if len(candidates) == 0:
        return []
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    low_res = np.asarray(mask_logits, np.float32) > 0
    kept = mask_nms(low_res, order, settings.nms_iou)[: settings.max_instances]
    height, width = original_size
    instances = []
    for index in kept:
        logits = torch.from_numpy(np.ascontiguousarray(mask_logits[index], np.float32))[None, None]
        upsampled = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                    align_corners=False)
        mask = remove_small_regions(upsampled[0, 0].numpy() > 0, settings.min_region_area)
        if not mask.any():
            continue
        box = np.clip(np.asarray(boxes[index], np.float64), 0.0, 1.0) * [width, height, width, height]
        instances.append(ConceptInstance(mask=mask, score=float(scores[index]), box=box.astype(np.float32)))
    return instances
