"""Concept prompts (SAM 3) read from Label Studio: a typed phrase, exemplar boxes, the label they mean.

Pure translation, like :mod:`sam_backend.labelstudio.regions`: no tensors.

Interactively, the annotator types into the config's ``<TextArea>`` bound
to the image, and/or draws a rectangle with a control named ``exemplar...``
("every object like this one") or ``counterexample...`` ("but not like this
one"; see ``label_config_concepts.xml``). The label the found objects get:

- ``Bottle: green glass bottle`` (a label, a colon, the phrase) names both;
- a phrase that is a label's name (or its ``hint`` or ``alias``) is that label,
  and the phrase searched is the label's (its hint, when it has one);
- otherwise the exemplar box's label (else a counter-example's), else the only
  label of the mask control;
- counter-example boxes alone: their label, whose phrase is searched.

Label Studio's editor sends, with a smart rectangle just drawn, every
rectangle of the same label on the image: an exemplar and the counter-examples
drawn after it arrive together.

For pre-annotation every mask label has a phrase: an explicit mapping
(``--concept "Bottle=a glass bottle"``), else the label's hint, alias or name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sam_backend.errors import BadRequestError, LabelConfigError, PromptError
from sam_backend.labelstudio.labelconfig import LabelConfig
from sam_backend.labelstudio.regions import RECTANGLE_TYPES, rectangle_to_box

TEXT_TYPES = ("textarea",)


@dataclass
class ConceptRequest:
    """What an annotator asked SAM 3 for, in pixels of the displayed image.

    Attributes:
        phrase: the text to find (None: exemplar boxes only).
        label: the label the objects get (a mask label of the config).
        boxes: exemplar and counter-example boxes ``[x0, y0, x1, y1]``.
        box_labels: per box, True for an exemplar, False for a counter-example.
        original_width, original_height, image_rotation: as Label Studio sent them.
    """

    phrase: str | None = None
    label: str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    box_labels: list[bool] = field(default_factory=list)
    original_width: int | None = None
    original_height: int | None = None
    image_rotation: float = 0


def is_concept_context(context: dict | None, config: LabelConfig) -> bool:
    """Whether ``params.context`` holds a typed phrase, an exemplar or a counter-example box for the image."""
    if not (config.text_prompt_names or config.exemplar_names or config.counterexample_names) \
            or not isinstance(context, dict):
        return False
    regions = context.get("result")
    return isinstance(regions, list) and any(_concept_kind(r, config) for r in regions if isinstance(r, dict))


def _concept_kind(region: dict, config: LabelConfig) -> str | None:
    if region.get("to_name", config.image_name) != config.image_name:
        return None
    kind, name = str(region.get("type", "")).lower(), region.get("from_name")
    if kind in TEXT_TYPES and name in config.text_prompt_names:
        return "text"
    if kind in RECTANGLE_TYPES and name in config.exemplar_names:
        return "exemplar"
    if kind in RECTANGLE_TYPES and name in config.counterexample_names:
        return "counterexample"
    return None


def concept_request_from_context(context: dict, config: LabelConfig, image_size: tuple[int, int]) -> ConceptRequest:
    """Read ``params.context.result`` into one concept request (the last phrase typed; every box).

    Raises:
        BadRequestError: a malformed region.
        PromptError: a box of zero area; no label can be told.

    Example:
        >>> from sam_backend.labelstudio.labelconfig import LabelConfig
        >>> cfg = LabelConfig("image", "image", "brush", ("Bottle", "Can"), (), (), text_prompt_names=("prompt",),
        ...                   label_phrases=(("Bottle", "Bottle"), ("Can", "tin can")))
        >>> ctx = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
        ...                    "value": {"text": ["Can: crushed cans"]}}]}
        >>> r = concept_request_from_context(ctx, cfg, (100, 200)); (r.phrase, r.label)
        ('crushed cans', 'Can')
    """
    request = ConceptRequest()
    box_label = counter_label = None
    height, width = image_size
    for region in context.get("result") or []:
        if not isinstance(region, dict):
            raise BadRequestError("Each region in params.context.result must be an object.")
        kind = _concept_kind(region, config)
        if kind is None:
            continue
        value = region.get("value")
        if not isinstance(value, dict):
            raise BadRequestError(f"Region {region.get('id', '?')} has no value object.")
        if kind == "text":
            texts = value.get("text")
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise BadRequestError(f"The text region {region.get('id', '?')} has no list of texts in value.text.")
            request.phrase = texts[-1] if texts else ""
            continue
        request.original_width = region.get("original_width") or request.original_width
        request.original_height = region.get("original_height") or request.original_height
        request.image_rotation = region.get("image_rotation") or 0
        request.boxes.append(rectangle_to_box(value, width, height, region))
        request.box_labels.append(kind == "exemplar")
        labels = value.get("rectanglelabels")
        label = labels[0] if isinstance(labels, list) and labels else None
        if kind == "exemplar":
            box_label = label or box_label
        else:
            counter_label = label or counter_label
    if request.phrase is None and request.boxes and not any(request.box_labels):
        # Counter-examples alone: "this label's objects, but not like these".
        label = counter_label if counter_label in config.mask_labels else _only_label(config)
        if label is None:
            raise PromptError("A counter-example box says what not to find: give it one of the labels "
                              f"({', '.join(config.mask_labels[:5])}), or type a phrase or draw an exemplar box too.")
        request.phrase, request.label = dict(config.label_phrases).get(label, label), label
        return request
    # A counter-example's label stands in for an unlabelled exemplar's (the editor sends them by label).
    request.phrase, request.label = _phrase_and_label(request.phrase, box_label or counter_label, config)
    return request


def _only_label(config: LabelConfig) -> str | None:
    return config.mask_labels[0] if len(config.mask_labels) == 1 else None


def _phrase_and_label(typed: str | None, box_label: str | None, config: LabelConfig) -> tuple[str | None, str]:
    labels = config.mask_labels
    phrases = dict(config.label_phrases)
    if typed is not None and not typed.strip() and box_label is None:
        raise PromptError("The concept phrase is empty: type a label's name or a short phrase, such as \"bottle\".")
    if typed is not None and typed.strip():
        head, colon, tail = typed.partition(":")
        named = _find_label(head, config) if colon else None
        if named is not None:
            return tail.strip(), named
        named = _find_label(typed, config)
        if named is not None:
            return phrases.get(named, named), named
    label = box_label if box_label in labels else _only_label(config)
    if label is None:
        raise PromptError(
            f"Which label should the objects get? Type a label's name ({', '.join(labels[:5])}...) or "
            f"\"Label: phrase\", e.g. \"{labels[0]}: {phrases.get(labels[0], labels[0]).lower()}\".")
    return (typed if typed and typed.strip() else None), label


def _find_label(text: str, config: LabelConfig) -> str | None:
    wanted = " ".join(text.split()).casefold()
    if not wanted:
        return None
    for label, phrase in config.label_phrases:
        if wanted in (label.casefold(), phrase.casefold()):
            return label
    return next((label for label in config.mask_labels if label.casefold() == wanted), None)


def parse_concept_mapping(items: list[str] | None) -> dict[str, str]:
    """``["Bottle=a glass bottle", ...]`` (the ``--concept`` options) as ``{label: phrase}``.

    Raises:
        BadRequestError: an item without ``=``.
    """
    mapping = {}
    for item in items or []:
        label, equals, phrase = str(item).partition("=")
        if not equals or not label.strip():
            raise BadRequestError(f"--concept {item!r}: write LABEL=PHRASE, e.g. \"Bottle=a glass bottle\".")
        mapping[label.strip()] = " ".join(phrase.split())
    return mapping


def label_phrases(config: LabelConfig, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The phrase of every mask label, for pre-annotation: ``overrides``, else the label's hint, alias or name.

    Raises:
        LabelConfigError: an override names a label the config does not have, or a label's phrase is empty.
    """
    overrides = overrides or {}
    labels = config.mask_labels
    unknown = [label for label in overrides if label not in labels]
    if unknown:
        raise LabelConfigError(f"--concept names {', '.join(map(repr, unknown))}, which the label config's mask "
                               f"control does not have (it has {', '.join(map(repr, labels))}).")
    defaults = dict(config.label_phrases)
    phrases = {label: overrides.get(label, defaults.get(label, label)) for label in labels}
    empty = [label for label, phrase in phrases.items() if not phrase.strip()]
    if empty:
        raise LabelConfigError(f"The label(s) {', '.join(map(repr, empty))} have no phrase to search for: give one "
                               "with --concept \"LABEL=phrase\" or a hint attribute on the <Label>.")
    return phrases
