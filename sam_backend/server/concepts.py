"""Concept prompts on the server: SAM 3's instances as Label Studio regions, and its settings.

The model and its features cache come from the backend (a
:class:`~sam_backend.server.backend.ModelHolder` of a
:class:`~sam_backend.sam3.ConceptEngine`); this module turns what it finds
into regions of one label, for a click and for pre-annotation alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

from sam_backend.errors import BadRequestError
from sam_backend.labelstudio.labelconfig import LabelConfig
from sam_backend.labelstudio.output import OutputSettings, mask_to_regions
from sam_backend.labelstudio.regions import fit_mask
from sam_backend.sam3.instances import ConceptSettings

logger = logging.getLogger(__name__)

#: Environment variables of :class:`ConceptSettings` fields (``extra_params`` uses ``concept_<field>``).
ENV_PREFIX = "SAM_CONCEPT_"


def concept_settings(environ: Mapping | None = None, extra_params: Mapping | None = None) -> ConceptSettings:
    """Concept post-processing settings: the environment (``SAM_CONCEPT_THRESHOLD``...), then ``extra_params``.

    ``extra_params`` (the project's model settings in Label Studio) may say
    ``{"concept_threshold": 0.4}`` or ``{"concepts": {"threshold": 0.4}}``.

    Raises:
        BadRequestError: a value out of range or not a number, named.

    Example:
        >>> concept_settings({"SAM_CONCEPT_THRESHOLD": "0.3"}, {"concept_max_instances": 5}).max_instances
        5
    """
    environ = os.environ if environ is None else environ
    extra = extra_params or {}
    from_env = {key[len(ENV_PREFIX):].lower(): value for key, value in environ.items() if key.startswith(ENV_PREFIX)}
    nested = extra.get("concepts") if isinstance(extra.get("concepts"), dict) else {}
    from_extra = {key[len("concept_"):]: value for key, value in extra.items() if key.startswith("concept_")}
    try:
        settings = ConceptSettings.from_mapping(from_env)
        return ConceptSettings.from_mapping({**from_extra, **nested}, base=settings)
    except ValueError as exc:
        raise BadRequestError(f"Concept setting: {exc}.") from None


@dataclass
class ConceptRegions:
    """The regions one concept prompt gave on one task."""

    regions: list[dict] = field(default_factory=list)
    instances: int = 0
    scores: list[float] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        """Mean instance score (Label Studio sorts predictions by it)."""
        return sum(self.scores) / len(self.scores) if self.scores else None


def instances_to_regions(found, label: str, config: LabelConfig, output: OutputSettings,
                         original_size: tuple[int | None, int | None] = (None, None),
                         image_rotation: float = 0, regions: ConceptRegions | None = None) -> ConceptRegions:
    """Each instance of ``found`` (a :class:`~sam_backend.sam3.ConceptResult`) as regions of ``label``.

    Args:
        original_size: ``(width, height)`` Label Studio reported, if any (masks are fitted to it).
        regions: regions to add to (one task's labels); default new.
    """
    regions = regions if regions is not None else ConceptRegions()
    labels = output.labels_for(label, config)
    width, height = original_size
    for instance in found.instances:
        mask = fit_mask(instance.mask, width, height)
        regions.regions += mask_to_regions(mask, labels, instance.score, config, output.polygon, image_rotation)
        regions.instances += 1
        regions.scores.append(instance.score)
    return regions
