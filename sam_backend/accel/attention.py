"""Fused attention for the SAM image encoder (keras-hub's ViTDet).

keras-hub's ``MultiHeadAttentionWithRelativePE`` computes attention step by
step: ``q @ k^T``, plus the decomposed relative-position bias (one term per
row, one per column of the token grid), softmax, then ``@ v``. Each step
writes a full ``heads x HW x HW`` float tensor: for a ViT-B global-attention
block at 1024 px that is 12 x 4096 x 4096 floats, about 800 MB, allocated and
walked over several times per block. On a CPU the encoder spends most of its
attention time moving those tensors through memory.

:func:`fuse_vitdet_attention` replaces, on the layers of a loaded model, that
``call`` with ``torch.nn.functional.scaled_dot_product_attention`` taking the
relative-position bias as its additive mask: one fused kernel (scores, bias,
softmax and the product with ``v`` blockwise, never the whole score matrix)
instead of matmul + bias + softmax + matmul. The bias itself is built for a
block of query rows, heads and windows at a time (at most 16 MiB on a CPU:
three kernel calls per ViT-B windowed block, 48 per global block), so the
800 MB intermediates are gone and each bias is read while still in cache.

The blocks around those layers are patched too (:func:`_patch_blocks`, with a
fingerprint of their own): windowed blocks run their qkv and output
projections on the real tokens only, not on the window padding, and under
autocast (the bfloat16 encoder of :mod:`sam_backend.accel.precision`) every block
runs its linear layers in bfloat16 with the bias inside.

On CPUs with AVX-512, float32 inference goes one step further: the patched
layers and blocks hand queries, keys and values, as strided views of the qkv
projection, to :mod:`sam_backend.accel.attention_kernel`, whose C kernel adds the
bias from the relative-position tables itself (no bias tensor at all) and
writes its output in the layout the projection reads. SDPA remains the path
for everything else: bfloat16, GPUs, autograd, other CPUs.

Nothing else changes: the weights are keras-hub's own variables, read at each
call (so training updates them as usual), and presets load and save exactly as
before. A layer is only patched when its class's source is the one this code
reproduces (a fingerprint of keras-hub's source); any other keras-hub keeps
its own attention, with a warning. ``SAM_FUSED_ATTENTION=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import types

from sam_backend.accel import attention_kernel

logger = logging.getLogger(__name__)

#: Environment variable: ``0``, ``false``, ``off`` or ``no`` keep keras-hub's attention.
ENV_VAR = "SAM_FUSED_ATTENTION"

_OFF_VALUES = {"0", "false", "off", "no"}

#: The class whose ``call`` is replaced (matched by name, then by source fingerprint).
_TARGET_CLASS = "MultiHeadAttentionWithRelativePE"

#: sha256 of the source of ``MultiHeadAttentionWithRelativePE.call``,
#: ``AddRelativePositionalEmbedding.call`` and ``AddRelativePositionalEmbedding._get_rel_pos``
#: (concatenated, in that order) whose math :func:`_fused_forward` reproduces.
#: Recorded for keras-hub 0.32.0; any release with the same source matches too.
KNOWN_SOURCE_FINGERPRINTS = frozenset({
    "faba7afbd5f8ee1f2c1a212ca224efbebcf990a65d55129de5b6f12b819972f2",
})

#: Upper bound on the bytes of relative-position bias built at once. Query rows,
#: heads and batch items (windows) are processed in chunks so that the bias of
#: a global block (800 MB at ViT-B, 1024 px, batch 1) never exists whole, and
#: each chunk is still in cache when the kernel reads it. On a 2-core Xeon
#: (2 MiB L2 per core) 12-17 MiB chunks made a ViT-B global block 15-20 %
#: faster than 50-256 MiB ones, and windowed blocks (1.8 MiB per window) too;
#: 1-4 MiB chunks were slower again (more, smaller kernel calls).
_CPU_BIAS_CHUNK_BYTES = 16 << 20
_ACCELERATOR_BIAS_CHUNK_BYTES = 1 << 30

# Marks a patched layer (the original ``call`` stays the class's).
_PATCH_MARK = "_sam_fused_attention"
_BLOCK_PATCH_MARK = "_sam_fast_block"

#: The ViTDet block class whose ``call`` is replaced: windowed blocks skip the
#: window padding in their projections, and under autocast every block runs
#: its linear layers in autocast's dtype, bias included.
_BLOCK_CLASS = "WindowedTransformerEncoder"

#: sha256 of ``WindowedTransformerEncoder.call``, ``WindowPartitioning.partition``,
#: ``WindowPartitioning.unpartition`` and ``MLP.call`` (concatenated) whose math
#: :func:`_block_forward` reproduces; keras-hub 0.32.0.
KNOWN_BLOCK_FINGERPRINTS = frozenset({
    "c6115423d3ca6e44ad599a1c729c2f5e67739b3273c1ed2585facb65d85c7378",
})


def fused_attention_enabled() -> bool:
    """Whether the fused attention is wanted: ``SAM_FUSED_ATTENTION`` is not ``0``/``false``/``off``/``no``.

    Default on (variable unset or any other value).

    Example:
        >>> os.environ["SAM_FUSED_ATTENTION"] = "off"
        >>> fused_attention_enabled()
        False
        >>> del os.environ["SAM_FUSED_ATTENTION"]
        >>> fused_attention_enabled()
        True
    """
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES


def fuse_vitdet_attention(model_or_layer, enabled: bool | None = None) -> int:
    """Make keras-hub's ViTDet attention layers in ``model_or_layer`` use one fused SDPA call.

    Walks every layer under ``model_or_layer`` (a ``SAMImageSegmenter``, its
    backbone, a ``ViTDetBackbone`` or a single attention layer) and patches
    each ``MultiHeadAttentionWithRelativePE`` whose source and attributes are
    those this module reproduces. The patch is per instance: other models, and
    the class, are untouched. Calling it again on a patched model patches
    nothing twice.

    Args:
        model_or_layer: any keras layer or model.
        enabled: patch (True) or not (False); None reads ``SAM_FUSED_ATTENTION``
            (see :func:`fused_attention_enabled`).

    Returns:
        The number of attention layers under ``model_or_layer`` that now run
        the fused path (those patched by an earlier call included); 0 when
        disabled, when the backend is not torch, or when keras-hub's source
        differs (then a warning says keras-hub's own attention is used).

    Example:
        >>> model = keras_hub.models.SAMImageSegmenter.from_preset("sam_base_sa1b")  # doctest: +SKIP
        >>> fuse_vitdet_attention(model)  # doctest: +SKIP
        12
    """
    if enabled is None:
        enabled = fused_attention_enabled()
    if not enabled:
        logger.info("Fused attention is off (%s); keras-hub's own attention is used.", ENV_VAR)
        return 0
    layers = [layer for layer in _all_layers(model_or_layer) if type(layer).__name__ == _TARGET_CLASS]
    if not layers:
        return 0

    import keras

    if keras.backend.backend() != "torch":
        logger.warning("Fused attention needs KERAS_BACKEND=torch (got %s); keras-hub's own attention is used.",
                       keras.backend.backend())
        return 0

    fused, newly, refused = 0, 0, {}
    for layer in layers:
        if getattr(layer, _PATCH_MARK, False):
            fused += 1
            continue
        reason = _mismatch(layer)
        if reason:
            refused.setdefault(reason, 0)
            refused[reason] += 1
            continue
        layer.call = types.MethodType(_patched_call, layer)
        setattr(layer, _PATCH_MARK, True)
        fused += 1
        newly += 1
    if refused:
        # One warning per model, not per layer: the reason is the same for all.
        logger.warning(
            "Fused attention not applied to %d ViTDet attention layer(s) (%s); keras-hub's own attention is used.",
            sum(refused.values()), "; ".join(refused),
        )
    if newly:
        logger.info("Fused attention (torch scaled_dot_product_attention) in %d ViTDet attention layer(s).", newly)
    _patch_blocks(model_or_layer)
    return fused


def unfuse_vitdet_attention(model_or_layer) -> int:
    """Undo :func:`fuse_vitdet_attention`: the layers use keras-hub's ``call`` again.

    Returns the number of layers restored.

    Example:
        >>> fuse_vitdet_attention(model), unfuse_vitdet_attention(model)  # doctest: +SKIP
        (12, 12)
    """
    restored = 0
    for layer in _all_layers(model_or_layer):
        if getattr(layer, _BLOCK_PATCH_MARK, False):
            del layer.call
            setattr(layer, _BLOCK_PATCH_MARK, False)
        if getattr(layer, _PATCH_MARK, False):
            del layer.call  # the instance attribute; the class's method shows through again
            setattr(layer, _PATCH_MARK, False)
            restored += 1
    return restored


# ------------------------------------------------------------------ checks


def source_fingerprint(cls) -> str | None:
    """sha256 of the source that :func:`_fused_forward` reproduces, for attention class ``cls``.

    None when the source cannot be read (then nothing is patched).

    Example:
        >>> from keras_hub.src.models.vit_det.vit_layers import MultiHeadAttentionWithRelativePE
        >>> source_fingerprint(MultiHeadAttentionWithRelativePE) in KNOWN_SOURCE_FINGERPRINTS  # doctest: +SKIP
        True
    """
    try:
        rel_cls = _rel_pe_class(cls)
        parts = [inspect.getsource(cls.call), inspect.getsource(rel_cls.call), inspect.getsource(rel_cls._get_rel_pos)]
    except (AttributeError, ImportError, OSError, TypeError):
        return None
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()


def _rel_pe_class(cls):
    """The relative-position class next to ``cls`` in keras-hub's module."""
    module = inspect.getmodule(cls)
    return module.AddRelativePositionalEmbedding


def _mismatch(layer) -> str | None:
    """Why ``layer`` is not the layer the fused path reproduces; None when it is."""
    if "call" in vars(layer):
        return "call already replaced by someone else"
    if source_fingerprint(type(layer)) not in KNOWN_SOURCE_FINGERPRINTS:
        return "keras-hub's attention source differs from the one the fused path reproduces"
    try:
        heads, key_dim = layer.num_heads, layer.key_dim
        width = heads * key_dim
        if not (isinstance(heads, int) and isinstance(key_dim, int) and heads > 0 and key_dim > 0):
            return "num_heads/key_dim are not positive integers"
        if not isinstance(layer.scale, (int, float)):
            return "scale is not a number"
        if not (layer.qkv.built and layer.projection.built):
            return "layer not built"
        if tuple(layer.qkv.kernel.shape) != (width, 3 * width):
            return f"qkv kernel shape {tuple(layer.qkv.kernel.shape)} != {(width, 3 * width)}"
        if tuple(layer.projection.kernel.shape) != (width, width):
            return f"projection kernel shape {tuple(layer.projection.kernel.shape)} != {(width, width)}"
        if layer.use_rel_pos:
            rows, cols = (int(d) for d in layer.input_size)
            rel = layer.add_decomposed_relative_pe
            if tuple(rel.rel_pos_h.shape) != (2 * rows - 1, key_dim):
                return f"rel_pos_h shape {tuple(rel.rel_pos_h.shape)} != {(2 * rows - 1, key_dim)}"
            if tuple(rel.rel_pos_w.shape) != (2 * cols - 1, key_dim):
                return f"rel_pos_w shape {tuple(rel.rel_pos_w.shape)} != {(2 * cols - 1, key_dim)}"
    except (AttributeError, TypeError, ValueError) as exc:
        return f"unexpected attributes ({exc})"
    if layer.dtype_policy.quantization_mode is not None:
        return "quantized layer"
    for dense in (layer.qkv, layer.projection):
        reason = _dense_mismatch(dense)
        if reason:
            return reason
    return None


def _all_layers(root) -> list:
    """``root`` and every layer under it, each once."""
    flatten = getattr(root, "_flatten_layers", None)
    if flatten is None:
        return []
    return list(flatten(include_self=True, recursive=True))


# ------------------------------------------------------------------ windowed blocks


def block_source_fingerprint(cls) -> str | None:
    """sha256 of the block source that :func:`_block_forward` reproduces; None if unreadable."""
    try:
        module = inspect.getmodule(cls)
        partitioning = module.WindowPartitioning
        parts = [inspect.getsource(cls.call), inspect.getsource(partitioning.partition),
                 inspect.getsource(partitioning.unpartition), inspect.getsource(module.MLP.call)]
    except (AttributeError, ImportError, OSError, TypeError):
        return None
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _patch_blocks(root) -> int:
    """Patch each ViTDet block whose attention runs the fused path; returns how many were patched now.

    - keras-hub pads a windowed block's normalised tokens up to whole windows
      (a 64x64 grid becomes 70x70 in 14x14 windows: 20 % more tokens) and runs
      the qkv and output projections on the padding too. The patched block
      projects only the real tokens: the qkv of a zero padding token is the
      qkv bias exactly, and the outputs at padded positions are cropped away,
      so nothing changes but the work (about 16 % of a ViT-B windowed block's
      qkv and projection multiplies).
    - Under autocast (the bfloat16 encoder), keras's ``Dense`` multiplies in
      bfloat16 but adds its float32 bias after, so each layer's output goes
      back to float32 and is cast again by the next one: the patched blocks
      run qkv, projection and MLP as one bfloat16 ``linear`` each (bias
      included) and the MLP's GELU in bfloat16 (a ViT-B MLP: 39 to 24 ms).
      Without autocast they call keras's layers as keras-hub does.
    """
    patched, refused = 0, set()
    for block in _all_layers(root):
        if type(block).__name__ != _BLOCK_CLASS or getattr(block, _BLOCK_PATCH_MARK, False):
            continue
        if not getattr(getattr(block, "attention", None), _PATCH_MARK, False):
            continue  # its attention stays keras-hub's (already said), so does the block
        reason = _block_mismatch(block)
        if reason:
            refused.add(reason)
            continue
        block.call = types.MethodType(_patched_block_call, block)
        setattr(block, _BLOCK_PATCH_MARK, True)
        patched += 1
    if refused:
        logger.warning("ViTDet blocks keep keras-hub's own call (%s).", "; ".join(sorted(refused)))
    return patched


def _block_mismatch(block) -> str | None:
    """Why ``block`` is not the block :func:`_block_forward` reproduces; None when it is."""
    try:
        if "call" in vars(block):
            return "call already replaced by someone else"
        if block_source_fingerprint(type(block)) not in KNOWN_BLOCK_FINGERPRINTS:
            return "keras-hub's block source differs from the one the patched block reproduces"
        if not isinstance(block.window_size, int) or block.window_size < 0:
            return "window size is not a non-negative integer"
        if block.window_size and block.window_partitioning.window_size != block.window_size:
            return "window sizes differ"
        if block.window_size and block.attention.use_rel_pos and tuple(
                int(d) for d in block.attention.input_size) != (block.window_size, block.window_size):
            return "relative positions not sized for one window"
        mlp = block.mlp_block
        layers = list(mlp.dense_net.layers)
        if [type(layer).__name__ for layer in layers] != ["Dense", "Activation", "Dense"] or mlp.activation != "gelu":
            return "MLP is not Dense, GELU, Dense"
        for dense in (layers[0], layers[2]):
            reason = _dense_mismatch(dense)
            if reason:
                return f"MLP {reason}"
    except (AttributeError, TypeError, ValueError) as exc:
        return f"unexpected attributes ({exc})"
    return None


def _dense_mismatch(layer) -> str | None:
    """Why keras ``Dense`` ``layer`` is not a plain ``x @ kernel + bias`` (what :func:`_dense` computes)."""
    import keras

    if getattr(layer, "activation", None) is not keras.activations.linear:
        return f"{layer.name} has an activation"
    if layer.dtype_policy.quantization_mode is not None or getattr(layer, "lora_enabled", False):
        return f"{layer.name} is quantized or has LoRA"
    if len(layer.kernel.shape) != 2:
        return f"{layer.name} kernel is not a matrix"
    return None


def _patched_block_call(self, x):
    """The patched block ``call``: :func:`_block_forward` for the tensors it handles, keras-hub's call otherwise."""
    import torch

    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.device.type != "meta"):
        return type(self).call(self, x)
    return _block_forward(self, x)


