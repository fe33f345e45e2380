"""The numpy brush RLE against label-studio-sdk's own encoder and decoder."""

import doctest

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from sam_backend.labelstudio import rle
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.regions import mask_to_brush_region
from sam_backend.labelstudio.rle import mask_to_rle


def sdk(mask: np.ndarray) -> list[int]:
    """What the backend sent before: the SDK's encoding of the mask as 0/255."""
    return mask2rle(np.where(mask != 0, 255, 0).astype(np.uint8))


def assert_same(mask: np.ndarray) -> list[int]:
    ours = mask_to_rle(mask)
    expected = sdk(mask)
    assert type(ours) is list and all(type(b) is int for b in ours[:100])
    # Not `==` alone: on failure, say where the streams part.
    if ours != expected:
        at = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
        pytest.fail(f"{mask.shape} mask: {len(ours)} bytes vs the SDK's {len(expected)}, first difference at byte {at}")
    return ours


def ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:height, :width]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999])
def test_noise_matches_the_sdk(density):
    rng = np.random.default_rng(int(density * 1000))
    assert_same(rng.random((97, 203)) < density)


def test_full_hd_noise_matches_the_sdk():
    # Odd sizes so that rows do not line up with bytes; the SDK takes about a second here.
    assert_same(np.random.default_rng(1).random((1081, 1921)) < 0.5)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 2), (2, 1), (1, 37), (37, 1), (7, 13), (64, 64), (1080, 1920), (1081, 1921)]
)
@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full_masks_match_the_sdk(shape, fill):
    # A full-HD uniform mask is one run of 8.3 M values: 127 blocks of at most 2**16.
    assert_same(np.full(shape, fill))


# Run lengths in pixels around the block types' limits (in values, x4: 8, 16, 256, 2**16).
@pytest.mark.parametrize("run", [1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32767, 32768, 32769, 49153])
@pytest.mark.parametrize("where", ["start", "middle", "end", "alone"])
def test_runs_at_the_limits_of_each_block_type_match_the_sdk(run, where):
    pad = {"start": (0, 3), "middle": (2, 5), "end": (7, 0), "alone": (0, 0)}[where]
    mask = np.zeros((1, pad[0] + run + pad[1]), dtype=bool)
    mask[0, pad[0]:pad[0] + run] = True
    assert_same(mask)
    assert_same(~mask)


def test_single_pixels_and_thin_lines_match_the_sdk():
    for y, x in [(0, 0), (0, 12), (8, 0), (8, 12), (4, 6)]:
        mask = np.zeros((9, 13), dtype=bool)
        mask[y, x] = True
        assert_same(mask)
    lines = np.zeros((300, 500), dtype=bool)
    lines[150, :] = True
    assert_same(lines)
    lines[:, 250] = True
    assert_same(lines)
    assert_same(np.eye(400, 700, k=3, dtype=bool))


def test_smooth_shapes_match_the_sdk():
    rng = np.random.default_rng(7)
    for height, width in [(1080, 1920), (480, 640), (333, 501), (1, 1000), (1000, 1)]:
        for _ in range(4):
            mask = ellipse(height, width, rng.uniform(0, height), rng.uniform(0, width),
                           rng.uniform(1, height), rng.uniform(1, width))
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            mask[y0:y0 + rng.integers(1, height + 1), x0:x0 + rng.integers(1, width + 1)] ^= True
            assert_same(mask)


def test_bool_and_integer_masks_encode_alike():
    mask = ellipse(61, 89, 30, 40, 20, 35) | (np.random.default_rng(3).random((61, 89)) < 0.1)
    expected = assert_same(mask)
    assert mask_to_rle(mask.astype(np.uint8)) == expected
    assert mask_to_rle(mask.astype(np.uint8) * 255) == expected
    assert mask_to_rle(mask.astype(np.int64) * 7) == expected
    assert mask_to_rle(np.asfortranarray(mask)) == expected
    assert mask_to_rle(np.pad(mask, 1)[1:-1, 1:-1]) == expected  # a non-contiguous view
    assert mask_to_rle(mask.tolist()) == expected


@pytest.mark.parametrize("name", ["noise", "ellipse", "empty", "full", "long runs"])
def test_the_sdk_decodes_our_rle_to_the_mask(name):
    height, width = 120, 700
    mask = {
        "noise": np.random.default_rng(5).random((height, width)) < 0.4,
        "ellipse": ellipse(height, width, 60, 350, 50, 300),
        "empty": np.zeros((height, width), dtype=bool),
        "full": np.ones((height, width), dtype=bool),
        # 2**16 values and more in one run, next to short ones.
        "long runs": np.arange(height * width).reshape(height, width) % 40000 < 20000,
    }[name]
    decoded = decode_rle(mask_to_rle(mask)).reshape(height, width, 4)
    np.testing.assert_array_equal(decoded, np.repeat((mask * 255).astype(np.uint8)[:, :, None], 4, axis=2))


def test_brush_regions_carry_the_sdk_rle():
    config = parse_label_config(
        '<View><Image name="photo" value="$url"/>'
        '<BrushLabels name="mask" toName="photo"><Label value="Car"/></BrushLabels></View>'
    )
    mask = ellipse(90, 160, 45, 80, 30, 60)
    region = mask_to_brush_region(mask, "Car", 0.9, config)
    assert region["value"]["rle"] == sdk(mask)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (3,), (2, 3, 4)])
def test_empty_or_not_2d_masks_are_refused(shape):
    with pytest.raises(ValueError):
        mask_to_rle(np.zeros(shape, dtype=bool))


def test_docstring_example():
    assert doctest.testmod(rle, raise_on_error=True).attempted
