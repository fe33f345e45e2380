"""What the backend needs from a Label Studio label config.

The image, where its masks go (a ``<BrushLabels>``, a ``<PolygonLabels>``, or
both) and which smart controls give prompts. Parsed once per config text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sam_backend.errors import LabelConfigError

KEYPOINT_TAGS = ("KeyPointLabels", "KeyPoint")
RECTANGLE_TAGS = ("RectangleLabels", "Rectangle")
#: The controls a mask can go to (see :mod:`sam_backend.labelstudio.output`).
BRUSH_TAG = "BrushLabels"
POLYGON_TAG = "PolygonLabels"
#: Where an annotator types a concept phrase (SAM 3), as Label Studio's grounding examples do.
TEXT_PROMPT_TAG = "TextArea"
#: A rectangle control whose name starts with this draws exemplar boxes (SAM 3: "every object like this one").
EXEMPLAR_PREFIX = "exemplar"
#: One whose name starts with this (``_`` and ``-`` aside) draws counter-examples ("not like this one").
COUNTEREXAMPLE_PREFIX = "counterexample"


@dataclass(frozen=True)
class LabelConfig:
    """The tags of a label config that SAM works with.

    Masks go to a ``<BrushLabels>``, a ``<PolygonLabels>``, or both, bound to
    the image; at least one of them is there.

    Attributes:
        image_name: ``name`` of the ``<Image>`` tag (the ``to_name`` of regions).
        image_key: the task data field holding the image URL (``$image`` -> ``image``).
        brush_name: ``name`` of the ``<BrushLabels>`` bound to the image, or None.
        brush_labels: its label values, in config order (empty without a brush).
        keypoint_names: names of keypoint controls bound to the image.
        rectangle_names: names of rectangle controls bound to the image.
        polygon_name: ``name`` of the ``<PolygonLabels>`` bound to the image, or None.
        polygon_labels: its label values, in config order (empty without one).
        text_prompt_names: names of ``<TextArea>`` controls bound to the image (concept phrases).
        exemplar_names: names of rectangle controls bound to the image whose name starts with
            ``exemplar`` (exemplar boxes; not in ``rectangle_names``).
        counterexample_names: those whose name starts with ``counterexample`` or
            ``counter_example`` (counter-example boxes; not in ``rectangle_names``).
        label_phrases: ``(label, phrase)`` for each label of the mask controls: the label's
            ``hint`` attribute, else its ``alias``, else its value (SAM 3's default phrases).

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
    brush_name: str | None
    brush_labels: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    rectangle_names: tuple[str, ...]
    # Last and defaulted, so that brush-only configs are still built positionally.
    polygon_name: str | None = None
    polygon_labels: tuple[str, ...] = ()
    text_prompt_names: tuple[str, ...] = ()
    exemplar_names: tuple[str, ...] = ()
    label_phrases: tuple[tuple[str, str], ...] = ()
    counterexample_names: tuple[str, ...] = ()

    @property
    def mask_labels(self) -> tuple[str, ...]:
        """The labels masks can get: the brush's, then the polygon control's new ones."""
        return self.brush_labels + tuple(label for label in self.polygon_labels if label not in self.brush_labels)


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Find the Image, its BrushLabels and/or PolygonLabels, and its smart keypoint/rectangle controls.

    The first ``<Image>`` with a ``<BrushLabels>`` or a ``<PolygonLabels>``
    bound to it is used (the first of each kind, if several).

    Raises:
        LabelConfigError: the config is missing, unparsable, or lacks an Image
            with a BrushLabels or PolygonLabels bound to it, or that control has
            no label; the message names what is missing.
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
        brush = next((c for c in bound if c.tag == BRUSH_TAG), None)
        polygon = next((c for c in bound if c.tag == POLYGON_TAG), None)
        if brush is None and polygon is None:
            continue
        rectangles = [c.name for c in bound if c.tag in RECTANGLE_TAGS]
        exemplars = tuple(name for name in rectangles if name.lower().startswith(EXEMPLAR_PREFIX))
        counterexamples = tuple(name for name in rectangles if _is_counterexample(name))
        return LabelConfig(
            image_name=image.name,
            image_key=(image.value or "").lstrip("$") or image.name,
            brush_name=brush.name if brush is not None else None,
            brush_labels=_labels_of(brush),
            keypoint_names=tuple(c.name for c in bound if c.tag in KEYPOINT_TAGS),
            rectangle_names=tuple(name for name in rectangles if name not in exemplars + counterexamples),
            polygon_name=polygon.name if polygon is not None else None,
            polygon_labels=_labels_of(polygon),
            text_prompt_names=tuple(c.name for c in bound if c.tag == TEXT_PROMPT_TAG),
            exemplar_names=exemplars,
            label_phrases=_label_phrases(brush, polygon),
            counterexample_names=counterexamples,
        )
    names = ", ".join(f'"{i.name}"' for i in images)
    raise LabelConfigError(
        f"The label config has no <{BRUSH_TAG}> or <{POLYGON_TAG}> bound to the image ({names}): the masks "
        f'have nowhere to go. Add <{BRUSH_TAG} name="brush" toName="{images[0].name}"> (masks) or '
        f'<{POLYGON_TAG} name="polygon" toName="{images[0].name}"> (polygons) with your labels '
        "(see label_config.xml and label_config_polygons.xml in sam-backend)."
    )


def _label_phrases(*controls) -> tuple[tuple[str, str], ...]:
    phrases: dict[str, str] = {}
    for control in controls:
        if control is None:
            continue
        for label, tag in (control.labels_attrs or {}).items():
            attrs = getattr(tag, "attr", None) or {}
            phrase = attrs.get("hint") or attrs.get("alias") or attrs.get("value") or label
            phrases.setdefault(label, " ".join(str(phrase).split()))
    return tuple(phrases.items())


def _labels_of(control) -> tuple[str, ...]:
    """The control's label values; a mask control without any cannot label a mask."""
    if control is None:
        return ()
    labels = tuple(control.labels or ())
    if not labels:
        raise LabelConfigError(
            f'The <{control.tag} name="{control.name}"> has no <Label>; add at least one label for the masks.'
        )
    return labels


def _is_counterexample(name: str) -> bool:
    return name.lower().replace("_", "").replace("-", "").startswith(COUNTEREXAMPLE_PREFIX)