def _block_forward(block, x):
    """keras-hub's ``WindowedTransformerEncoder.call``: windowed projections on real tokens, autocast-aware linears.

    Residuals are added into the projections' outputs (:func:`_dense`), and
    where the attention kernel runs it reads the windows of the qkv projection
    in place (no padded copy) and writes the real tokens' output only.
    """
    import torch

    attention = block.attention
    if block.window_size == 0:
        normalised = block.layer_norm1(x)
        if _fusable(attention, normalised, torch):
            x = _fused_forward(attention, normalised, residual=x)  # the patched layer's own path, residual inside
        else:
            x = x + attention(normalised)
        return _mlp(block.mlp_block, block.layer_norm2(x), residual=x)

    qkv = _dense(attention.qkv, block.layer_norm1(x))
    if attention.use_rel_pos and attention_kernel.handles(qkv, attention.key_dim):
        # The kernel reads the windows in place and stands in for the padding itself.
        bias = attention.qkv.bias.value if attention.qkv.use_bias else None
        out = attention_kernel.rel_attention_windows(qkv, attention.num_heads, block.window_size,
                                                     *_tables(attention), attention.scale, bias)
    else:
        out = _windowed_attend(attention, qkv, block.window_size)
    x = _dense(attention.projection, out, residual=x)
    return _mlp(block.mlp_block, block.layer_norm2(x), residual=x)


