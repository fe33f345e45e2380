"""Masks as Label Studio polygon regions: outlines of the mask's parts, simplified, in percent.

Projects that annotate with ``<PolygonLabels>`` (editable vertices, COCO
polygons) want SAM's masks as polygons rather than brush RLE. Each connected
part of a mask becomes one closed polygon: its outer outline (OpenCV's
``findContours`` with ``RETR_EXTERNAL``), simplified with ``approxPolyDP`` to
within a tolerance in pixels of the image. Label Studio polygons have no holes,
so a hole in a mask is filled.

Pixel convention: Label Studio draws the image over ``[0, width] x [0,
height]`` and pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``; a point at
``x%`` is at ``x * width / 100`` in that space. Tracing the centres of a
mask's edge pixels would shrink every polygon by half a pixel all round (15 %
of a 10 px wide shape), so the outline traced here runs along the pixel
corners: the contour of the "corner lattice" (a corner is in when one of the
four pixels around it is). A rectangle of pixels comes back exactly; a
smooth shape keeps its area. Parts only 1 px apart merge into one polygon.

Numpy arrays in, plain dicts out: no tensors (this is the ``labelstudio``
layer).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, fields, replace
from typing import Mapping

import numpy as np

from sam_backend.errors import BadRequestError
from sam_backend.labelstudio.labelconfig import LabelConfig
from sam_backend.labelstudio.regions import control_label_for

logger = logging.getLogger(__name__)

#: Decimals kept in percent coordinates: 1e-4 % is 0.01 px of a 10,000 px image.
PERCENT_DECIMALS = 4


@dataclass(frozen=True)
class PolygonSettings:
    """How masks become polygons.

    Attributes:
        tolerance: how far (in pixels of the image) the simplified polygon may
            stray from the mask's outline; 0 keeps every corner. At 1 px a smooth
            shape 80 px across keeps an IoU above 0.98 with a few dozen vertices.
        min_area: parts smaller than this many pixels are dropped (SAM's
            specks and islands).
        max_parts: keep at most this many parts, largest first; 0 keeps all,
            1 the largest only.

    Example:
        >>> PolygonSettings.from_mapping({"tolerance": "2", "max_parts": 1})
        PolygonSettings(tolerance=2.0, min_area=10.0, max_parts=1)
    """

    tolerance: float = 1.0
    min_area: float = 10.0
    max_parts: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping, base: "PolygonSettings | None" = None) -> "PolygonSettings":
        """Settings from strings or numbers (environment, ``extra_params``), on top of ``base``.

        Keys are the field names; unknown keys are ignored, empty values keep ``base``.

        Raises:
            BadRequestError: a value that is not a number, or out of range.
        """
        base = base or cls()
        changes = {}
        for spec in fields(cls):
            raw = values.get(spec.name)
            if raw is None or raw == "":
                continue
            whole = spec.name == "max_parts"
            try:
                number = float(raw)
            except (TypeError, ValueError):
                number = None
            if number is None or (whole and not number.is_integer()):
                raise BadRequestError(
                    f"Polygon setting {spec.name} must be {'a whole number' if whole else 'a number'}; got {raw!r}."
                )
            if not np.isfinite(number) or number < 0:
                raise BadRequestError(f"Polygon setting {spec.name} must be 0 or more; got {raw!r}.")
            changes[spec.name] = int(number) if whole else number
        return replace(base, **changes)


def mask_to_polygons(mask: np.ndarray, settings: PolygonSettings | None = None) -> list[np.ndarray]:
    """The outer outlines of a mask's parts, simplified, largest first.

    Args:
        mask: ``(H, W)`` bool (or 0/1) mask.
        settings: tolerance, minimum area and number of parts.

    Returns:
        One ``(N, 2)`` float array of ``(x, y)`` per part, ``N >= 3``, in the
        image's continuous pixel coordinates (pixel corners, see the module
        docstring). Holes are filled; parts smaller than ``settings.min_area``
        and parts that simplify to fewer than 3 points or no area are left out.

    Raises:
        ValueError: the mask is not two-dimensional.

    Example:
        >>> mask = np.zeros((5, 8), bool); mask[1:4, 2:6] = True  # rows 1-3, columns 2-5
        >>> mask_to_polygons(mask)[0].tolist()
        [[2.0, 1.0], [2.0, 4.0], [6.0, 4.0], [6.0, 1.0]]
    """
    return _outlines(mask, settings or PolygonSettings())[0]


def _outlines(mask: np.ndarray, settings: PolygonSettings) -> tuple[list[np.ndarray], int]:
    """``(polygons, parts found)``: the polygons kept and how many parts the mask had."""
    import cv2  # 0.3 s to import: only where polygons are made (the server imports it at warm-up)

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"A mask must be two-dimensional (height, width); got shape {mask.shape}.")
    pixels = mask.astype(bool, copy=False).view(np.uint8)
    height, width = pixels.shape
    # Corner (x, y) is in when one of the four pixels that meet there is: the
    # contour of this lattice runs along the pixel edges, not their centres.
    corners = np.zeros((height + 1, width + 1), np.uint8)
    corners[:-1, :-1] |= pixels
    corners[:-1, 1:] |= pixels
    corners[1:, :-1] |= pixels
    corners[1:, 1:] |= pixels
    contours, _ = cv2.findContours(corners, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    kept = []
    for contour in contours:
        area = cv2.contourArea(contour)
        if area <= 0 or area < settings.min_area:
            logger.debug("Polygon part of %g px dropped (min_area %g px)", area, settings.min_area)
            continue
        simple = cv2.approxPolyDP(contour, settings.tolerance, True) if settings.tolerance > 0 else contour
        if len(simple) < 3 or cv2.contourArea(simple) <= 0:
            logger.debug("Polygon part of %g px dropped: degenerate after simplification", area)
            continue
        kept.append((area, simple[:, 0, :].astype(np.float64)))
    kept.sort(key=lambda item: -item[0])
    if settings.max_parts:
        kept = kept[: settings.max_parts]
    return [points for _, points in kept], len(contours)


def polygon_to_percent(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel coordinates ``(N, 2)`` -> Label Studio's ``[[x%, y%], ...]`` of a ``width`` x ``height`` image.

    Example:
        >>> polygon_to_percent(np.array([[0, 0], [200, 50], [50, 100]]), 200, 100)
        [[0.0, 0.0], [100.0, 50.0], [25.0, 100.0]]
    """
    scale = np.array([100.0 / width, 100.0 / height])
    return np.round(np.asarray(points, np.float64) * scale, PERCENT_DECIMALS).tolist()


