"""Translation between Label Studio regions and SAM prompts, as pure functions.

Label Studio gives coordinates in percent of the displayed image; SAM wants
pixels. Masks go back as brush regions in label-studio-sdk's RLE (:mod:`.rle`).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from sam_backend.errors import BadRequestError, PromptError
from sam_backend.labelstudio.labelconfig import LabelConfig
from sam_backend.labelstudio.rle import mask_to_rle

logger = logging.getLogger(__name__)

KEYPOINT_TYPES = ("keypointlabels", "keypoint")
RECTANGLE_TYPES = ("rectanglelabels", "rectangle")


@dataclass
class Prompt:
    """A SAM prompt read from Label Studio regions, in pixels of the displayed image.

    Attributes:
        points: ``[[x, y], ...]``.
        labels: 1 (positive) or 0 (negative) per point.
        box: ``[x0, y0, x1, y1]`` or None.
        label: the label of the smart region the annotator drew (the last one), if any.
        original_width, original_height, image_rotation: as Label Studio sent them.
    """

    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: list[float] | None = None
    label: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    image_rotation: float = 0

    def __bool__(self) -> bool:
        return bool(self.points) or self.box is not None


def prompt_from_context(context: dict | None, config: LabelConfig, image_size: tuple[int, int]) -> Prompt:
    """Read ``params.context.result`` into one SAM prompt.

    Keypoints (``is_positive`` true/false -> 1/0, missing -> positive) become
    points; rectangles become the box (the last one wins; a rotated one gives
    its axis-aligned bounding box). Regions of other controls or of other
    images are ignored.

    Args:
        context: Label Studio's ``params.context`` (``{"result": [...]}``).
        config: the parsed label config.
        image_size: ``(height, width)`` of the loaded image: percentages are
            converted to its pixels.

    Raises:
        BadRequestError: the context or a region is malformed.
        PromptError: a rectangle has zero width or height.

    Example:
        >>> from sam_backend.labelstudio.labelconfig import LabelConfig
        >>> cfg = LabelConfig("image", "image", "brush", ("Cat",), ("kp",), ())
        >>> ctx = {"result": [{"from_name": "kp", "to_name": "image", "type": "keypointlabels",
        ...        "original_width": 200, "original_height": 100, "is_positive": True,
        ...        "value": {"x": 50, "y": 25, "keypointlabels": ["Cat"]}}]}
        >>> p = prompt_from_context(ctx, cfg, (100, 200))
        >>> p.points, p.labels, p.label
        ([[100.0, 25.0]], [1], 'Cat')
    """
    prompt = Prompt()
    if not context:
        return prompt
    if not isinstance(context, dict) or not isinstance(context.get("result", []), list):
        raise BadRequestError('params.context must be an object with a "result" list of regions.')
    for region in context.get("result") or []:
        if not isinstance(region, dict):
            raise BadRequestError("Each region in params.context.result must be an object.")
        if region.get("to_name", config.image_name) != config.image_name:
            continue
        kind = str(region.get("type", "")).lower()
        name = region.get("from_name")
        is_keypoint = kind in KEYPOINT_TYPES and (name in config.keypoint_names or not config.keypoint_names and name is None)
        is_rectangle = kind in RECTANGLE_TYPES and (name in config.rectangle_names or not config.rectangle_names and name is None)
        if not (is_keypoint or is_rectangle):
            continue
        prompt.original_width, prompt.original_height = _region_size(region, image_size)
        # Percentages are relative, so they map onto the image as loaded even
        # if Label Studio measured it at another size.
        height, width = image_size
        prompt.image_rotation = _optional_number(region, "image_rotation", region)
        value = region.get("value")
        if not isinstance(value, dict):
            raise BadRequestError(f"Region {region.get('id', '?')} has no value object.")
        if is_keypoint:
            x, y = _number(value, "x", region), _number(value, "y", region)
            prompt.points.append([x * width / 100.0, y * height / 100.0])
            prompt.labels.append(0 if region.get("is_positive") is False else 1)
        else:
            prompt.box = rectangle_to_box(value, width, height, region)
        prompt.label = _region_label(value) or prompt.label
    return prompt


def prompts_from_task(task: dict, config: LabelConfig, image_size: tuple[int, int]) -> list[Prompt]:
    """Prompts already on a task: boxes and keypoints in its annotations or predictions.

    The newest annotation (not cancelled) that has rectangles or keypoints on
    the image is used; without one, the newest prediction that has (a
    detector's boxes imported as predictions, say). Each rectangle is one
    prompt; the keypoints of one label form one prompt together
    (``is_positive: false`` gives background points).

    Args:
        task: a task as Label Studio sends it (``annotations``, ``predictions``).
        config: the parsed label config.
        image_size: ``(height, width)`` of the image as loaded.

    Returns:
        Prompts in the order of their regions, keypoint groups after the boxes;
        empty when the task has none.

    Raises:
        BadRequestError: a region is malformed.

    Example:
        >>> from sam_backend.labelstudio.labelconfig import LabelConfig
        >>> cfg = LabelConfig("image", "image", "brush", ("Cat",), (), ("box",))
        >>> task = {"predictions": [{"result": [{"from_name": "box", "to_name": "image",
        ...     "type": "rectanglelabels", "value": {"x": 10, "y": 20, "width": 50, "height": 50,
        ...     "rectanglelabels": ["Cat"]}}]}]}
        >>> [(p.box, p.label) for p in prompts_from_task(task, cfg, (100, 200))]
        [([20.0, 20.0, 120.0, 70.0], 'Cat')]
    """
    for source in ("annotations", "predictions"):
        items = task.get(source) or []
        if not isinstance(items, list):
            continue
        for item in sorted((i for i in items if isinstance(i, dict)), key=_age, reverse=True):
            if item.get("was_cancelled"):
                continue
            prompts = _prompts_from_result(item.get("result") or [], config, image_size)
            if prompts:
                return prompts
    return []


def _age(item: dict) -> tuple[str, int]:
    # ISO timestamps sort as strings; ids break ties and stand in when there is no date.
    try:
        number = int(item.get("id") or 0)
    except (TypeError, ValueError):
        number = 0
    return str(item.get("updated_at") or item.get("created_at") or ""), number


def _prompts_from_result(result: list, config: LabelConfig, image_size: tuple[int, int]) -> list[Prompt]:
    if not isinstance(result, list):
        return []
    boxes: list[Prompt] = []
    groups: dict[str | None, Prompt] = {}
    for region in result:
        if not isinstance(region, dict) or region.get("to_name", config.image_name) != config.image_name:
            continue
        kind = str(region.get("type", "")).lower()
        if kind not in KEYPOINT_TYPES + RECTANGLE_TYPES or \
                region.get("from_name") in config.exemplar_names + config.counterexample_names:
            continue
        # Any rectangle on the image counts, not only the config's smart ones:
        # a detector's import may name its own control.
        single = prompt_from_context({"result": [region]}, _any_control(config, region), image_size)
        if not single:
            continue
        if kind in RECTANGLE_TYPES:
            boxes.append(single)
            continue
        group = groups.setdefault(single.label, Prompt(
            label=single.label, original_width=single.original_width,
            original_height=single.original_height, image_rotation=single.image_rotation,
        ))
        group.points += single.points
        group.labels += single.labels
    # A group of background points alone selects nothing.
    return boxes + [g for g in groups.values() if 1 in g.labels]


def _any_control(config: LabelConfig, region: dict) -> LabelConfig:
    """``config`` with the region's own control name accepted as a keypoint and rectangle control."""
    name = region.get("from_name")
    if name in config.keypoint_names or name in config.rectangle_names:
        return config
    return replace(config, keypoint_names=config.keypoint_names + (name,), rectangle_names=config.rectangle_names + (name,))


def rectangle_to_box(value: dict, width: float, height: float, region: dict | None = None) -> list[float]:
    """A Label Studio rectangle value (percent, rotation in degrees) -> ``[x0, y0, x1, y1]`` pixels.

    Label Studio rotates a rectangle clockwise about its top-left corner; the
    box returned is the axis-aligned bounding box of the rotated rectangle.

    Raises:
        PromptError: zero width or height.
    """
    region = region or {}
    x = _number(value, "x", region) * width / 100.0
    y = _number(value, "y", region) * height / 100.0
    w = _number(value, "width", region) * width / 100.0
    h = _number(value, "height", region) * height / 100.0
    if w <= 0 or h <= 0:
        raise PromptError(
            f"The rectangle {region.get('id', '')} has zero width or height ({w:g} x {h:g} px); "
            "drag a rectangle around the object."
        )
    angle = math.radians(_optional_number(value, "rotation", region, "value."))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return [min(xs), min(ys), max(xs), max(ys)]


def control_label_for(label: str | None, labels: tuple[str, ...], control: str) -> str:
    """The label of an output control for a mask: the clicked region's when the control has it, else its first."""
    if label in labels:
        return label
    if label is not None:
        logger.info("The control %r has no label %r; the mask gets %r instead.", control, label, labels[0])
    return labels[0]


def brush_label_for(label: str | None, config: LabelConfig) -> str:
    """The brush label for a mask: the clicked region's label when the brush has it, else the first."""
    return control_label_for(label, config.brush_labels, config.brush_name)


def mask_to_brush_region(
    mask: np.ndarray,
    label: str,
    score: float,
    config: LabelConfig,
    image_rotation: float = 0,
) -> dict:
    """A boolean ``(H, W)`` mask as a Label Studio brush region (RLE as label-studio-sdk encodes it)."""
    height, width = mask.shape
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": config.brush_name,
        "to_name": config.image_name,
        "type": "brushlabels",
        "origin": "prediction",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": image_rotation,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        "score": float(score),
        "readonly": False,
    }


