"""What the backend needs from a Label Studio label config."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sam_backend.errors import LabelConfigError

KEYPOINT_TAGS = ("KeyPointLabels", "KeyPoint")
RECTANGLE_TAGS = ("RectangleLabels", "Rectangle")


@dataclass(frozen=True)
class LabelConfig:
    """The tags of a label config that SAM works with.

    Attributes:
        image_name: ``name`` of the ``<Image>`` tag (the ``to_name`` of regions).
        image_key: the task data field holding the image URL (``$image`` -> ``image``).
        brush_name: ``name`` of the ``<BrushLabels>`` bound to the image.
        brush_labels: its label values, in config order.
        keypoint_names: names of keypoint controls bound to the image.
        rectangle_names: names of rectangle controls bound to the image.

    Example:
        >>> cfg = parse_label_config(
        ...     '<View><Image name="img" value="$image"/>'
        ...     '<BrushLabels name="brush" toName="img"><Label value="Cat"/></BrushLabels>'
        ...     '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="Cat"/></KeyPointLabels>'
        ...     '</View>')
        >>> cfg.image_key, cfg.brush_labels, cfg.keypoint_names
        ('image', ('Cat',), ('kp',))
    """

    image_name: str
    image_key: str
    brush_name: str
    brush_labels: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    rectangle_names: tuple[str, ...]


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Find the Image, its BrushLabels and its smart keypoint/rectangle controls.

    Raises:
        LabelConfigError: the config is missing, unparsable, or lacks an Image
            with a BrushLabels bound to it; the message names what is missing.
    """
    if not xml or not xml.strip():
        raise LabelConfigError("The project has no label config; paste label_config.xml from sam-backend.")
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(xml)
    except Exception as exc:
        raise LabelConfigError(f"The label config cannot be parsed: {exc}") from None
    images = [obj for obj in interface.objects if obj.tag == "Image"]
    if not images:
        raise LabelConfigError(
            'The label config has no <Image> tag; SAM needs <Image name="image" value="$image"/>.'
        )
    controls = list(interface.controls)
    for image in images:
        bound = [c for c in controls if image.name in (c.to_name or [])]
        brushes = [c for c in bound if c.tag == "BrushLabels"]
        if not brushes:
            continue
        brush = brushes[0]
        labels = tuple(brush.labels or ())
        if not labels:
            raise LabelConfigError(
                f'The <BrushLabels name="{brush.name}"> has no <Label>; add at least one label for the masks.'
            )
        return LabelConfig(
            image_name=image.name,
            image_key=(image.value or "").lstrip("$") or image.name,
            brush_name=brush.name,
            brush_labels=labels,
            keypoint_names=tuple(c.name for c in bound if c.tag in KEYPOINT_TAGS),
            rectangle_names=tuple(c.name for c in bound if c.tag in RECTANGLE_TAGS),
        )
    names = ", ".join(f'"{i.name}"' for i in images)
    raise LabelConfigError(
        f"The label config has no <BrushLabels> bound to the image ({names}): the masks have nowhere "
        f'to go. Add <BrushLabels name="brush" toName="{images[0].name}"> with your labels '
        "(see label_config.xml in sam-backend)."
    )