def _windowed_attend(attention, qkv, size: int):
    """keras-hub's windowed attention on ``qkv`` ``(B, H, W, 3C)``: pad, partition, attend, merge, crop."""
    heads, key_dim = attention.num_heads, attention.key_dim
    batch, height, width, columns = qkv.shape
    pad_h, pad_w = (-height) % size, (-width) % size
    rows, cols = (height + pad_h) // size, (width + pad_w) // size
    if pad_h or pad_w:
        # keras-hub pads the normalised tokens with zeros; their qkv is the bias (or zero).
        bias = attention.qkv.bias.value if attention.qkv.use_bias else 0.0
        padded = qkv.new_empty((batch, height + pad_h, width + pad_w, columns))
        padded[:, height:] = bias
        padded[:, :height, width:] = bias
        padded[:, :height, :width] = qkv
        qkv = padded
    # (B, rows, size, cols, size, 3, heads, d) -> (3, B * rows * cols, heads, size * size, d):
    # keras-hub's window order (row-major over windows, then over the tokens of a window).
    windows = qkv.reshape(batch, rows, size, cols, size, 3, heads, key_dim).permute(5, 0, 1, 3, 6, 2, 4, 7)
    out = _attend(attention, windows.reshape(3, batch * rows * cols, heads, size * size, key_dim), size, size)
    # (B, rows, cols, heads, size, size, d) -> (B, rows, size, cols, size, heads, d), then crop the padding.
    out = out.reshape(batch, rows, cols, heads, size, size, key_dim).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch, rows * size, cols * size, heads * key_dim)[:, :height, :width]


