"""keras-hub SAM architectures with random weights, for benchmarks (no download)."""

from __future__ import annotations

import sam_backend  # noqa: F401  (environment before keras)
from sam_backend.presets import import_keras_hub

# The published configurations of the SA-1B checkpoints (Kirillov et al., 2023).
VIT_CONFIGS = {
    "sam_base_sa1b": dict(hidden_size=768, num_layers=12, intermediate_dim=3072, num_heads=12,
                          global_attention_layer_indices=[2, 5, 8, 11]),
    "sam_large_sa1b": dict(hidden_size=1024, num_layers=24, intermediate_dim=4096, num_heads=16,
                           global_attention_layer_indices=[5, 11, 17, 23]),
    "sam_huge_sa1b": dict(hidden_size=1280, num_layers=32, intermediate_dim=5120, num_heads=16,
                          global_attention_layer_indices=[7, 15, 23, 31]),
}


def build_segmenter(name: str = "sam_base_sa1b", seed: int = 0):
    """A ``SAMImageSegmenter`` with the architecture of ``name`` and random weights."""
    keras_hub = import_keras_hub()
    import keras

    keras.utils.set_random_seed(seed)
    encoder = keras_hub.models.ViTDetBackbone(
        **VIT_CONFIGS[name], patch_size=16, num_output_channels=256, window_size=14,
        image_shape=(1024, 1024, 3),
    )
    prompt_encoder = keras_hub.layers.SAMPromptEncoder(
        hidden_size=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_channels=16
    )
    mask_decoder = keras_hub.layers.SAMMaskDecoder(
        num_layers=2, hidden_size=256, intermediate_dim=2048, num_heads=8, embedding_dim=256,
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    backbone = keras_hub.models.SAMBackbone(
        image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder
    )
    return keras_hub.models.SAMImageSegmenter(backbone=backbone)
