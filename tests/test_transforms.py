"""Geometry between the image and the model frame (no model needed)."""

import numpy as np
import pytest
import torch

from sam_backend.sam.transforms import IMAGENET_MEAN, Frame, postprocess_logits, preprocess, resized_shape

SHAPES = {"landscape": (90, 200), "portrait": (200, 90), "larger_than_input": (700, 1100), "square": (64, 64)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_points_round_trip_through_the_model_frame(name):
    frame = Frame.for_image(SHAPES[name], 128)
    h, w = SHAPES[name]
    points = np.array([[0, 0], [w, h], [w / 3, h / 7], [w - 1, 0.5]], np.float32)
    np.testing.assert_allclose(frame.to_original(frame.to_model(points)), points, rtol=1e-5, atol=1e-3)
    model = frame.to_model(points)
    assert model[:, 0].max() <= frame.resized_size[1] + 1e-3 and model[:, 1].max() <= frame.resized_size[0] + 1e-3


def test_longest_side_resize_keeps_the_aspect_ratio():
    assert resized_shape((720, 1280), 1024) == (576, 1024)
    assert resized_shape((1280, 720), 1024) == (1024, 576)
    assert resized_shape((100, 333), 1024) == (308, 1024)
    assert resized_shape((4000, 3000), 1024) == (1024, 768)


def test_padding_is_the_imagenet_mean_bottom_right():
    image = np.full((50, 100, 3), 255, np.uint8)
    x = preprocess(image, 128)
    assert x.shape == (128, 128, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[:64, :128], 1.0)
    np.testing.assert_allclose(x[64:, :], np.broadcast_to(IMAGENET_MEAN, (64, 128, 3)))
    normalised = (x - IMAGENET_MEAN) / np.array([0.229, 0.224, 0.225], np.float32)
    assert np.abs(normalised[64:]).max() < 1e-6


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_masks_come_back_at_the_original_size_and_place(name):
    frame = Frame.for_image(SHAPES[name], 128)
    rh, rw = frame.resized_size
    low = torch.full((1, 32, 32), -10.0)
    # Positive in the top-left quarter of the image's own area of the model frame.
    low[0, : max(1, rh // 16), : max(1, rw // 16)] = 10.0
    mask = (postprocess_logits(low, frame) > 0).numpy()[0]
    h, w = SHAPES[name]
    assert mask.shape == (h, w)
    ys, xs = np.nonzero(mask)
    assert ys.max() < h * 0.3 and xs.max() < w * 0.3  # not transposed, not shifted
    assert mask[: int(h * 0.15), : int(w * 0.15)].mean() > 0.9


@pytest.mark.parametrize("name", ["landscape", "portrait"])
def test_padded_area_never_leaks_into_the_mask(name):
    frame = Frame.for_image(SHAPES[name], 128)
    rh, rw = frame.resized_size
    pad = torch.full((1, 128, 128), -10.0)
    pad[0, rh:, :] = 10.0
    pad[0, :, rw:] = 10.0
    low = torch.nn.functional.interpolate(pad[None], (32, 32), mode="nearest")[0]
    assert not (postprocess_logits(low, frame) > 0).any()
    assert (postprocess_logits(-low, frame) > 0).all()
