"""Which regions a mask becomes: a brush region, polygon regions, or both.

The label config says what is possible: a ``<BrushLabels>`` bound to the image
takes masks as RLE, a ``<PolygonLabels>`` takes them as polygons
(:mod:`.polygons`). With one of them, masks go there. With both, a mask is a
brush region unless ``output`` says otherwise: the project's *Extra params*
in Label Studio (``{"output": "polygon"}``), else the ``SAM_OUTPUT``
environment variable; ``"both"`` gives both.

``SAM_OUTPUT`` is the server's default for every project, so a project whose
config lacks the kind it names quietly gets what its config has. A project's
own ``output`` (or ``preannotate --output``) is a request for that project: a
config that cannot honour it is an error naming the tag to add.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from sam_backend.errors import BadRequestError, LabelConfigError
from sam_backend.labelstudio.labelconfig import BRUSH_TAG, POLYGON_TAG, LabelConfig
from sam_backend.labelstudio.polygons import PolygonSettings, mask_to_polygon_regions, polygon_label_for
from sam_backend.labelstudio.regions import brush_label_for, mask_to_brush_region

BRUSH, POLYGON, BOTH = "brush", "polygon", "both"
OUTPUT_KINDS = (BRUSH, POLYGON, BOTH)
#: ``extra_params`` keys of the polygon settings, and their environment variables.
POLYGON_KEYS = {"tolerance": "polygon_tolerance", "min_area": "polygon_min_area", "max_parts": "polygon_max_parts"}


@dataclass(frozen=True)
class OutputSettings:
    """What masks become, before the label config has its say.

    Attributes:
        kind: ``"brush"``, ``"polygon"``, ``"both"``, or None (the config decides:
            brush when it has one, else polygons).
        explicit: ``kind`` was asked for by the project (extra params, a
            command-line flag), so a config without that control is an error;
            otherwise it comes from ``SAM_OUTPUT`` and is a preference.
        polygon: how masks become polygons.

    Example:
        >>> settings = OutputSettings.from_sources({"SAM_POLYGON_TOLERANCE": "2"}, {"output": "polygon"})
        >>> settings.kind, settings.explicit, settings.polygon.tolerance
        ('polygon', True, 2.0)
    """

    kind: str | None = None
    explicit: bool = False
    polygon: PolygonSettings = field(default_factory=PolygonSettings)

    @classmethod
    def from_sources(cls, environ: Mapping | None = None, extra_params: Mapping | None = None) -> "OutputSettings":
        """Settings from the environment, overridden by a project's ``extra_params``.

        Environment: ``SAM_OUTPUT``, ``SAM_POLYGON_TOLERANCE``,
        ``SAM_POLYGON_MIN_AREA``, ``SAM_POLYGON_MAX_PARTS``. ``extra_params``:
        ``output``, ``polygon_tolerance``, ``polygon_min_area``,
        ``polygon_max_parts``, or a ``"polygon": {"tolerance": ...}`` object.

        Raises:
            BadRequestError: an unknown output kind or an invalid polygon setting.
        """
        environ = os.environ if environ is None else environ
        extra = extra_params or {}
        chosen, explicit = extra.get("output"), True
        if chosen in (None, ""):
            chosen, explicit = environ.get("SAM_OUTPUT") or None, False
        kind = None
        if chosen is not None:
            kind = str(chosen).strip().lower()
            if kind not in OUTPUT_KINDS:
                where = '"output" in the extra params' if explicit else "SAM_OUTPUT"
                raise BadRequestError(
                    f"Unknown output kind {chosen!r} ({where}); use one of {', '.join(OUTPUT_KINDS)}."
                )
        polygon = PolygonSettings.from_mapping(
            {name: environ.get("SAM_" + key.upper()) for name, key in POLYGON_KEYS.items()}
        )
        polygon = PolygonSettings.from_mapping({name: extra.get(key) for name, key in POLYGON_KEYS.items()}, polygon)
        nested = extra.get("polygon")
        if isinstance(nested, Mapping):
            polygon = PolygonSettings.from_mapping(nested, polygon)
        return cls(kind=kind, explicit=explicit, polygon=polygon)

    def kinds(self, config: LabelConfig) -> tuple[str, ...]:
        """The region kinds a mask becomes in a project with ``config``: ``("brush",)``, ``("polygon",)`` or both.

        Raises:
            LabelConfigError: the project asked for a kind whose control the config lacks.

        Example:
            >>> cfg = LabelConfig("image", "image", "brush", ("Cat",), (), (), "poly", ("Cat",))
            >>> OutputSettings().kinds(cfg), OutputSettings(kind="both").kinds(cfg)
            (('brush',), ('brush', 'polygon'))
        """
        available = tuple(k for k, name in ((BRUSH, config.brush_name), (POLYGON, config.polygon_name)) if name)
        if self.kind is None:
            return available[:1]  # brush first: the config order of BRUSH, POLYGON above
        wanted = (BRUSH, POLYGON) if self.kind == BOTH else (self.kind,)
        missing = [k for k in wanted if k not in available]
        if missing and self.explicit:
            tag = BRUSH_TAG if missing[0] == BRUSH else POLYGON_TAG
            raise LabelConfigError(
                f'The project asks for {self.kind!r} output, but its label config has no <{tag}> bound to the '
                f'image "{config.image_name}". Add <{tag} name="{missing[0]}" toName="{config.image_name}"> with '
                f'your labels, or set "output" to one of: {", ".join(available)}.'
            )
        return tuple(k for k in wanted if k in available) or available[:1]

    def labels_for(self, label: str | None, config: LabelConfig) -> dict[str, str]:
        """The label of a mask's regions per kind: the clicked ``label`` where the control has it, else its first.

        Raises:
            LabelConfigError: see :meth:`kinds`.

        Example:
            >>> cfg = LabelConfig("image", "image", None, (), (), (), "poly", ("Dog", "Cat"))
            >>> OutputSettings().labels_for("Cat", cfg), OutputSettings().labels_for("Zebra", cfg)
            ({'polygon': 'Cat'}, {'polygon': 'Dog'})
        """
        pick = {BRUSH: brush_label_for, POLYGON: polygon_label_for}
        return {kind: pick[kind](label, config) for kind in self.kinds(config)}


def mask_to_regions(
    mask: np.ndarray,
    labels: Mapping[str, str],
    score: float,
    config: LabelConfig,
    polygon: PolygonSettings | None = None,
    image_rotation: float = 0,
) -> list[dict]:
    """A boolean ``(H, W)`` mask as Label Studio regions: one brush region and/or one polygon per part.

    Args:
        mask: ``(H, W)`` bool mask at the size Label Studio reported.
        labels: the label per region kind (:meth:`OutputSettings.labels_for`);
            its keys say which kinds to make.
        score: SAM's predicted IoU.
        config: the parsed label config.
        polygon: how masks become polygons.
        image_rotation: as Label Studio sent it with the prompt.

    Example:
        >>> cfg = LabelConfig("image", "image", "brush", ("Cat",), (), (), "poly", ("Cat",))
        >>> mask = np.zeros((50, 80), bool); mask[10:30, 20:60] = True
        >>> [r["type"] for r in mask_to_regions(mask, {"brush": "Cat", "polygon": "Cat"}, 0.9, cfg)]
        ['brushlabels', 'polygonlabels']
    """
    regions = []
    if BRUSH in labels:
        regions.append(mask_to_brush_region(mask, labels[BRUSH], score, config, image_rotation))
    if POLYGON in labels:
        regions += mask_to_polygon_regions(mask, labels[POLYGON], score, config, polygon, image_rotation)
    return regions
