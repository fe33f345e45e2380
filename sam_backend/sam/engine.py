"""The SAM engine: encode an image once, decode many prompts against it.

Nothing here knows about HTTP or Label Studio: inputs are images and prompts
in pixel coordinates of the image as displayed, outputs are masks at the
image's own resolution.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

import sam_backend  # noqa: F401  (sets KERAS_BACKEND before keras is imported)
from sam_backend.errors import PromptError
from sam_backend.sam.decoder import ClickDecoder, UnsupportedLayers
from sam_backend.sam.images import ImageSource, load_image
from sam_backend.sam.stats import EngineStats
from sam_backend.sam.presets import import_keras_hub, load_segmenter, resolve_preset
from sam_backend.sam.transforms import Frame, postprocess_logits, preprocess

logger = logging.getLogger(__name__)

#: Threshold on mask logits, as in SAM.
MASK_THRESHOLD = 0.0


@dataclass
class Embedding:
    """The image encoder's output for one image, with the image's geometry.

    Attributes:
        features: ``(1, h, w, C)`` torch tensor on the engine's device.
        frame: where the image sits in the square model input.
    """

    features: object
    frame: Frame

    @property
    def nbytes(self) -> int:
        """Size of the features in bytes (for cache budgets)."""
        return self.features.element_size() * self.features.nelement()


@dataclass
class Prediction:
    """Masks for one prompt, best first by predicted IoU.

    Attributes:
        scores: ``(K,)`` predicted IoU of each candidate mask.
        low_res_logits: ``(K, h, w)`` float32 logits at the mask decoder's
            resolution; ``low_res_logits[0]`` is the ``mask_input`` for a
            refinement click.
        frame: the image geometry, to bring masks back to the original size.

    Example:
        >>> pred = engine.decode(embedding, points=[[120, 80]], labels=[1])  # doctest: +SKIP
        >>> pred.mask.shape == embedding.frame.original_size  # doctest: +SKIP
        True
    """

    scores: np.ndarray
    low_res_logits: np.ndarray
    frame: Frame
    _logits_tensor: object = field(repr=False)

    @property
    def score(self) -> float:
        """Predicted IoU of the best mask."""
        return float(self.scores[0])

    @cached_property
    def mask(self) -> np.ndarray:
        """The best mask, ``(H, W)`` bool at the original image size."""
        return self.masks_at([0])[0]

    @cached_property
    def masks(self) -> np.ndarray:
        """All candidate masks, ``(K, H, W)`` bool, best first."""
        return self.masks_at(range(len(self.scores)))

    def masks_at(self, indices) -> np.ndarray:
        """Candidate masks ``indices`` at the original size, ``(len, H, W)`` bool."""
        import torch

        with torch.inference_mode():
            logits = postprocess_logits(self._logits_tensor[list(indices)], self.frame)
            return (logits > MASK_THRESHOLD).cpu().numpy()


class SamEngine:
    """Encode images and decode prompts with a keras-hub ``SAMImageSegmenter``.

    The image encoder (the expensive part) runs once per image: ``encode``
    returns an :class:`Embedding` that ``decode`` reuses for every prompt.
    Keeping embeddings between requests is not the engine's job but
    :class:`~sam_backend.embeddings.tiers.EmbeddingTiers`'. Pre- and
    post-processing reproduce Meta's ``SamPredictor``. Sizes (input,
    embedding, mask) are read from the model, so small presets work as well
    as ``sam_huge_sa1b``. Prompts are decoded by a
    :class:`~sam_backend.sam.decoder.ClickDecoder` (keras-hub's prompt
    encoder and mask decoder in plain torch, with what does not depend on
    the prompt computed once), except in :meth:`decode_tensors`, which
    trains through keras-hub's own layers.

    Args:
        model: a ``keras_hub.models.SAMImageSegmenter``.
        preset: the name it was loaded from (for logs and model versions).
        device: torch device to run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``);
            None lets keras choose (CUDA when present).
        preset_dir: the local directory the preset was loaded from, if any
            (hashing its files identifies the weights cheaply).

    Example:
        >>> engine = SamEngine.from_preset("sam_base_sa1b")  # doctest: +SKIP
        >>> emb = engine.encode(load_image("street.jpg"))  # doctest: +SKIP
        >>> pred = engine.decode(emb, points=[[400, 300]], labels=[1])  # doctest: +SKIP
        >>> pred.mask.shape, pred.score  # doctest: +SKIP
        ((720, 1280), 0.97)
    """

    def __init__(
        self,
        model,
        preset: str = "custom",
        device: str | None = None,
        preset_dir: str | None = None,
    ):
        self.model = model
        self.preset = preset
        self.device = device or os.environ.get("SAM_DEVICE") or None
        backbone = model.backbone
        self._encoder = backbone.image_encoder
        self._prompt_encoder = backbone.prompt_encoder
        self._mask_decoder = backbone.mask_decoder
        self.input_size = int(self._encoder.input.shape[1])
        self.embedding_size = tuple(int(d) for d in self._encoder.output.shape[1:3])
        self.embedding_channels = int(self._encoder.output.shape[-1])
        self.mask_input_size = tuple(4 * d for d in self.embedding_size)
        self.encoder_calls = 0
        self.load_seconds: float | None = None
        self.stats = EngineStats()
        self.preset_dir = preset_dir
        # The torch click decoder: built at the first decode (None: not yet; False: keras-hub's path).
        self._click_decoder: ClickDecoder | None | bool = None
        self._click_decoder_lock = threading.Lock()
        #: The image encoder's precision (torch autocast's dtype name). float32 unless something that
        #: checked a reduced one gives float32's masks set it (``sam_backend.accel.precision``); the
        #: embedding store keys carry it, so embeddings of different precisions never mix.
        self.precision = "float32"
        #: What that check measured, for logs and benchmarks (None when none ran).
        self.parity = None

    @classmethod
    def from_preset(cls, preset: str, device: str | None = None, **kwargs) -> "SamEngine":
        """Load ``preset`` (anything keras-hub accepts, or a shipped name) into an engine.

        Raises:
            PresetLoadError: the preset cannot be loaded; the message says what
                was tried and how to use a local preset.
        """
        started = time.perf_counter()
        with device_scope(device or os.environ.get("SAM_DEVICE")):
            model = load_segmenter(preset)
        resolved = resolve_preset(preset)
        kwargs.setdefault("preset_dir", resolved if os.path.isdir(resolved) else None)
        engine = cls(model, preset=preset, device=device, **kwargs)
        engine.load_seconds = time.perf_counter() - started
        logger.info(
            "Loaded %s in %.1fs: input %d px, embedding %s, mask input %s, device %s",
            preset,
            engine.load_seconds,
            engine.input_size,
            engine.embedding_size,
            engine.mask_input_size,
            engine.device_name,
        )
        return engine

    @property
    def device_name(self) -> str:
        """The torch device inference runs on."""
        import keras

        with device_scope(self.device):
            return str(keras.ops.convert_to_tensor(0.0).device)

    def warm_up(self) -> None:
        """Pay the model's one-time costs now, so that the first annotator does not.

        Encodes one blank image at the model's input size (torch's and
        oneDNN's first-call costs of the image encoder: kernel selection,
        allocations) and decodes each kind of prompt on it (points, negative
        points, a box, box and points, a refinement with ``mask_input``,
        several boxes), upsampling a mask as a click does. Then checks that
        the torch click decoder gives keras-hub's masks, and falls back to
        keras-hub's layers if it does not (see :meth:`_get_click_decoder`).
        Nothing here counts as an encode or a click in :attr:`stats` or
        :attr:`encoder_calls`.
        """
        size = self.input_size
        started = time.perf_counter()
        features = self.encode_features(preprocess(np.zeros((size, size, 3), np.uint8), size)[None])
        encoded = time.perf_counter()
        embedding = Embedding(features=features, frame=Frame.for_image((size, size), size))
        center, corner = [size / 2, size / 2], [size / 4, size / 4]
        box = np.array([size / 8, size / 8, size * 5 / 8, size * 5 / 8], np.float32)
        prompts = [
            dict(points=[center], labels=[1]),
            dict(points=[center, corner], labels=[1, 0]),
            dict(box=box),
            dict(points=[center, corner], labels=[1, 0], box=box),
        ]
        for prompt in prompts:
            prompt = validate_prompt(prompt.get("points"), prompt.get("labels"), prompt.get("box"), (size, size))
            prediction = self.decode_uncounted(embedding, *prompt)
            prediction.mask  # noqa: B018  (the upsampling to the image size)
        self.decode_uncounted(embedding, *prompt, mask_input=prediction.low_res_logits[0]).mask  # a refinement click
        self._decode_boxes(embedding, [box, box + 1])
        logger.info(
            "Warm-up: first encode %.2fs, decodes %.2fs",
            encoded - started, time.perf_counter() - encoded,
        )

    @cached_property
    def device_type(self) -> str:
        """``cpu``, ``cuda``... (what autocast needs)."""
        return self.device_name.split(":")[0]

    # ---------------------------------------------------------------- encode

    def encode(self, image: ImageSource) -> Embedding:
        """Run the image encoder (only) on an image.

        Args:
            image: an ``(H, W, 3)`` uint8 RGB array, or anything
                :func:`sam_backend.sam.images.load_image` accepts.
        """
        rgb = image if _is_rgb_uint8(image) else load_image(image)
        frame = Frame.for_image(rgb.shape[:2], self.input_size)
        self.stats.in_flight.inc()
        try:
            with self.stats.encode_seconds.time():
                batch = preprocess(rgb, self.input_size)[None]
                features = self.encode_batch(batch)
        finally:
            self.stats.in_flight.dec()
        return Embedding(features=features, frame=frame)

    def encode_batch(self, batch: np.ndarray):
        """Image encoder on preprocessed ``(B, S, S, 3)`` inputs; torch features ``(B, h, w, C)``."""
        self.encoder_calls += 1
        return self.encode_features(batch)

    def encode_features(self, batch: np.ndarray, precision: str | None = None):
        """The image encoder at ``precision`` (default :attr:`precision`), not counted; float32 features.

        For warm-ups and checks that must not count as encodes.
        """
        import torch
        from keras import ops

        precision = precision or self.precision
        # Under autocast the encoder's matrix multiplies run in the reduced dtype; float32 needs no context.
        context = (contextlib.nullcontext() if precision == "float32"
                   else torch.autocast(device_type=self.device_type, dtype=getattr(torch, precision)))
        with torch.inference_mode(), device_scope(self.device), context:
            return self._encoder(ops.convert_to_tensor(batch, dtype="float32")).float()

    def encode_many(self, images: list[ImageSource]) -> list[Embedding]:
        """Encode several images in one encoder call, in order.

        On a GPU a batch of images costs little more than one; on a CPU it
        costs the same as one by one.
        """
        rgbs = [image if _is_rgb_uint8(image) else load_image(image) for image in images]
        if not rgbs:
            return []
        started = time.perf_counter()
        self.stats.in_flight.inc(len(rgbs))
        try:
            with self.stats.encode_seconds.time():
                features = self.encode_batch(np.stack([preprocess(rgb, self.input_size) for rgb in rgbs]))
        finally:
            self.stats.in_flight.dec(len(rgbs))
        logger.info("Encoded %d image(s) in one batch in %.2fs", len(rgbs), time.perf_counter() - started)
        return [Embedding(features[j : j + 1], Frame.for_image(rgb.shape[:2], self.input_size))
                for j, rgb in enumerate(rgbs)]

    # ---------------------------------------------------------------- decode

    def decode(
        self,
        embedding: Embedding,
        points=None,
        labels=None,
        box=None,
        mask_input=None,
        multimask: bool | None = None,
    ) -> Prediction:
        """Run the prompt encoder and mask decoder (only) on a stored embedding.

        Args:
            embedding: from :meth:`encode`.
            points: ``(N, 2)`` x/y pixel coordinates in the original image;
                points outside the image are clipped to its border.
            labels: ``(N,)`` 1 for foreground, 0 for background.
            box: ``(4,)`` ``x0, y0, x1, y1`` in pixels; at most one.
            mask_input: ``(h, w)`` low-resolution logits of an earlier
                prediction (``Prediction.low_res_logits[0]``), to refine it.
            multimask: return SAM's three candidate masks (True) or its single
                mask (False). None: three for a single point without a box, as
                SAM recommends for ambiguous prompts, one otherwise.

        Returns:
            A :class:`Prediction`, candidates sorted best first.

        Raises:
            PromptError: no prompt, mismatched points and labels, a label other
                than 0/1, a box of zero width or height, a mask of the wrong size.
        """
        frame = embedding.frame
        points, labels, box = validate_prompt(points, labels, box, frame.original_size)
        if mask_input is not None:
            mask_input = np.asarray(mask_input, dtype=np.float32)
            if mask_input.shape != self.mask_input_size:
                raise PromptError(
                    f"mask_input must be {self.mask_input_size} low-resolution logits; got {mask_input.shape}."
                )
        with self.stats.decode_seconds.time():
            return self.decode_uncounted(embedding, points, labels, box, mask_input, multimask)

    def decode_uncounted(self, embedding: Embedding, points, labels, box, mask_input=None,
                         multimask=None) -> Prediction:
        """:meth:`decode` of a prompt checked by :func:`validate_prompt`, not counted in :attr:`stats` (checks)."""
        frame = embedding.frame
        if multimask is None:
            multimask = len(points) == 1 and box is None
        model_points = frame.to_model(points)
        model_box = None if box is None else frame.to_model(box.reshape(2, 2))
        outputs = self._outputs(multimask)
        logits, iou = self._decode_outputs(
            embedding.features,
            model_points[None],
            labels[None],
            None if model_box is None else model_box[None, None],
            None if mask_input is None else mask_input[None],
            outputs,
        )
        logits, iou = logits[0], iou[0]
        scores = iou.cpu().numpy()
        order = np.argsort(-scores, kind="stable").tolist()
        logits = logits[order]
        return Prediction(
            scores=scores[order],
            low_res_logits=logits.cpu().numpy(),
            frame=frame,
            _logits_tensor=logits,
        )

    def decode_boxes(self, embedding: Embedding, boxes) -> list[Prediction]:
        """SAM's single mask for each of several boxes, decoded in one call.

        For pre-annotating a detector's boxes: one decoder call instead of one
        per box. Each box is validated as in :meth:`decode`.
        """
        frame = embedding.frame
        checked = [validate_prompt(None, None, box, frame.original_size)[2] for box in boxes]
        return self._decode_boxes(embedding, checked)

    def _decode_boxes(self, embedding: Embedding, boxes: list[np.ndarray]) -> list[Prediction]:
        """:meth:`decode_boxes` of validated ``(4,)`` boxes."""
        frame = embedding.frame
        if not boxes:
            return []
        model_boxes = np.stack([frame.to_model(np.asarray(box, np.float32).reshape(2, 2)) for box in boxes])[:, None]
        empty_points = np.zeros((len(boxes), 0, 2), np.float32)
        logits, iou = self._decode_outputs(
            embedding.features, empty_points, np.zeros((len(boxes), 0), np.float32), model_boxes, None, [0]
        )
        return [
            Prediction(scores=iou[i].cpu().numpy(), low_res_logits=logits[i].cpu().numpy(), frame=frame,
                       _logits_tensor=logits[i])
            for i in range(len(boxes))
        ]

    def decode_batch(self, features, points: np.ndarray, labels: np.ndarray, boxes=None, mask_inputs=None):
        """Prompt encoder and mask decoder for a batch of prompts on one embedding.

        Args:
            features: ``(1, h, w, C)`` embedding features.
            points: ``(B, N, 2)`` in model-frame pixels (N may be 0).
            labels: ``(B, N)``.
            boxes: ``(B, 1, 2, 2)`` in model-frame pixels, or None.
            mask_inputs: ``(B, h, w)`` low-resolution logits, or None.

        Returns:
            ``(logits (B, M, h, w), iou (B, M))`` torch tensors, all of SAM's
            ``M`` outputs (single-mask first, then the multimask ones). Without
            a box, the padding point (0, 0) with label -1 is appended here, as
            SAM's prompt encoder expects.
        """
        return self._decode_outputs(features, points, labels, boxes, mask_inputs, None)

    def _outputs(self, multimask: bool) -> list[int]:
        """The decoder outputs a prompt returns: SAM's multimask ones (1..3), or its single mask (0)."""
        count = int(self._mask_decoder.num_mask_tokens)
        return list(range(1, count)) if multimask else [0]

    def _decode_outputs(self, features, points, labels, boxes, mask_inputs, outputs):
        """Logits ``(B, K, h, w)`` and IoUs ``(B, K)`` of the decoder ``outputs`` (None: all), without autograd.

        Through the torch click decoder when it reproduces this model,
        through keras-hub's layers otherwise.
        """
        import torch

        with torch.inference_mode(), device_scope(self.device):
            decoder = self._get_click_decoder()
            if decoder:
                return self._fast_decode(decoder, features, points, labels, boxes, mask_inputs, outputs)
            logits, iou = self.decode_tensors(features, points, labels, boxes, mask_inputs)
            if outputs is not None:
                logits, iou = logits[:, outputs], iou[:, outputs]
            return logits.float(), iou.float()

    def _fast_decode(self, decoder: ClickDecoder, features, points, labels, boxes, mask_inputs, outputs=None):
        import torch

        points = torch.as_tensor(points, dtype=torch.float32, device=features.device)
        labels = torch.as_tensor(labels, dtype=torch.float32, device=features.device)
        if boxes is None:  # the padding point keras-hub's prompt encoder expects without a box
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        logits, iou = decoder(features.float(), points, labels, boxes, mask_inputs, outputs)
        return logits, iou if outputs is None else iou[:, outputs]

    def _get_click_decoder(self) -> ClickDecoder | bool:
        """The torch click decoder, built and checked once; False where it does not reproduce this model.

        Built at the first decode (:meth:`warm_up` in the server), and
        compared then with keras-hub's layers on a point prompt and on a
        box + points + mask prompt: a keras-hub release whose layers compute
        something else falls back to them instead of giving other masks.
        """
        if self._click_decoder is None:
            with self._click_decoder_lock:
                if self._click_decoder is None:
                    try:
                        decoder = ClickDecoder(self._prompt_encoder, self._mask_decoder)
                    except UnsupportedLayers as exc:
                        logger.warning("Decoding with keras-hub's layers: %s", exc)
                        decoder = False
                    if decoder:
                        worst = self._click_decoder_error(decoder)
                        if worst > 1.0:
                            logger.warning(
                                "The torch click decoder differs from keras-hub's layers (%.1fx the tolerance); "
                                "decoding with keras-hub's layers instead", worst,
                            )
                            decoder = False
                    self._click_decoder = decoder
        return self._click_decoder

    def _click_decoder_error(self, decoder: ClickDecoder) -> float:
        """The click decoder's largest difference from keras-hub's layers, in units of ``1e-3 + 1e-3 |x|``."""
        import torch

        device = self._prompt_encoder.no_mask_embed.embeddings.value.device
        generator = torch.Generator().manual_seed(0)
        features = torch.randn((1, *self.embedding_size, self.embedding_channels), generator=generator).to(device)
        mask = torch.randn((1, *self.mask_input_size), generator=generator).to(device)
        size = self.input_size
        points = np.array([[[size / 2, size / 2], [size / 4, size / 3]]], np.float32)
        labels = np.array([[1, 0]], np.float32)
        box = np.array([[[[size / 8, size / 8], [size * 5 / 8, size * 3 / 4]]]], np.float32)
        worst = 0.0
        with torch.inference_mode(), device_scope(self.device):
            for args in ((points, labels, None, None), (points, labels, box, mask)):
                expected = [t.float() for t in self.decode_tensors(features, *args)]
                got = self._fast_decode(decoder, features, *args)
                for e, g in zip(expected, got):
                    worst = max(worst, float(((e - g).abs() / (1e-3 + 1e-3 * e.abs())).max()))
        return worst

    def decode_tensors(self, features, points, labels, boxes=None, mask_inputs=None):
        """:meth:`decode_batch` with autograd left on, for training.

        Takes numpy arrays or torch tensors; ``features`` may hold one image
        (shared by all prompts) or one per prompt. Always keras-hub's own
        layers: gradients flow into their variables, and nothing is cached.
        """
        import torch
        from keras import ops

        tensor = lambda a: ops.convert_to_tensor(a, dtype="float32")  # noqa: E731
        points, labels = tensor(points), tensor(labels)
        batch = points.shape[0]
        if boxes is None:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
            boxes = torch.zeros((batch, 0, 2, 2), device=points.device)
        if mask_inputs is None:
            masks = torch.zeros((batch, 0, *self.mask_input_size, 1), device=points.device)
        else:
            masks = tensor(mask_inputs)[:, None, :, :, None]
        prompts = self._prompt_encoder(points=points, labels=labels, boxes=tensor(boxes), masks=masks)
        out = self._mask_decoder(image_embeddings=features, **prompts)
        return out["masks"], out["iou_pred"]

    # ------------------------------------------------------ decoder weights

    def decoder_weights(self) -> list[np.ndarray]:
        """The prompt encoder's and mask decoder's weights, in a fixed order (what project training changes).

        A few million numbers for the SA-1B presets, against some ninety
        million in the image encoder, which training never touches.
        """
        return [np.array(w.numpy()) for w in self._decoder_variables()]

    def _decoder_variables(self) -> list:
        return list(self._prompt_encoder.weights) + list(self._mask_decoder.weights)

    def with_decoder(self, weights: list[np.ndarray] | None = None) -> "SamEngine":
        """An engine sharing this one's image encoder (and its embeddings) with its own prompt encoder and mask decoder.

        For a project's trained decoder, and for training one: the copy's
        layers are keras-hub's own, rebuilt from their configs, holding
        ``weights`` (from :meth:`decoder_weights`; default: this engine's).
        Encode with this engine: an embedding serves every copy.

        Raises:
            ValueError: ``weights`` do not fit this model's decoder (another preset's).

        Example:
            >>> tuned = engine.with_decoder(saved_weights)  # doctest: +SKIP
            >>> tuned.decode(engine.encode(image), points=[[40, 30]], labels=[1]).mask  # doctest: +SKIP
        """
        import copy

        weights = self.decoder_weights() if weights is None else weights
        expected = [tuple(v.shape) for v in self._decoder_variables()]
        got = [tuple(np.shape(w)) for w in weights]
        if got != expected:
            raise ValueError(
                f"these decoder weights do not fit the model: {len(got)} arrays where it has {len(expected)}"
                + ("" if len(got) != len(expected) else ", of other shapes")
            )
        variant = copy.copy(self)
        with device_scope(self.device):
            layers = []
            for layer in (self._prompt_encoder, self._mask_decoder):
                clone = layer.__class__.from_config(layer.get_config())
                clone.build_from_config(layer.get_build_config())
                layers.append(clone)
        variant._prompt_encoder, variant._mask_decoder = layers
        for variable, value in zip(variant._decoder_variables(), weights):
            variable.assign(np.asarray(value, dtype=variable.dtype))
        variant._click_decoder = None
        variant._click_decoder_lock = threading.Lock()
        return variant

    def prepare_decoder(self) -> None:
        """Build and check the torch click decoder now, rather than at the first decode (a click)."""
        self._get_click_decoder()

    def decoder_parameters(self) -> list:
        """The torch parameters of the prompt encoder and mask decoder that training updates."""
        return [v.value for v in self._decoder_variables() if v.trainable]

    # --------------------------------------------------------------- predict

    def predict(self, image: ImageSource, **prompt) -> Prediction:
        """``decode(encode(image), **prompt)``: one prompt on an image encoded for it alone.

        To encode an image once for many prompts, keep the :class:`Embedding`
        (or use :class:`~sam_backend.embeddings.tiers.EmbeddingTiers`).
        """
        return self.decode(self.encode(image), **prompt)