def percent_to_polygon(points, width: int, height: int) -> np.ndarray:
    """Label Studio's ``[[x%, y%], ...]`` -> ``(N, 2)`` pixel coordinates (the inverse of :func:`polygon_to_percent`).

    Raises:
        BadRequestError: the points are not a list of ``[x, y]`` numbers.

    Example:
        >>> percent_to_polygon([[0, 0], [100, 50]], 200, 100).tolist()
        [[0.0, 0.0], [200.0, 50.0]]
    """
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRequestError("Polygon points must be a list of [x, y] percentages.") from None
    if array.ndim != 2 or array.shape[1] != 2:
        raise BadRequestError(f"Polygon points must be a list of [x, y] percentages; got shape {array.shape}.")
    return array * np.array([width / 100.0, height / 100.0])


def polygon_label_for(label: str | None, config: LabelConfig) -> str:
    """The polygon label for a mask: the clicked region's label when the polygon control has it, else its first."""
    return control_label_for(label, config.polygon_labels, config.polygon_name)


def mask_to_polygon_regions(
    mask: np.ndarray,
    label: str,
    score: float,
    config: LabelConfig,
    settings: PolygonSettings | None = None,
    image_rotation: float = 0,
) -> list[dict]:
    """A boolean ``(H, W)`` mask as Label Studio polygon regions, one per part, same label and score.

    Points are percent of the mask's image (the image as displayed: EXIF
    orientation applied), ``original_width``/``original_height`` its size.
    An empty mask, or one whose parts are all too small, gives no region and
    a log line saying why.

    Args:
        mask: ``(H, W)`` bool mask at the size Label Studio reported.
        label: the polygon label (see :func:`polygon_label_for`).
        score: SAM's predicted IoU.
        config: the parsed label config (it has a polygon control).
        settings: tolerance, minimum area, number of parts.
        image_rotation: as Label Studio sent it with the prompt.

    Example:
        >>> cfg = LabelConfig("image", "image", None, (), (), (), "poly", ("Cat",))
        >>> mask = np.zeros((100, 200), bool); mask[10:60, 50:150] = True
        >>> (region,) = mask_to_polygon_regions(mask, "Cat", 0.9, cfg)
        >>> region["type"], region["value"]["points"], region["value"]["closed"]
        ('polygonlabels', [[25.0, 10.0], [25.0, 60.0], [75.0, 60.0], [75.0, 10.0]], True)
    """
    settings = settings or PolygonSettings()
    height, width = np.shape(mask)
    polygons, found = _outlines(mask, settings)
    if not polygons:
        if not found:
            logger.info("The mask is empty: no polygon region.")
        else:
            logger.info(
                "No polygon region: the mask's %d part(s) are smaller than %g px (polygon_min_area) "
                "or degenerate after simplification (polygon_tolerance %g px).",
                found, settings.min_area, settings.tolerance,
            )
        return []
    return [
        {
            "id": uuid.uuid4().hex[:10],
            "from_name": config.polygon_name,
            "to_name": config.image_name,
            "type": "polygonlabels",
            "origin": "prediction",
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": image_rotation,
            "value": {"points": polygon_to_percent(points, width, height), "closed": True, "polygonlabels": [label]},
            "score": float(score),
            "readonly": False,
        }
        for points in polygons
    ]
