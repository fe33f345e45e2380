"""keras-hub SAM architectures with random weights, for benchmarks (no download)."""

from __future__ import annotations

import sam_backend  # noqa: F401  (environment before keras)
from sam_backend.sam.architectures import SamArchitecture, build_sam


def _sa1b(width: int, depth: int, heads: int, global_layers: tuple[int, ...]) -> SamArchitecture:
    return SamArchitecture(
        input_size=1024, encoder_width=width, encoder_depth=depth, encoder_heads=heads, encoder_mlp=4 * width,
        window_size=14, global_layers=global_layers, embed_dim=256, decoder_heads=8, decoder_mlp=2048,
    )


# The published configurations of the SA-1B checkpoints (Kirillov et al., 2023).
VIT_CONFIGS = {
    "sam_base_sa1b": _sa1b(768, 12, 12, (2, 5, 8, 11)),
    "sam_large_sa1b": _sa1b(1024, 24, 16, (5, 11, 17, 23)),
    "sam_huge_sa1b": _sa1b(1280, 32, 16, (7, 15, 23, 31)),
}


def build_segmenter(name: str = "sam_base_sa1b", seed: int = 0):
    """A ``SAMImageSegmenter`` with the architecture of ``name`` and random weights."""
    return build_sam(VIT_CONFIGS[name], seed)
