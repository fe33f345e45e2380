"""SAM's prompt encoder and mask decoder in plain torch, on keras-hub's weights, for the click path.

Why: a click only runs keras-hub's ``SAMPromptEncoder`` and ``SAMMaskDecoder``,
and those redo on every click what does not depend on the prompt: the dense
positional grid of the image embedding (sines and cosines of 64x64 points),
the image embedding plus the "no mask" embedding, and that sum's first
projections in the two-way transformer. They also broadcast image-sized
tensors to the prompt batch, upsample through channels-first convolutions
between channels-last copies, compute every candidate mask when one or three
are sent, and pay keras' call overhead on some sixty layers. Here the same
arithmetic runs on the same weights (under keras' torch backend a layer's
variables are torch tensors), with what depends only on the weights computed
once per model and what depends only on the image once per image.

Results equal keras-hub's up to float rounding (summation order); the engine
checks that when it builds the decoder (in the server: at warm-up) and falls
back to keras-hub's layers if not. This is
inference only: training (``SamEngine.decode_tensors``) keeps keras-hub's
layers, and every cache here is keyed by the weights' version counters, so a
model trained between two clicks is never decoded with stale caches.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: Images whose prompt-independent first-layer projections are kept (about
#: 10 MB each for SA-1B's decoder): the annotator's current image, and a few
#: more for other annotators clicking at the same time.
DEFAULT_IMAGE_CACHE = 4


class UnsupportedLayers(Exception):
    """The keras-hub layers are not the ones this module reproduces (use keras-hub's own path)."""


@dataclass
class _Linear:
    weight: torch.Tensor  # (out, in), as F.linear takes it (a transposed view of keras' kernel)
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class _Norm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@dataclass
class _Attention:
    query: _Linear
    key: _Linear
    value: _Linear
    out: _Linear
    heads: int


@dataclass
class _Block:
    """One ``TwoWayMultiHeadAttention`` layer, plus its image-side projections stacked."""

    self_attention: _Attention
    token_to_image: _Attention
    image_to_token: _Attention
    norms: tuple[_Norm, _Norm, _Norm, _Norm]
    mlp: list
    skip_first_pe: bool
    # keys @ image_weight.T + image_bias == [key(keys + pe), value(keys), image_to_token.query(keys + pe)]
    image_weight: torch.Tensor
    image_bias: torch.Tensor


@dataclass
class _Weights:
    """Everything the decoder reads, taken from the keras layers once per weights version."""

    gaussian: torch.Tensor  # (2, C/2) random spatial frequencies
    input_size: tuple[int, int]  # (height, width) of the model input
    grid: tuple[int, int]  # (height, width) of the image embedding
    point: dict  # learned embeddings, (C,) each
    no_mask: torch.Tensor  # (C,)
    dense_pe: torch.Tensor  # (h*w, C) positional encoding of the embedding grid
    output_tokens: torch.Tensor  # (1 + M, C) IoU token, then M mask tokens
    blocks: list
    final: _Attention
    final_weight: torch.Tensor  # keys @ final_weight.T + final_bias == [key(keys + pe), value(keys)]
    final_bias: torch.Tensor
    final_norm: _Norm
    up1: _Linear  # first transposed convolution as a per-pixel linear map to 2x2 sub-pixels
    up_norm: _Norm
    up_act1: object
    up2: _Linear
    up_act2: object
    up_channels: tuple[int, int]
    hypernetworks: list
    iou_head: list
    mask_downscaler: object  # keras-hub's own layers: only refinement clicks use it


@dataclass
class _ImageEntry:
    features: weakref.ref
    keys: torch.Tensor  # (h*w, C) image embedding + no-mask embedding
    projected: torch.Tensor  # (h*w, 3D) the first block's image-side projections of keys


class ClickDecoder:
    """keras-hub's ``SAMPromptEncoder`` + ``SAMMaskDecoder`` as plain torch, for inference.

    Per model (recomputed when the weights change): the dense positional grid
    and its projections. Per image (a few recent images, when no
    ``mask_inputs`` are given): the image embedding plus the no-mask
    embedding, and its first-block projections. Per click: the rest, with
    only the requested candidate masks computed.

    Args:
        prompt_encoder: the model's ``keras_hub.layers.SAMPromptEncoder``.
        mask_decoder: the model's ``keras_hub.layers.SAMMaskDecoder``.
        image_cache: how many images' first-block projections to keep.

    Raises:
        UnsupportedLayers: the layers differ from what this reproduces
            (another keras-hub version, a mixed-precision policy...).

    Example:
        >>> decoder = ClickDecoder(backbone.prompt_encoder, backbone.mask_decoder)  # doctest: +SKIP
        >>> masks, iou = decoder(features, points, labels, outputs=[1, 2, 3])  # doctest: +SKIP
        >>> masks.shape, iou.shape  # doctest: +SKIP
        (torch.Size([1, 3, 256, 256]), torch.Size([1, 4]))
    """

    def __init__(self, prompt_encoder, mask_decoder, image_cache: int = DEFAULT_IMAGE_CACHE):
        self._prompt_encoder = prompt_encoder
        self._mask_decoder = mask_decoder
        self._image_cache = image_cache
        self._variables = list(prompt_encoder.weights) + list(mask_decoder.weights)
        for variable in self._variables:
            if str(variable.dtype) != "float32":
                raise UnsupportedLayers(f"{variable.path} is {variable.dtype}; only float32 is reproduced")
        for layer in (prompt_encoder, mask_decoder):
            if layer.compute_dtype != "float32":
                raise UnsupportedLayers(f"{layer.name} computes in {layer.compute_dtype}")
        self._lock = threading.Lock()
        self._version = None
        self._weights: _Weights | None = None
        self._images: OrderedDict[int, _ImageEntry] = OrderedDict()
        with torch.inference_mode():
            self._current()  # fail now, not at the first click, if the layers are not as expected

    @property
    def num_outputs(self) -> int:
        """How many masks the decoder predicts (SAM: 1 single-mask + 3 multimask)."""
        return self._mask_decoder.num_mask_tokens

    def __call__(self, features, points, labels, boxes=None, mask_inputs=None, outputs=None):
        """Candidate masks and all predicted IoUs for a batch of prompts on one image.

        Args:
            features: ``(1, h, w, C)`` image embedding (or ``(B, h, w, C)``).
            points: ``(B, N, 2)`` model-frame pixels, padding point included
                as keras-hub's prompt encoder expects (label -1).
            labels: ``(B, N)``: 1 foreground, 0 background, -1 padding.
            boxes: ``(B, n, 2, 2)`` model-frame corners (n is 0 or 1), or None.
            mask_inputs: ``(B, 4h, 4w)`` low-resolution logits, or None.
            outputs: which of the decoder's masks to compute (0: single-mask,
                1..3: multimask); None for all.

        Returns:
            ``(masks (B, len(outputs), 4h, 4w), iou (B, M))`` float32 torch
            tensors on the features' device; ``iou`` covers all M outputs.
        """
        with torch.inference_mode():
            w = self._current()
            device = features.device
            as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
            points, labels = as_tensor(points), as_tensor(labels)
            batch = points.shape[0]
            sparse = self._embed_points(w, points, labels)
            boxes = None if boxes is None else as_tensor(boxes)
            if boxes is not None and boxes.shape[1] > 0:
                sparse = torch.cat([sparse, self._embed_boxes(w, boxes)], dim=1)
            tokens = torch.cat([w.output_tokens.expand(batch, -1, -1), sparse], dim=1)
            keys, projected = self._image_side(w, features, None if mask_inputs is None else as_tensor(mask_inputs))
            queries, keys = self._transformer(w, tokens, keys, projected)
            outputs = list(range(self.num_outputs)) if outputs is None else list(outputs)
            masks = self._masks(w, queries, keys, outputs, batch)
            iou = _mlp(w.iou_head, queries[:, 0])
            return masks, iou

    # ------------------------------------------------------------ weights

    def _current(self) -> _Weights:
        """The weights, read again when any variable was replaced or changed in place."""
        version = tuple(_version(variable.value) for variable in self._variables)
        with self._lock:
            if version != self._version:
                self._weights = _read_weights(self._prompt_encoder, self._mask_decoder)
                self._images.clear()
                self._version = version
            return self._weights

    # ------------------------------------------------------------ prompt encoder

    @staticmethod
    def _encode_coordinates(w: _Weights, coords: torch.Tensor) -> torch.Tensor:
        # The operations of keras-hub's RandomFrequencyPositionalEmbeddings, in its order.
        normalized = torch.stack([coords[..., 0] / w.input_size[1], coords[..., 1] / w.input_size[0]], dim=-1)
        projected = (normalized * 2 - 1) @ w.gaussian * (2 * math.pi)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def _embed_points(self, w: _Weights, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoded = self._encode_coordinates(w, points + 0.5)
        labels = labels[..., None]
        embedded = torch.where(labels == 0, encoded + w.point["background"], encoded + w.point["foreground"])
        return torch.where(labels == -1, w.point["not_a_point"], embedded)

    def _embed_boxes(self, w: _Weights, boxes: torch.Tensor) -> torch.Tensor:
        corners = self._encode_coordinates(w, boxes + 0.5)
        corners = torch.stack(
            [corners[:, :, 0] + w.point["top_left"], corners[:, :, 1] + w.point["bottom_right"]], dim=2
        )
        return corners.reshape(boxes.shape[0], -1, corners.shape[-1])

    def _image_side(self, w: _Weights, features: torch.Tensor, mask_inputs):
        """The transformer's image tokens (embedding + dense prompt) and the first block's projections of them.

        Without a mask prompt both depend on the image only: they are kept
        for the few most recent images (keyed by the features tensor itself).
        """
        channels = features.shape[-1]
        if mask_inputs is not None:
            dense = w.mask_downscaler(mask_inputs[..., None])  # (B, h, w, C), keras-hub's layers
            keys = (features + dense).reshape(dense.shape[0], -1, channels)
            return keys, None
        if features.shape[0] != 1:
            return (features + w.no_mask).reshape(features.shape[0], -1, channels), None
        with self._lock:
            entry = self._images.get(id(features))
            if entry is not None and entry.features() is features:
                self._images.move_to_end(id(features))
                return entry.keys[None], entry.projected[None]
        keys = (features[0] + w.no_mask).reshape(-1, channels)
        block = w.blocks[0]
        projected = torch.addmm(block.image_bias, keys, block.image_weight.t())
        with self._lock:
            if self._weights is w:  # not read again meanwhile
                for key in [key for key, old in self._images.items() if old.features() is None]:
                    del self._images[key]  # images that are gone free their memory here
                self._images[id(features)] = _ImageEntry(weakref.ref(features), keys, projected)
                self._images.move_to_end(id(features))
                while len(self._images) > self._image_cache:
                    self._images.popitem(last=False)
        return keys[None], projected[None]

    # ------------------------------------------------------------ mask decoder

    def _transformer(self, w: _Weights, tokens, keys, projected):
        """keras-hub's TwoWayTransformer: returns the updated tokens and image tokens."""
        queries, token_pe = tokens, tokens
        for i, block in enumerate(w.blocks):
            if block.skip_first_pe:
                queries = _attend(block.self_attention, queries, queries, queries)
            else:
                with_pe = queries + token_pe
                queries = queries + _attend(block.self_attention, with_pe, with_pe, queries)
            queries = block.norms[0](queries)

            if i > 0 or projected is None:
                projected = _project(keys, block.image_weight, block.image_bias)
            key, value, image_query = projected.split(block.token_to_image.query.weight.shape[0], dim=-1)
            attention = block.token_to_image
            queries = block.norms[1](
                queries + _attend_projected(attention, attention.query(queries + token_pe), key, value)
            )
            queries = block.norms[2](queries + _mlp(block.mlp, queries))

            attention = block.image_to_token
            token_key = attention.key(queries + token_pe)
            token_value = attention.value(queries)
            keys = block.norms[3](keys + _attend_projected(attention, image_query, token_key, token_value))

        key, value = _project(keys, w.final_weight, w.final_bias).split(w.final.query.weight.shape[0], dim=-1)
        queries = w.final_norm(queries + _attend_projected(w.final, w.final.query(queries + token_pe), key, value))
        return queries, keys

    def _masks(self, w: _Weights, queries, keys, outputs: list[int], batch: int) -> torch.Tensor:
        """Upscale the image tokens and take their product with the hypernetworks of ``outputs`` only.

        Both transposed convolutions have kernel = stride = 2, so each maps
        one pixel to its own 2x2 block: the upscaling is a per-pixel MLP onto
        4x4 sub-pixels, and only the few masks are rearranged to the image
        grid, not the 32-channel upscaled embedding.
        """
        height, width = w.grid
        c1, c2 = w.up_channels
        x = w.up1(keys)  # (B, hw, 4 * c1)
        x = w.up_act1(w.up_norm(x.unflatten(-1, (4, c1))))  # (B, hw, 4, c1)
        x = w.up_act2(w.up2(x))  # (B, hw, 4, 4 * c2)
        x = x.reshape(x.shape[0], -1, c2)  # (B, hw * 16, c2)
        hyper = torch.stack([_mlp(w.hypernetworks[i], queries[:, 1 + i]) for i in outputs], dim=1)  # (B, K, c2)
        masks = hyper @ x.transpose(1, 2)  # (B, K, hw * 16)
        # (B, K, i, j, a1, b1, a2, b2) -> rows 4i + 2a1 + a2, columns 4j + 2b1 + b2
        masks = masks.reshape(batch, len(outputs), height, width, 2, 2, 2, 2)
        masks = masks.permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(batch, len(outputs), 4 * height, 4 * width)


# ---------------------------------------------------------------- helpers


def _version(tensor) -> tuple[int, int]:
    try:
        return id(tensor), tensor._version
    except RuntimeError:  # an inference tensor has no version counter: only replacing it is seen
        return id(tensor), 0


def _project(keys: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if keys.shape[0] == 1:
        return torch.addmm(bias, keys[0], weight.t())[None]
    return torch.matmul(keys, weight.t()) + bias


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend_projected(attention: _Attention, query, key, value) -> torch.Tensor:
    """keras-hub's MultiHeadAttentionWithDownsampling after its input projections."""
    query, key, value = (_split_heads(t, attention.heads) for t in (query, key, value))
    scale = math.sqrt(query.shape[-1])
    if query.shape[-2] <= key.shape[-2]:
        scores = torch.matmul(query, key.transpose(-1, -2)) / scale
        out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (B, heads, Nq, d)
        return attention.out(out.transpose(1, 2).flatten(2))
    # Image tokens attending to a few prompt tokens: a softmax over a last axis
    # of 7 is some 20x slower on CPU than over the second-last, so the scores
    # are laid out (prompt tokens, image tokens), as is the output.
    scores = torch.matmul(key, query.transpose(-1, -2)) / scale  # (B, heads, Nk, Nq)
    out = torch.matmul(value.transpose(-1, -2), torch.softmax(scores, dim=-2))  # (B, heads, d, Nq)
    return attention.out(out.flatten(1, 2).transpose(-1, -2))


def _attend(attention: _Attention, query, key, value) -> torch.Tensor:
    return _attend_projected(attention, attention.query(query), attention.key(key), attention.value(value))


def _mlp(layers: list, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


# ---------------------------------------------------------------- reading keras layers


def _tensor(variable) -> torch.Tensor:
    return variable.value.detach()


def _linear(dense) -> _Linear:
    import keras

    if not isinstance(dense, keras.layers.Dense) or dense.activation is not keras.activations.linear:
        raise UnsupportedLayers(f"expected a Dense layer without activation, got {dense!r}")
    return _Linear(_tensor(dense.kernel).t(), None if dense.bias is None else _tensor(dense.bias))


def _norm(layer) -> _Norm:
    import keras

    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    if not isinstance(layer, keras.layers.LayerNormalization) or layer.rms_scaling or axes != [-1]:
        raise UnsupportedLayers(f"expected a LayerNormalization over the last axis, got {layer!r}")
    return _Norm(
        _tensor(layer.gamma) if layer.scale else None, _tensor(layer.beta) if layer.center else None, layer.epsilon
    )


def _activation(function):
    """A keras activation as a torch function (keras' own for any but the two SAM uses)."""
    import keras

    if function is keras.activations.gelu:
        return F.gelu  # keras' default: the exact (erf) GELU
    if function is keras.activations.relu:
        return F.relu
    return function


def _sequential(model) -> list:
    """A keras Sequential of Dense and Activation layers as a list of torch callables."""
    import keras

    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Activation):
            layers.append(_activation(layer.activation))
        else:
            layers.append(_linear(layer))
    return layers


def _attention(layer) -> _Attention:
    return _Attention(
        _linear(layer.query_proj), _linear(layer.key_proj), _linear(layer.value_proj), _linear(layer.out_proj),
        layer.num_heads,
    )


def _transposed_conv(layer) -> _Linear:
    """A keras Conv2DTranspose with kernel = stride = 2 as a linear map of one pixel to its 2x2 block.

    keras' kernel is ``(kh, kw, out, in)`` and output pixel ``(2i + a, 2j + b)``
    gets ``sum_c x[i, j, c] * kernel[a, b, :, c]``; the linear map's outputs
    are ordered ``(a, b, out)``.
    """
    import keras

    if (
        not isinstance(layer, keras.layers.Conv2DTranspose)
        or tuple(layer.kernel_size) != (2, 2)
        or tuple(layer.strides) != (2, 2)
        or layer.padding != "valid"
        or layer.data_format != "channels_last"
        or tuple(layer.dilation_rate) != (1, 1)
        or layer.output_padding is not None
        or layer.activation is not keras.activations.linear
    ):
        raise UnsupportedLayers(f"expected a 2x2, stride-2 channels-last Conv2DTranspose, got {layer!r}")
    kernel = _tensor(layer.kernel)  # (2, 2, out, in)
    weight = kernel.reshape(-1, kernel.shape[-1]).contiguous()  # (4 * out, in), rows ordered (a, b, out)
    bias = None if layer.bias is None else _tensor(layer.bias).repeat(4)
    return _Linear(weight, bias)


def _stacked(weights: list[_Linear], pe: torch.Tensor, with_pe: list[bool]):
    """One weight and a per-position bias for several projections of the image tokens.

    ``keys @ weight.T + bias`` gives ``[linear(keys + pe) if with_pe else
    linear(keys)]`` side by side, with the positional part computed once here.
    """
    weight = torch.cat([linear.weight for linear in weights], dim=0).contiguous()
    biases = []
    for linear, add_pe in zip(weights, with_pe):
        bias = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
        biases.append(F.linear(pe, linear.weight, bias) if add_pe else bias.expand(pe.shape[0], -1))
    return weight, torch.cat(biases, dim=-1).contiguous()


def _read_weights(prompt_encoder, mask_decoder) -> _Weights:
    """Read (and precompute from) the layers' current weights; raises UnsupportedLayers."""
    import keras

    try:
        positional = prompt_encoder.positional_embedding_layer
        grid = tuple(int(d) for d in prompt_encoder.image_embedding_size)
        # keras-hub's own grid computation: it is what its path adds on every click.
        dense_pe = positional.encode_image(grid)
        dense_pe = torch.as_tensor(dense_pe).detach().reshape(grid[0] * grid[1], -1).contiguous()
        point = {
            name: _tensor(getattr(prompt_encoder, f"{name}_embed").embeddings)[0]
            for name in ("foreground_point", "background_point", "not_a_point", "top_left_corner",
                         "bottom_right_corner", "no_mask")
        }
        transformer = mask_decoder.transformer
        blocks = []
        for layer in transformer.layers:
            token_to_image = _attention(layer.cross_attention_token_to_image)
            image_to_token = _attention(layer.cross_attention_image_to_token)
            weight, bias = _stacked(
                [token_to_image.key, token_to_image.value, image_to_token.query], dense_pe, [True, False, True]
            )
            if not (token_to_image.key.weight.shape[0] == token_to_image.value.weight.shape[0]
                    == image_to_token.query.weight.shape[0] == token_to_image.query.weight.shape[0]):
                raise UnsupportedLayers("attention projections of different sizes")
            blocks.append(_Block(
                self_attention=_attention(layer.self_attention),
                token_to_image=token_to_image,
                image_to_token=image_to_token,
                norms=tuple(_norm(n) for n in (layer.layer_norm1, layer.layer_norm2, layer.layer_norm3,
                                                 layer.layer_norm4)),
                mlp=_sequential(layer.mlp_block.mlp_block),
                skip_first_pe=bool(layer.skip_first_layer_pos_embedding),
                image_weight=weight,
                image_bias=bias,
            ))
        final = _attention(transformer.final_attention_token_to_image)
        final_weight, final_bias = _stacked([final.key, final.value], dense_pe, [True, False])

        up = mask_decoder.output_upscaling.layers
        if len(up) != 5 or not isinstance(up[2], keras.layers.Activation) or not isinstance(
            up[4], keras.layers.Activation
        ):
            raise UnsupportedLayers("unexpected output upscaling layers")
        up1, up2 = _transposed_conv(up[0]), _transposed_conv(up[3])
        c1, c2 = up[0].filters, up[3].filters
        output_tokens = torch.cat(
            [_tensor(mask_decoder.iou_token.embeddings), _tensor(mask_decoder.mask_tokens.embeddings)], dim=0
        )
        return _Weights(
            gaussian=_tensor(positional.positional_encoding_gaussian_matrix),
            input_size=tuple(int(d) for d in prompt_encoder.input_image_size),
            grid=grid,
            point={
                "foreground": point["foreground_point"], "background": point["background_point"],
                "not_a_point": point["not_a_point"], "top_left": point["top_left_corner"],
                "bottom_right": point["bottom_right_corner"],
            },
            no_mask=point["no_mask"],
            dense_pe=dense_pe,
            output_tokens=output_tokens,
            blocks=blocks,
            final=final,
            final_weight=final_weight,
            final_bias=final_bias,
            final_norm=_norm(transformer.final_layer_norm),
            up1=up1,
            up_norm=_norm(up[1]),
            up_act1=_activation(up[2].activation),
            up2=up2,
            up_act2=_activation(up[4].activation),
            up_channels=(c1, c2),
            hypernetworks=[_sequential(mlp.mlp_block) for mlp in mask_decoder.output_hypernetworks_mlps],
            iou_head=_sequential(mask_decoder.iou_prediction_head.mlp_block),
            mask_downscaler=prompt_encoder.mask_downscaler,
        )
    except AttributeError as exc:
        raise UnsupportedLayers(f"keras-hub's SAM layers have changed: {exc}") from exc
