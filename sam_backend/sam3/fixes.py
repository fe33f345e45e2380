"""Corrections to keras-hub 0.32's SAM 3, so that it computes what Meta's and Hugging Face's SAM 3 compute.

Each defect is written up for upstream in ``docs/concepts.md`` ("keras-hub's
SAM 3 defects"); each fix has a test that fails without it
(``tests/test_concepts_model.py``). :func:`apply_fixes` installs them on a
loaded backbone; the class-level ones are installed once per process and
change nothing for inputs that keras-hub already handled right.

1. The text encoder attends both ways; CLIP's text encoder (Meta's and
   Hugging Face's SAM 3 use it) is causal: a token sees only those before it.
2. Outside the vision encoder, keras-hub builds LayerNorms with the config's
   ``layer_norm_eps`` (1e-6) or a hard-coded 1e-6; the reference modules are
   ``nn.LayerNorm`` with torch's default 1e-5.
3. The geometry encoder's self-attention passes a ``(batch, keys)`` padding
   mask where ``(batch, heads, queries, keys)`` is broadcast: a batch of more
   than one image fails (and one of one works only by broadcasting luck).
4. On the torch backend, box prompts call ``torchvision.ops.roi_align``;
   :func:`sam_backend.sam3.roi_align.roi_align` computes the same in torch.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

#: torch's ``nn.LayerNorm`` default, which the reference's DETR, geometry and mask parts use.
REFERENCE_LAYER_NORM_EPSILON = 1e-5

_installed = False
_install_lock = threading.Lock()


def _causal_text_encoder_call(self, token_ids, padding_masks, training=None):
    """``SAM3TextEncoder.call`` with CLIP's causal mask combined with the padding mask."""
    from keras import ops

    x = self.embedding(token_ids, training=training)
    length = ops.shape(x)[1]
    causal = ops.tril(ops.ones((length, length), dtype="bool"))
    valid = ops.cast(padding_masks, "bool")
    mask = ops.logical_and(causal[None, :, :], valid[:, None, :])  # (batch, queries, keys)
    for layer in self.encoder_layers:
        x = layer(x, mask, training=training)
    return self.layer_norm(x)


def _attention_with_key_padding(stock_call):
    def call(self, query, key, value, attention_mask=None, attention_bias=None, training=None):
        if attention_mask is not None and len(attention_mask.shape) == 2:
            attention_mask = attention_mask[:, None, None, :]  # (batch, keys) -> (batch, 1, 1, keys)
        return stock_call(self, query, key, value, attention_mask=attention_mask,
                          attention_bias=attention_bias, training=training)

    call.__doc__ = "SAM3Attention.call with a ``(batch, keys)`` mask taken as a key padding mask."
    return call


def _roi_align_without_torchvision(feature_maps, rois, output_size, height, width, hidden_dim,
                                   spatial_scale=1.0, aligned=False):
    """keras-hub's ``roi_align`` signature, computed by :func:`sam_backend.sam3.roi_align.roi_align`."""
    from sam_backend.sam3.roi_align import roi_align

    return roi_align(feature_maps, rois, output_size, spatial_scale=spatial_scale, aligned=aligned)


def install_class_fixes() -> None:
    """Patch keras-hub's SAM 3 classes (defects 1, 3 and 4); once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from keras_hub.src.models.sam3 import sam3_geometry_encoder, sam3_layers, sam3_text_encoder

        sam3_text_encoder.SAM3TextEncoder.call = _causal_text_encoder_call
        sam3_layers.SAM3Attention.call = _attention_with_key_padding(sam3_layers.SAM3Attention.call)
        sam3_geometry_encoder.roi_align = _roi_align_without_torchvision
        _installed = True
        logger.debug("Installed the SAM 3 fixes in keras-hub's classes")


def match_layer_norms(backbone) -> int:
    """Give every LayerNorm outside the vision and text encoders the reference epsilon (defect 2).

    Returns:
        How many LayerNorms changed.
    """
    import keras

    changed = 0
    for part in (backbone.geometry_encoder, backbone.detr_encoder, backbone.detr_decoder,
                 backbone.mask_decoder, backbone.dot_product_scoring):
        for layer in part._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, keras.layers.LayerNormalization) and layer.epsilon != REFERENCE_LAYER_NORM_EPSILON:
                layer.epsilon = REFERENCE_LAYER_NORM_EPSILON
                changed += 1
    return changed


def apply_fixes(backbone) -> None:
    """Make a loaded ``SAM3PromptableConceptBackbone`` compute what the reference computes."""
    install_class_fixes()
    changed = match_layer_norms(backbone)
    logger.debug("Set the epsilon of %d LayerNorms to %g", changed, REFERENCE_LAYER_NORM_EPSILON)