def _dense(layer, x, residual=None):
    """keras ``Dense`` ``layer`` on ``x``, plus ``residual`` when given.

    With autograd on, or an input not in the layer's weight dtype, keras's
    own call. Under autocast, one ``linear`` in autocast's dtype: it casts the
    input, the weights and the bias alike, so the bias is added inside the
    multiply (keras adds a float32 bias after a bfloat16 matmul). Otherwise
    one matrix multiply, then the bias and the residual added in place, into
    the product (no tensor per addition).
    """
    import torch
    import torch.nn.functional as F

    bias = layer.bias.value if layer.use_bias else None
    if torch.is_autocast_enabled(x.device.type):
        # As one matrix: a strided 4-D input (a cropped window grid) would make linear a batched matmul.
        out = F.linear(x.reshape(-1, x.shape[-1]), layer.kernel.value.t(), bias)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
    elif torch.is_grad_enabled() or x.dtype != layer.kernel.value.dtype:
        out = layer(x)  # keras's own: gradients, or a dtype policy's casts
    else:
        out = torch.mm(x.reshape(-1, x.shape[-1]), layer.kernel.value)
        if bias is not None:
            out.add_(bias)
        if residual is not None:
            return out.add_(residual.reshape(out.shape)).reshape(residual.shape)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return out if residual is None else residual + out


