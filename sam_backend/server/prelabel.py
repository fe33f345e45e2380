"""Masks for a task nobody has clicked on yet: from its own boxes and keypoints, or automatic.

This is what "Retrieve predictions", a task opened with pre-labeling on, and
``sam-backend preannotate`` produce. The mode says where prompts come from:

- ``boxes``: rectangles and keypoints already on the task (annotations, or
  imported predictions such as a detector's boxes), one mask per box and one
  per keypoint label;
- ``auto``: SAM's automatic mask generation over a grid of points;
- ``boxes-then-auto``: the task's own prompts when it has some, else automatic;
- ``concepts``: SAM 3 finds every instance of each mask label's phrase
  (:mod:`sam_backend.server.concepts`; needs a concept preset);
- ``off``: nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from sam_backend.sam.automask import AutoMaskGenerator, AutoMaskSettings
from sam_backend.errors import BadRequestError
from sam_backend.labelstudio.labelconfig import LabelConfig
from sam_backend.labelstudio.output import OutputSettings, mask_to_regions
from sam_backend.labelstudio.regions import fit_mask, prompts_from_task
from sam_backend.sam3.instances import ConceptSettings
from sam_backend.server.concepts import concept_settings

logger = logging.getLogger(__name__)

MODES = ("boxes", "auto", "boxes-then-auto", "concepts", "off")
DEFAULT_MODE = "boxes"


@dataclass(frozen=True)
class PrelabelSettings:
    """What to predict for tasks without a click.

    Attributes:
        mode: one of :data:`MODES`.
        auto: automatic mask generation settings.
        auto_label: the label of automatic masks (default: the brush's or polygon control's first).
        output: what masks become (brush, polygons, both) and polygon settings.
        concepts: ``(label, phrase)`` pairs that override the label config's phrases (mode ``concepts``).
        concept: SAM 3's post-processing settings (mode ``concepts``).

    Example:
        >>> PrelabelSettings.from_sources({"SAM_PRELABEL": "auto"}, {"points_per_side": 8}).auto.points_per_side
        8
    """

    mode: str = DEFAULT_MODE
    auto: AutoMaskSettings = field(default_factory=AutoMaskSettings)
    auto_label: str | None = None
    output: OutputSettings = field(default_factory=OutputSettings)
    concepts: tuple[tuple[str, str], ...] = ()
    concept: ConceptSettings = field(default_factory=ConceptSettings)

    @classmethod
    def from_sources(cls, environ: dict | None = None, extra_params: dict | None = None) -> "PrelabelSettings":
        """Settings from the environment, overridden by a project's ``extra_params``.

        Environment: ``SAM_PRELABEL`` (the mode), ``SAM_AUTO_LABEL``, and
        ``SAM_AUTO_<SETTING>`` for each :class:`AutoMaskSettings` field
        (``SAM_AUTO_POINTS_PER_SIDE=16``). ``extra_params`` (the JSON set in
        Label Studio's model settings) uses ``prelabel``, ``auto_label`` and
        the field names themselves, or an ``"auto": {...}`` object. The
        output kind and polygon settings: :meth:`OutputSettings.from_sources`.

        Raises:
            BadRequestError: an unknown mode or an invalid setting.
        """
        environ = os.environ if environ is None else environ
        extra = extra_params or {}
        mode = str(extra.get("prelabel") or environ.get("SAM_PRELABEL") or DEFAULT_MODE).strip().lower()
        if mode not in MODES:
            raise BadRequestError(f"Unknown pre-labeling mode {mode!r}; use one of {', '.join(MODES)}.")
        from_env = {
            key[len("SAM_AUTO_"):].lower(): value
            for key, value in environ.items()
            if key.startswith("SAM_AUTO_") and key != "SAM_AUTO_LABEL"
        }
        auto = AutoMaskSettings.from_mapping(from_env)
        nested = extra.get("auto") if isinstance(extra.get("auto"), dict) else {}
        auto = AutoMaskSettings.from_mapping({**extra, **nested}, base=auto)
        label = extra.get("auto_label") or environ.get("SAM_AUTO_LABEL") or None
        phrases = extra.get("concept_phrases") if isinstance(extra.get("concept_phrases"), dict) else {}
        return cls(mode=mode, auto=auto, auto_label=label, output=OutputSettings.from_sources(environ, extra),
                   concepts=tuple((str(k), str(v)) for k, v in phrases.items()),
                   concept=concept_settings(environ, extra))


@dataclass
class TaskMasks:
    """The regions predicted for one task and how they were found."""

    regions: list[dict]
    source: str  # "boxes", "auto" or "none"

    @property
    def score(self) -> float | None:
        """Mean predicted IoU of the regions (Label Studio sorts predictions by it)."""
        scores = [r["score"] for r in self.regions if "score" in r]
        return sum(scores) / len(scores) if scores else None


def predict_task_masks(engine, embedding, task: dict, config: LabelConfig, settings: PrelabelSettings) -> TaskMasks:
    """Regions (brush, polygons: ``settings.output``) for ``task`` without an annotator's click.

    Args:
        engine: a :class:`~sam_backend.sam.engine.SamEngine`.
        embedding: the task image's embedding.
        task: the task as Label Studio sends it.
        config: the parsed label config.
        settings: :class:`PrelabelSettings`.

    Raises:
        BadRequestError, PromptError: a malformed region on the task.
        LabelConfigError: the project asks for an output its config has no control for.
    """
    if settings.mode == "off":
        return TaskMasks([], "none")
    size = embedding.frame.original_size
    if settings.mode in ("boxes", "boxes-then-auto"):
        prompts = prompts_from_task(task, config, size)
        if prompts:
            # Boxes alone (a detector's) are decoded together; prompts with points one by one.
            boxes_only = [p for p in prompts if p.box is not None and not p.points]
            batched = dict(zip(map(id, boxes_only), engine.decode_boxes(embedding, [p.box for p in boxes_only])))
            regions = []
            for prompt in prompts:
                prediction = batched.get(id(prompt)) or engine.decode(
                    embedding, points=prompt.points or None, labels=prompt.labels or None, box=prompt.box
                )
                mask = fit_mask(prediction.mask, prompt.original_width, prompt.original_height)
                labels = settings.output.labels_for(prompt.label, config)
                regions += mask_to_regions(
                    mask, labels, prediction.score, config, settings.output.polygon, prompt.image_rotation
                )
            return TaskMasks(regions, "boxes")
        if settings.mode == "boxes":
            return TaskMasks([], "none")
    labels = settings.output.labels_for(settings.auto_label, config)  # once: it logs a missing label
    masks = AutoMaskGenerator(engine, settings.auto).generate(embedding)
    regions = [r for m in masks for r in mask_to_regions(m.mask, labels, m.score, config, settings.output.polygon)]
    return TaskMasks(regions, "auto" if regions else "none")
