"""SAM architectures built from keras-hub's classes, with random weights.

One builder serves everything that needs a SAM without downloading one: the
demo preset's training, the tests' tiny model and the benchmarks' full-size
architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

from sam_backend.sam.presets import import_keras_hub


@dataclass(frozen=True)
class SamArchitecture:
    """The sizes that define a SAM of keras-hub's classes.

    Example:
        >>> arch = SamArchitecture(input_size=256, encoder_width=128, encoder_depth=6, encoder_heads=4,
        ...                        encoder_mlp=384, window_size=8, global_layers=(2, 5), embed_dim=128,
        ...                        decoder_heads=4, decoder_mlp=384)
        >>> model = build_sam(arch)  # doctest: +SKIP
    """

    input_size: int
    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    encoder_mlp: int
    window_size: int
    global_layers: tuple[int, ...]
    embed_dim: int
    decoder_heads: int
    decoder_mlp: int
    decoder_depth: int = 2
    patch_size: int = 16
    mask_in_channels: int = 16


def build_sam(arch: SamArchitecture, seed: int = 0):
    """A randomly initialised ``SAMImageSegmenter`` of ``arch`` (seeded, so reproducible)."""
    keras_hub = import_keras_hub()
    import keras

    keras.utils.set_random_seed(seed)
    size = arch.input_size
    grid = size // arch.patch_size
    encoder = keras_hub.models.ViTDetBackbone(
        hidden_size=arch.encoder_width,
        num_layers=arch.encoder_depth,
        intermediate_dim=arch.encoder_mlp,
        num_heads=arch.encoder_heads,
        global_attention_layer_indices=list(arch.global_layers),
        patch_size=arch.patch_size,
        num_output_channels=arch.embed_dim,
        window_size=arch.window_size,
        image_shape=(size, size, 3),
    )
    prompt_encoder = keras_hub.layers.SAMPromptEncoder(
        hidden_size=arch.embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(size, size),
        mask_in_channels=arch.mask_in_channels,
    )
    mask_decoder = keras_hub.layers.SAMMaskDecoder(
        num_layers=arch.decoder_depth,
        hidden_size=arch.embed_dim,
        intermediate_dim=arch.decoder_mlp,
        num_heads=arch.decoder_heads,
        embedding_dim=arch.embed_dim,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=arch.embed_dim,
    )
    backbone = keras_hub.models.SAMBackbone(
        image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder
    )
    return keras_hub.models.SAMImageSegmenter(backbone=backbone)
