"""SAM 3 concept prompts: every instance of a phrase, or of an exemplar box, in an image.

:class:`ConceptEngine` splits keras-hub's ``SAM3PromptableConceptBackbone``
where the cost splits: :meth:`~ConceptEngine.encode` runs the vision
transformer once per image (tens of seconds on a CPU for ``sam3_pcs``) and
returns an :class:`~sam_backend.sam.engine.Embedding` of its last hidden
states, which the embedding store keeps like SAM 1's (under the SAM 3
preset's own fingerprint); :meth:`~ConceptEngine.find` runs the rest (the
vision neck, text and geometry encoders, DETR encoder and decoder, scoring
and mask decoder) for one prompt, and post-processes
(:mod:`sam_backend.sam3.instances`).

Pre-processing is SAM 3's own, as Meta's and Hugging Face's processors do
it: the image is resized to the model's square input (not letterboxed: SAM 3
was trained on squashed images), scaled to [-1, 1]; masks come back by the
inverse resize. keras-hub's defects are corrected on load
(:mod:`sam_backend.sam3.fixes`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image

from sam_backend.errors import PresetLoadError, PromptError
from sam_backend.sam.engine import Embedding, device_scope
from sam_backend.sam.images import ImageSource, load_image
from sam_backend.sam.presets import describe_source, error_summary, import_keras_hub, resolve_preset
from sam_backend.sam.transforms import Frame
from sam_backend.sam3.fixes import apply_fixes
from sam_backend.sam3.instances import ConceptInstance, ConceptSettings, select_instances
from sam_backend.sam3.tokenizer import ConceptTokenizer

logger = logging.getLogger(__name__)

#: The text Hugging Face's processor gives SAM 3 when a prompt has boxes and no phrase.
EXEMPLAR_ONLY_TEXT = "visual"
#: Images whose vision-neck outputs (the FPN levels: about 110 MB each for ``sam3_pcs``) a process
#: keeps, so that further phrases on an image an annotator is on cost the decoder alone.
NECK_CACHE_IMAGES = 2


@dataclass
class ConceptResult:
    """What one concept prompt found on one image.

    Attributes:
        instances: the objects, best first (empty: nothing passed the threshold).
        presence: sigmoid of the presence logit: how sure the model is that the concept is in the image.
        seconds: the decode's wall time.
    """

    instances: list[ConceptInstance] = field(default_factory=list)
    presence: float = 0.0
    seconds: float = 0.0


def preprocess_concept_image(rgb: np.ndarray, input_size: int) -> np.ndarray:
    """``(S, S, 3)`` float32 in [-1, 1]: the image squashed to the square input, as SAM 3's processors do."""
    resized = Image.fromarray(rgb).resize((input_size, input_size), Image.BILINEAR)
    return np.asarray(resized, np.float32) / 127.5 - 1.0


def exemplar_boxes(boxes, original_size: tuple[int, int]) -> np.ndarray:
    """Pixel ``[x0, y0, x1, y1]`` boxes as SAM 3 takes them: ``(N, 4)`` normalised ``[cx, cy, w, h]``.

    Raises:
        PromptError: a box of zero area, or one outside the image.
    """
    array = np.asarray(boxes, np.float64).reshape(-1, 4)
    height, width = original_size
    clipped = np.clip(array, 0, [width, height, width, height])
    for box in clipped:
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise PromptError(
                "The exemplar box has no area inside the image: draw a rectangle around one example object.")
    x0, y0, x1, y1 = clipped.T
    return np.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height],
                    axis=1).astype(np.float32)