def fit_mask(mask: np.ndarray, width: int | None, height: int | None) -> np.ndarray:
    """Resize a mask (nearest) to the size Label Studio reported, if that differs."""
    if not width or not height or mask.shape == (height, width):
        return mask
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((int(width), int(height)), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def _region_size(region: dict, image_size: tuple[int, int]) -> tuple[int, int]:
    width = region.get("original_width") or image_size[1]
    height = region.get("original_height") or image_size[0]
    try:
        width, height = int(round(float(width))), int(round(float(height)))
    except (TypeError, ValueError, OverflowError):  # OverflowError: infinite
        raise BadRequestError(f"Region {region.get('id', '?')} has a non-numeric original size.") from None
    if width <= 0 or height <= 0:
        raise BadRequestError(f"Region {region.get('id', '?')} has original size {width}x{height}.")
    return width, height


def _number(value: dict, key: str, region: dict) -> float:
    try:
        number = float(value[key])
    except (KeyError, TypeError, ValueError):
        raise BadRequestError(f"Region {region.get('id', '?')} has no numeric value.{key}.") from None
    if not math.isfinite(number):
        raise BadRequestError(f"Region {region.get('id', '?')} has a non-finite value.{key}.")
    return number


def _optional_number(value: dict, key: str, region: dict, prefix: str = "") -> float:
    """``value[key]`` as a finite number (an int stays one), 0 when missing or null."""
    if value.get(key) is None:
        return 0
    if type(value[key]) is int:
        return value[key]
    try:
        number = float(value[key])
    except (TypeError, ValueError):
        raise BadRequestError(f"Region {region.get('id', '?')} has a non-numeric {prefix}{key}.") from None
    if not math.isfinite(number):
        raise BadRequestError(f"Region {region.get('id', '?')} has a non-finite {prefix}{key}.")
    return number


def _region_label(value: dict) -> str | None:
    for key in ("keypointlabels", "rectanglelabels", "labels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels:
            return str(labels[0])
    return None