def validate_prompt(points, labels, box, size: tuple[int, int]):
    """Check and normalise a prompt for an image of ``size`` ``(height, width)``.

    Returns ``(points (N, 2) float32, labels (N,) float32, box (4,) float32 or None)``
    with points clipped to the image and the box's corners ordered and clipped.

    Raises:
        PromptError: with a message that says what is wrong.
    """
    height, width = size
    points = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32)
    labels = np.zeros((0,), np.float32) if labels is None else np.asarray(labels, np.float32)
    if points.ndim != 2 or points.shape[1] != 2:
        raise PromptError(f"points must be a list of [x, y] pairs; got shape {points.shape}.")
    if labels.shape != (len(points),):
        raise PromptError(f"Got {len(points)} points but {labels.size} labels; give one label per point.")
    if not np.all(np.isin(labels, (0.0, 1.0))):
        raise PromptError("Point labels must be 1 (foreground) or 0 (background).")
    if not np.all(np.isfinite(points)):
        raise PromptError("Point coordinates must be finite numbers.")
    points = np.clip(points, 0.0, [float(width), float(height)]).astype(np.float32)
    if box is not None:
        box = np.asarray(box, np.float32).reshape(-1)
        if box.shape != (4,) or not np.all(np.isfinite(box)):
            raise PromptError("A box must be four finite numbers: x0, y0, x1, y1.")
        x0, x1 = sorted(np.clip(box[[0, 2]], 0.0, width))
        y0, y1 = sorted(np.clip(box[[1, 3]], 0.0, height))
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            raise PromptError(
                f"The box has zero width or height inside the {width}x{height} image "
                f"({x1 - x0:g} x {y1 - y0:g} px); draw a rectangle around the object."
            )
        box = np.array([x0, y0, x1, y1], np.float32)
    if len(points) == 0 and box is None:
        raise PromptError("No prompt: give at least one point or a box.")
    return points, labels, box


def _is_rgb_uint8(image) -> bool:
    return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def device_scope(device: str | None):
    """A keras device scope for ``device`` (``"cuda:1"``...), or no scope for None."""
    if not device:
        return contextlib.nullcontext()
    import_keras_hub()  # keras is imported with the right backend and quietly
    import keras

    return keras.device(device)