def _mlp(mlp, x, residual=None):
    """keras-hub's ``MLP`` (Dense, GELU, Dense) on ``x``, plus ``residual``; under autocast in its dtype throughout."""
    import torch
    import torch.nn.functional as F

    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        out = mlp(x)
        return out if residual is None else residual + out
    first, _, second = mlp.dense_net.layers
    hidden = _dense(first, x)
    # keras's "gelu" is the exact (erf) one; in place where no gradient needs the input.
    hidden = F.gelu(hidden) if torch.is_grad_enabled() else torch.ops.aten.gelu_(hidden)
    return _dense(second, hidden, residual)


# ------------------------------------------------------------------ fused path


def _patched_call(self, x):
    """The patched ``call``: the fused path for the inputs it reproduces, keras-hub's otherwise."""
    import torch

    if _fusable(self, x, torch):
        return _fused_forward(self, x)
    # Symbolic/meta tensors, or a token grid other than the one the layer was
    # built for (keras-hub's own code decides what happens then).
    return type(self).call(self, x)


def _fusable(layer, x, torch) -> bool:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.device.type == "meta":
        return False
    if layer.use_rel_pos and tuple(x.shape[1:3]) != tuple(int(d) for d in layer.input_size):
        return False
    return True


def _fused_forward(layer, x, residual=None):
    """keras-hub's attention math in the attention kernel, or with one SDPA call per chunk of the bias.

    Same as ``MultiHeadAttentionWithRelativePE.call``: scores ``(q * scale) @ k^T``
    plus ``rel_h[..., :, None] + rel_w[..., None, :]`` where ``rel_h``/``rel_w``
    are the *unscaled* queries against the gathered relative-position tables,
    softmax over keys, ``@ v``, heads merged back, output projection (plus
    ``residual`` when given, as a global block adds it). Windowed blocks
    unpatched by :func:`_patch_blocks` partition the image before calling the
    layer, so each window is a batch item here, as in keras-hub.
    """
    batch, height, width, channels = x.shape
    projected = _dense(layer.qkv, x)
    if layer.use_rel_pos and attention_kernel.handles(projected, layer.key_dim):
        out = attention_kernel.rel_attention_windows(projected, layer.num_heads, 0, *_tables(layer), layer.scale)
        return _dense(layer.projection, out, residual)
    # (B, HW, 3, heads, d) -> (3, B, heads, HW, d), keras-hub's order of the qkv columns.
    qkv = projected.reshape(batch, height * width, 3, layer.num_heads, layer.key_dim).permute(2, 0, 3, 1, 4)
    out = _attend(layer, qkv, height, width)
    # (B, heads, HW, d) -> (B, H, W, heads * d), as keras-hub's transpose (0, 2, 3, 1, 4).
    out = out.permute(0, 2, 1, 3).reshape(batch, height, width, channels)
    return _dense(layer.projection, out, residual)


