"""A small random-weight SAM 3 preset, so that the concept path can be tried and tested offline.

``sam3_pcs`` (849 M parameters) cannot be downloaded here. The tiny preset
has SAM 3's whole architecture at 32 channels (about 0.4 M parameters, a
112 px input), a CLIP byte-level tokenizer with a small vocabulary (every
byte, so any phrase tokenizes), and two weights scaled so that its random
detections are decisive (scores spread between 0 and 1 rather than all near
0.25): what it finds is arbitrary, but some of it passes the threshold, which
is what a test of the path needs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: The detector part of a Hugging Face SAM 3 config, at the smallest sizes the architecture allows.
TINY_DETECTOR_CONFIG = {
    "vision_config": {
        "backbone_config": {
            "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 112, "patch_size": 14, "window_size": 4, "global_attn_indexes": [1],
            "pretrain_image_size": 112, "hidden_act": "gelu", "rope_theta": 10000.0,
            "attention_dropout": 0.0, "hidden_dropout": 0.0, "layer_norm_eps": 1e-6,
        },
        "fpn_hidden_size": 32, "scale_factors": [4.0, 2.0, 1.0, 0.5],
    },
    "text_config": {
        "vocab_size": None, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    },
    "geometry_encoder_config": {
        "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "roi_size": 7,
        "hidden_act": "relu", "hidden_dropout": 0.0, "layer_norm_eps": 1e-6,
    },
    "detr_encoder_config": {
        "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "hidden_act": "relu", "dropout": 0.0, "layer_norm_eps": 1e-6,
    },
    "detr_decoder_config": {
        "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_queries": 20, "hidden_act": "relu", "dropout": 0.0, "layer_norm_eps": 1e-6,
    },
    "mask_decoder_config": {
        "num_upsampling_stages": 3, "hidden_size": 32, "num_attention_heads": 2, "layer_norm_eps": 1e-6,
    },
}

#: Words whose merges the tiny vocabulary holds (any other text falls back to bytes).
TINY_WORDS = ("cell", "cells", "bottle", "cat", "dog", "nucleus", "visual", "a", "the")


def tiny_vocabulary(words=TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte alphabet, its end-of-word forms, merges that spell ``words``, and the start and end tokens."""
    # CLIP's printable stand-ins for the 256 byte values (the byte-level BPE alphabet).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    vocabulary = {symbol: i for i, symbol in enumerate(symbols)}
    vocabulary.update({f"{symbol}</w>": 256 + i for i, symbol in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocabulary.setdefault(pair[0] + pair[1], len(vocabulary))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return vocabulary, merges


def build_tiny_backbone(seed: int = 0, vocabulary_size: int | None = None):
    """A randomly initialised ``SAM3PromptableConceptBackbone`` of :data:`TINY_DETECTOR_CONFIG`'s sizes."""
    import keras

    from sam_backend.sam.presets import import_keras_hub

    keras_hub = import_keras_hub()
    from keras_hub.src.utils.transformers.convert_sam3 import convert_backbone_config

    config = json.loads(json.dumps(TINY_DETECTOR_CONFIG))
    config["text_config"]["vocab_size"] = vocabulary_size or len(tiny_vocabulary()[0])
    keras.utils.set_random_seed(seed)
    cls = keras_hub.models.SAM3PromptableConceptBackbone
    backbone = cls(**convert_backbone_config({"detector_config": config}, cls))
    # Decisive random detections: spread the query scores, and say "present".
    scoring = backbone.dot_product_scoring.text_proj
    scoring.kernel.assign(scoring.kernel * 6.0)
    presence = backbone.detr_decoder.presence_head.layer3
    presence.bias.assign(presence.bias + 3.0)
    return backbone


def write_tiny_concept_preset(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny SAM 3 preset (keras-hub's format, with the tokenizer's assets) into ``directory``.

    Example:
        >>> write_tiny_concept_preset("/tmp/sam3-tiny")  # doctest: +SKIP
        PosixPath('/tmp/sam3-tiny')
    """
    target = Path(directory)
    vocabulary, merges = tiny_vocabulary()
    backbone = build_tiny_backbone(seed, len(vocabulary))
    target.mkdir(parents=True, exist_ok=True)
    backbone.save_to_preset(str(target))
    assets = target / "assets" / "tokenizer"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "vocabulary.json").write_text(json.dumps(vocabulary, ensure_ascii=False), encoding="utf-8")
    (assets / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    logger.info("Wrote a tiny SAM 3 preset (%d parameters, random weights) to %s", backbone.count_params(), target)
    return target
