"""Our transforms against Meta's reference ``segment_anything`` code (see :mod:`meta_reference`)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from meta_reference import install_torchvision_stand_in
from sam_backend.sam.transforms import Frame, postprocess_logits, preprocess

VIT_STD = np.array([0.229, 0.224, 0.225], np.float32)
VIT_MEAN = np.array([0.485, 0.456, 0.406], np.float32)


install_torchvision_stand_in()
segment_anything = pytest.importorskip("segment_anything")
from segment_anything.modeling import Sam  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

SIZES = [(90, 200), (200, 90), (700, 1100), (333, 100), (64, 64)]


def meta_sam(img_size: int):
    """The attributes of ``Sam`` that its preprocess/postprocess read, with Meta's constants."""
    return SimpleNamespace(
        image_encoder=SimpleNamespace(img_size=img_size),
        pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
        pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
    )


@pytest.mark.parametrize("size", SIZES)
def test_encoder_input_equals_sam_predictor(size):
    rng = np.random.default_rng(size[0])
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    transform = ResizeLongestSide(128)
    resized = transform.apply_image(image)
    meta = Sam.preprocess(meta_sam(128), torch.as_tensor(resized).permute(2, 0, 1).float()[None])[0]
    ours = (preprocess(image, 128) - VIT_MEAN) / VIT_STD  # what ViTDet computes first
    np.testing.assert_allclose(ours, meta.permute(1, 2, 0).numpy(), atol=2e-5)


@pytest.mark.parametrize("size", SIZES)
def test_prompt_coordinates_equal_sam_predictor(size):
    transform = ResizeLongestSide(1024)
    frame = Frame.for_image(size, 1024)
    points = np.array([[0.0, 0.0], [size[1] * 0.37, size[0] * 0.81], [size[1], size[0]]])
    np.testing.assert_allclose(frame.to_model(points), transform.apply_coords(points, size), rtol=1e-6)
    box = np.array([[5.0, 7.0, size[1] * 0.5, size[0] * 0.9]])
    np.testing.assert_allclose(frame.to_model(box.reshape(2, 2)).reshape(1, 4), transform.apply_boxes(box, size), rtol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_masks_equal_sam_postprocess(size):
    frame = Frame.for_image(size, 128)
    low = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    meta = Sam.postprocess_masks(meta_sam(128), low[None], frame.resized_size, size)[0]
    ours = postprocess_logits(low, frame)
    torch.testing.assert_close(ours, meta, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours > 0, meta > 0)