def _attend(layer, qkv, height: int, width: int):
    """Attention of ``qkv`` ``(3, B, heads, HW, d)`` on a ``height x width`` token grid: ``(B, heads, HW, d)``."""
    import torch
    import torch.nn.functional as F

    queries, keys, values = qkv.unbind(0)
    batch, heads, tokens, key_dim = queries.shape
    if not layer.use_rel_pos:
        return F.scaled_dot_product_attention(queries, keys, values, scale=layer.scale)

    rel = layer.add_decomposed_relative_pe
    table_h = _relative_table(rel.rel_pos_h.value, height, queries.dtype, torch)
    table_w = _relative_table(rel.rel_pos_w.value, width, queries.dtype, torch)
    grid = queries.reshape(batch, heads, height, width, key_dim)
    # Contiguous, so that building the bias below is a plain streaming add.
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).contiguous()
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).contiguous()
    budget = _CPU_BIAS_CHUNK_BYTES if queries.device.type == "cpu" else _ACCELERATOR_BIAS_CHUNK_BYTES
    items, group, rows = _bias_chunks(batch, heads, height, width * tokens * queries.element_size(), budget)
    out = torch.empty_like(queries)
    # Each query's softmax runs over all keys, so splitting queries is exact.
    for b0 in range(0, batch, items):
        b1 = min(batch, b0 + items)
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            for top in range(0, height, rows):
                bottom = min(height, top + rows)
                bias = (rel_h[b0:b1, h0:h1, top:bottom, :, :, None]
                        + rel_w[b0:b1, h0:h1, top:bottom, :, None, :]).reshape(
                    b1 - b0, h1 - h0, (bottom - top) * width, tokens)
                queried = slice(top * width, bottom * width)
                out[b0:b1, h0:h1, queried] = F.scaled_dot_product_attention(
                    queries[b0:b1, h0:h1, queried], keys[b0:b1, h0:h1], values[b0:b1, h0:h1],
                    attn_mask=bias, scale=layer.scale,
                )
    return out


