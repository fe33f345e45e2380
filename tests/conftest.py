"""Shared fixtures: a tiny random SAM of keras-hub's own architecture."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

import sam_backend  # noqa: F401  (environment before keras)
from sam_backend.presets import import_keras_hub

TINY_INPUT = 128


def build_tiny_segmenter(input_size: int = TINY_INPUT, seed: int = 0):
    """A randomly initialised SAMImageSegmenter small enough for unit tests."""
    keras_hub = import_keras_hub()
    import keras

    keras.utils.set_random_seed(seed)
    grid = input_size // 16
    encoder = keras_hub.models.ViTDetBackbone(
        hidden_size=16,
        num_layers=2,
        intermediate_dim=32,
        num_heads=2,
        global_attention_layer_indices=[1],
        patch_size=16,
        num_output_channels=8,
        window_size=4,
        image_shape=(input_size, input_size, 3),
    )
    prompt_encoder = keras_hub.layers.SAMPromptEncoder(
        hidden_size=8,
        image_embedding_size=(grid, grid),
        input_image_size=(input_size, input_size),
        mask_in_channels=16,
    )
    mask_decoder = keras_hub.layers.SAMMaskDecoder(
        num_layers=2,
        hidden_size=8,
        intermediate_dim=16,
        num_heads=2,
        embedding_dim=8,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=8,
    )
    backbone = keras_hub.models.SAMBackbone(
        image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder
    )
    return keras_hub.models.SAMImageSegmenter(backbone=backbone)


@pytest.fixture(scope="session")
def tiny_segmenter():
    return build_tiny_segmenter()


@pytest.fixture(scope="session")
def tiny_preset_dir(tmp_path_factory, tiny_segmenter):
    """The tiny model saved as a local keras-hub preset directory."""
    path = tmp_path_factory.mktemp("presets") / "tiny_sam"
    tiny_segmenter.save_to_preset(str(path))
    return path


@pytest.fixture()
def engine(tiny_segmenter):
    from sam_backend.engine import SamEngine

    return SamEngine(tiny_segmenter, preset="tiny")


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


def random_image(rng, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture()
def media(tmp_path):
    from media_server import MediaServer

    root = tmp_path / "media"
    root.mkdir()
    server = MediaServer(root)
    yield server
    server.close()
