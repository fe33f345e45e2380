"""A task's submitted annotation as object masks: what project training learns from.

Label Studio stores an annotator's objects as brush regions (``brushlabels``,
run-length encoded) or polygons (``polygonlabels``, percent coordinates). Here
each becomes an ``(H, W)`` boolean mask at the size of the image the backend
fetched, with its label. Regions that cannot be read are not silently
dropped: they come back with the reason, to be counted and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from sam_backend.errors import BadRequestError
from sam_backend.labelstudio.polygons import percent_to_polygon

logger = logging.getLogger(__name__)

#: Region types that outline an object, and so can teach a mask.
MASK_REGION_TYPES = ("brushlabels", "polygonlabels")


@dataclass
class ObjectMask:
    """One annotated object.

    Attributes:
        mask: ``(H, W)`` bool at the fetched image's size.
        label: the region's first label (None without one).
        region_id: the region's ``id`` in the annotation.
    """

    mask: np.ndarray
    label: str | None
    region_id: str | None


@dataclass
class AnnotatedMasks:
    """The objects of one annotation, and the regions that could not be used with why."""

    objects: list[ObjectMask] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def chosen_annotation(task: dict) -> dict | None:
    """The annotation to learn from: the ground truth if marked, else the latest one not cancelled.

    Example:
        >>> chosen_annotation({"annotations": [{"id": 1, "result": []}, {"id": 2, "was_cancelled": True}]})["id"]
        1
    """
    annotations = [a for a in task.get("annotations") or []
                   if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list)]
    if not annotations:
        return None
    truths = [a for a in annotations if a.get("ground_truth")]
    pool = truths or annotations
    return max(pool, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def annotation_masks(result: list, image_size: tuple[int, int]) -> AnnotatedMasks:
    """Every brush and polygon region of an annotation's ``result`` as an :class:`ObjectMask`.

    Args:
        result: the annotation's ``result`` list.
        image_size: ``(height, width)`` of the fetched image; regions drawn on
            a display of another size are scaled to it.

    Example:
        >>> region = {"type": "polygonlabels", "original_width": 4, "original_height": 4,
        ...           "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["A"]}}
        >>> annotation_masks([region], (4, 4)).objects[0].mask.sum()
        np.int64(9)
    """
    found = AnnotatedMasks()
    for region in result:
        if not isinstance(region, dict) or region.get("type") not in MASK_REGION_TYPES:
            continue
        try:
            mask = region_mask(region, image_size)
        except BadRequestError as exc:
            found.unreadable.append(f"region {region.get('id')}: {exc}")
            continue
        if not mask.any():
            found.unreadable.append(f"region {region.get('id')}: its mask is empty")
            continue
        labels = (region.get("value") or {}).get(region["type"]) or []
        found.objects.append(ObjectMask(mask, labels[0] if labels else None, region.get("id")))
    return found


def region_mask(region: dict, image_size: tuple[int, int]) -> np.ndarray:
    """One brush or polygon region as an ``(H, W)`` bool mask at ``image_size``.

    Raises:
        BadRequestError: the region's RLE or points cannot be decoded.
    """
    height, width = image_size
    value = region.get("value")
    if not isinstance(value, dict):
        raise BadRequestError("the region has no value")
    if region.get("type") == "brushlabels":
        return _brush_mask(region, value, image_size)
    points = percent_to_polygon(value.get("points"), width, height)
    if len(points) < 3:
        raise BadRequestError(f"a polygon needs 3 points; it has {len(points)}")
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=255, outline=255)
    return np.asarray(canvas) > 127


def _brush_mask(region: dict, value: dict, image_size: tuple[int, int]) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list) or not value["rle"]:
        raise BadRequestError("a brush region without an RLE mask")
    try:
        width, height = int(region["original_width"]), int(region["original_height"])
    except (KeyError, TypeError, ValueError):
        raise BadRequestError("a brush region without original_width and original_height") from None
    try:
        flat = decode_rle(value["rle"])
    except Exception as exc:  # the SDK's bit reader fails in many ways on a corrupt list
        raise BadRequestError(f"its RLE cannot be decoded ({type(exc).__name__})") from None
    if flat.size != width * height * 4:
        raise BadRequestError(f"its RLE holds {flat.size} values, not {width}x{height}x4")
    mask = flat.reshape(height, width, 4)[:, :, 3] > 127
    if (height, width) != tuple(image_size):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(image_size[::-1], Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 127
    return mask