def _tables(layer):
    """The layer's relative-position tables ``(rel_pos_h, rel_pos_w)``, as the kernel takes them."""
    rel = layer.add_decomposed_relative_pe
    return rel.rel_pos_h.value, rel.rel_pos_w.value


def _bias_chunks(batch: int, heads: int, height: int, row_bytes: int, budget: int) -> tuple[int, int, int]:
    """How to split the bias of ``batch`` x ``heads`` x ``height`` query rows into kernel calls.

    ``row_bytes`` is the bias of one query row of one head of one batch item.
    Returns ``(batch items, heads, query rows)`` per call: whole rows first,
    then whole heads, then whole batch items while the bias stays within
    ``budget``; sizes are evened out (64 rows in 4 x 16, not 3 x 20 + 4).
    """
    def even(total: int, at_most: int) -> int:
        at_most = max(1, min(total, at_most))
        return -(-total // -(-total // at_most))

    rows = even(height, budget // max(1, row_bytes))
    if rows < height:
        return 1, 1, rows
    group = even(heads, budget // max(1, row_bytes * height))
    if group < heads:
        return 1, group, rows
    return even(batch, budget // max(1, row_bytes * height * heads)), heads, rows


def _relative_table(table, size: int, dtype, torch):
    """``table[i - j + size - 1]`` for query ``i`` and key ``j`` of a ``size``-long axis: ``(size, size, d)``.

    keras-hub's ``_get_rel_pos`` for equal query and key sizes matching the
    table (the only case the fused path takes).
    """
    positions = torch.arange(size, device=table.device)
    index = positions[:, None] - positions[None, :] + (size - 1)
    return table.to(dtype)[index]