class ConceptEngine:
    """A keras-hub SAM 3 model (corrected) behind an encode / find interface.

    It answers the same ``encode``/``encode_many`` calls as
    :class:`~sam_backend.sam.engine.SamEngine`, so that an
    :class:`~sam_backend.embeddings.tiers.EmbeddingTiers` caches its vision
    features in memory and in the store.

    Args:
        backbone: a ``keras_hub.models.SAM3PromptableConceptBackbone``.
        tokenizer: its :class:`~sam_backend.sam3.tokenizer.ConceptTokenizer`.
        preset: the name it was loaded from (logs, model versions).
        device: torch device; None lets keras choose.
        preset_dir: the local directory it was loaded from, if any (its files fingerprint it).

    Example:
        >>> engine = ConceptEngine.from_preset("sam3_pcs")  # doctest: +SKIP
        >>> features = engine.encode(load_image("shelf.jpg"))  # doctest: +SKIP
        >>> [round(i.score, 2) for i in engine.find(features, phrase="bottle").instances]  # doctest: +SKIP
        [0.91, 0.88, 0.83]
    """

    def __init__(self, backbone, tokenizer: ConceptTokenizer, preset: str = "custom",
                 device: str | None = None, preset_dir: str | None = None):
        apply_fixes(backbone)
        self.model = backbone
        self.tokenizer = tokenizer
        self.preset = preset
        self.device = device or os.environ.get("SAM_DEVICE") or None
        self.preset_dir = preset_dir
        vision = backbone.vision_encoder
        self.input_size = int(vision.image_shape[0])
        side = self.input_size // int(vision.patch_size)
        self.embedding_size = (side, side)
        self.embedding_channels = int(vision.hidden_dim)
        #: Torch autocast dtype of the vision encoder ("float32": none); store keys carry it.
        self.precision = "float32"
        self.encoder_calls = 0
        self.load_seconds: float | None = None
        self._necks: OrderedDict[int, tuple] = OrderedDict()
        self._necks_lock = threading.Lock()

    @classmethod
    def from_preset(cls, preset: str, device: str | None = None) -> "ConceptEngine":
        """Load a SAM 3 preset: a keras-hub name (``sam3_pcs``), ``kaggle://``, ``hf://`` or a local directory.

        A Hugging Face checkpoint loads when its ``config.json`` is the full
        SAM 3 one (``model_type: sam3_video``, the detector under
        ``detector_config``), as ``facebook/sam3`` publishes it.

        Raises:
            PresetLoadError: it cannot be loaded; the message says what was tried.
        """
        started = time.perf_counter()
        keras_hub = import_keras_hub()
        resolved = resolve_preset(preset)
        logger.info("Loading SAM 3 preset %s from %s", preset, describe_source(preset))
        try:
            with device_scope(device or os.environ.get("SAM_DEVICE")):
                backbone = keras_hub.models.SAM3PromptableConceptBackbone.from_preset(resolved)
            tokenizer = ConceptTokenizer.from_preset(resolved, int(backbone.text_encoder.max_sequence_length))
        except ImportError as exc:
            raise PresetLoadError(
                f"SAM 3 needs the concepts extra: pip install 'sam-backend[concepts]' ({exc}).") from exc
        except Exception as exc:  # keras-hub raises many kinds; all mean "cannot load"
            raise PresetLoadError(
                f"Could not load the SAM 3 preset {preset!r} from {describe_source(preset)}: "
                f"{error_summary(exc)}. Without network access, point --concept-preset "
                "(or SAM_CONCEPT_PRESET) at a local directory, e.g. one made by "
                "`sam-backend tiny-preset sam3 DIR`.") from exc
        engine = cls(backbone, tokenizer, preset=preset, device=device,
                     preset_dir=resolved if os.path.isdir(resolved) else None)
        engine.load_seconds = time.perf_counter() - started
        logger.info("Loaded SAM 3 %s in %.1fs: %.0f M parameters, input %d px, features %s x %d",
                    preset, engine.load_seconds, backbone.count_params() / 1e6, engine.input_size,
                    engine.embedding_size, engine.embedding_channels)
        return engine

    @cached_property
    def device_name(self) -> str:
        """The torch device inference runs on."""
        import keras

        with device_scope(self.device):
            return str(keras.ops.convert_to_tensor(0.0).device)

    @property
    def device_type(self) -> str:
        return self.device_name.split(":")[0]

    # ---------------------------------------------------------------- encode

    def encode(self, image: ImageSource) -> Embedding:
        """The vision transformer's features of one image (the expensive part)."""
        return self.encode_many([image])[0]

    def encode_many(self, images: list[ImageSource]) -> list[Embedding]:
        """Encode several images in one call, in order."""
        rgbs = [image if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                else load_image(image) for image in images]
        if not rgbs:
            return []
        batch = np.stack([preprocess_concept_image(rgb, self.input_size) for rgb in rgbs])
        features = self.encode_batch(batch)
        return [Embedding(features[j:j + 1], Frame.for_image(rgb.shape[:2], self.input_size))
                for j, rgb in enumerate(rgbs)]

    def encode_batch(self, batch: np.ndarray, precision: str | None = None):
        """Vision transformer on ``(B, S, S, 3)`` inputs in [-1, 1]; float32 ``(B, h, w, C)`` torch features."""
        import torch
        from keras import ops

        self.encoder_calls += 1
        precision = precision or self.precision
        context = (contextlib.nullcontext() if precision == "float32"
                   else torch.autocast(device_type=self.device_type, dtype=getattr(torch, precision)))
        started = time.perf_counter()
        with torch.inference_mode(), device_scope(self.device), context:
            hidden = self.model.vision_encoder.backbone(ops.convert_to_tensor(batch, dtype="float32"))
            features = hidden.float().reshape(len(batch), *self.embedding_size, self.embedding_channels)
        logger.debug("SAM 3 vision encode of %d image(s): %.2fs", len(batch), time.perf_counter() - started)
        return features

    # ---------------------------------------------------------------- decode

    def raw_outputs(self, embedding: Embedding, phrase: str | None = None, boxes=None, box_labels=None) -> dict:
        """The model's outputs for one prompt, as numpy: ``pred_masks`` ``(Q, h, w)``, ``pred_logits`` ``(Q,)``,
        ``pred_boxes`` ``(Q, 4)`` (normalised xyxy) and ``presence_logits`` (a float).

        Args:
            embedding: from :meth:`encode` (or the embedding store).
            phrase: the concept in words; None with exemplar boxes only (the text is then
                ``"visual"``, as Hugging Face's processor makes it).
            boxes: exemplar boxes, ``(N, 4)`` ``[x0, y0, x1, y1]`` in image pixels.
            box_labels: per box, True for "like this" and False for "not like this"; default all True.

        Raises:
            PromptError: no phrase and no box, an empty or too long phrase, a box of zero area.
        """
        import torch
        from keras import ops

        if phrase is None and (boxes is None or len(boxes) == 0):
            raise PromptError("A concept prompt needs a phrase or an exemplar box.")
        tokens = self.tokenizer(EXEMPLAR_ONLY_TEXT if phrase is None else phrase)
        if boxes is not None and len(boxes):
            normalised = exemplar_boxes(boxes, embedding.frame.original_size)
            labels = np.ones(len(normalised), np.int32) if box_labels is None else \
                np.asarray([1 if positive else 0 for positive in box_labels], np.int32)
            rows = np.concatenate([np.zeros((len(normalised), 1), np.float32), normalised], axis=1)[None]
        else:
            rows, labels = np.zeros((1, 0, 5), np.float32), None
        backbone = self.model
        with torch.inference_mode(), device_scope(self.device):
            hidden, positions = self._neck(embedding)
            token_ids = ops.convert_to_tensor(tokens.ids[None], dtype="int32")
            text_mask = ops.convert_to_tensor(tokens.mask[None].astype(bool))
            text = backbone.text_projection(backbone.text_encoder(token_ids, text_mask))
            if rows.shape[1]:
                label_tensor = ops.convert_to_tensor(labels[None], dtype="int32")
                geometry, geometry_mask = backbone.geometry_encoder(
                    ops.convert_to_tensor(rows), ops.not_equal(label_tensor, -10), label_tensor,
                    fpn_hidden_states=hidden[-1], fpn_position_encodings=positions[-1])
                prompt = ops.concatenate([text, geometry], axis=1)
                prompt_mask = ops.concatenate([text_mask, ops.cast(geometry_mask, "bool")], axis=1)
            else:  # a phrase alone is the whole prompt (keras-hub's backbone would add the geometry CLS token)
                prompt, prompt_mask = text, text_mask
            encoded = backbone.detr_encoder(vision_features=hidden[-1], text_features=prompt,
                                            vision_pos_embeds=positions[-1], text_masks=prompt_mask)
            decoded = backbone.detr_decoder(vision_features=encoded[0], text_features=prompt,
                                            vision_pos_encodings=encoded[1], text_masks=prompt_mask)
            queries = decoded[0]
            logits = backbone.dot_product_scoring(decoder_hidden_states=queries, text_features=prompt,
                                                  text_masks=prompt_mask)
            pred_boxes, pred_logits, presence = backbone.box_decoder(
                box_offsets=backbone.detr_decoder.box_head(queries), reference_boxes=decoded[1],
                pred_logits=logits, presence_logits=decoded[2])
            masks, _ = backbone.mask_decoder(decoder_queries=queries[:, -1], backbone_features=hidden,
                                             encoder_hidden_states=encoded[0], prompt_features=prompt,
                                             prompt_masks=prompt_mask)
        return {
            "pred_masks": np.moveaxis(ops.convert_to_numpy(masks[0]).astype(np.float32), -1, 0),
            "pred_logits": ops.convert_to_numpy(pred_logits[0]).astype(np.float32),
            "pred_boxes": ops.convert_to_numpy(pred_boxes[0]).astype(np.float32),
            "presence_logits": float(ops.convert_to_numpy(presence).reshape(-1)[0]),
        }

    def _neck(self, embedding: Embedding) -> tuple:
        """The vision neck's feature and position maps of ``embedding`` (the FPN levels the decoder reads).

        Computed from the stored features; the last :data:`NECK_CACHE_IMAGES` images' are kept.
        """
        key = id(embedding)
        with self._necks_lock:
            kept = self._necks.get(key)
            if kept is not None and kept[0] is embedding:  # the entry holds the embedding: its id is not reused
                self._necks.move_to_end(key)
                return kept[1]
        hidden, positions = self.model.vision_encoder.vision_neck(embedding.features)
        levels = (hidden[:-1], positions[:-1])
        with self._necks_lock:
            self._necks[key] = (embedding, levels)
            while len(self._necks) > NECK_CACHE_IMAGES:
                self._necks.popitem(last=False)
        return levels

    def find(self, embedding: Embedding, phrase: str | None = None, boxes=None, box_labels=None,
             settings: ConceptSettings | None = None) -> ConceptResult:
        """Every instance of the concept on the image, post-processed (see :meth:`raw_outputs`)."""
        started = time.perf_counter()
        raw = self.raw_outputs(embedding, phrase=phrase, boxes=boxes, box_labels=box_labels)
        instances = select_instances(raw["pred_masks"], raw["pred_logits"], raw["presence_logits"],
                                     raw["pred_boxes"], embedding.frame.original_size, settings)
        presence = float(1.0 / (1.0 + np.exp(-raw["presence_logits"])))
        return ConceptResult(instances, presence, time.perf_counter() - started)
