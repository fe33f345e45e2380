"""Image loading: orientation, colour modes, bad files."""

import io

import numpy as np
import pytest
from PIL import Image

from sam_backend.errors import ImageError, ImageTooLargeError
from sam_backend.sam.images import load_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))  # blue top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = load_image(encode(image, "JPEG", exif=exif, quality=95))
    assert rgb.shape == (40, 20, 3)  # displayed portrait
    assert rgb[2, -3, 2] > 200 and rgb[2, -3, 0] < 60  # blue now top-right


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_colour_modes_become_rgb(mode):
    base = Image.new("RGB", (30, 20), (200, 100, 50))
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 40000, np.uint16))
    else:
        image = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    rgb = load_image(encode(image, fmt))
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(rgb[0, 0, 0]) - 40000 // 257) <= 1  # scaled, not clipped to 255


def test_transparent_pixels_show_on_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgb = load_image(encode(image, "PNG"))
    assert (rgb == 255).all()


def test_decompression_bomb_is_refused():
    data = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="6,000,000 pixels.*SAM_MAX_IMAGE_PIXELS"):
        load_image(data, max_pixels=5_000_000)
    assert load_image(data, max_pixels=6_000_000).shape == (2000, 3000, 3)


def test_pixel_limit_from_environment(monkeypatch):
    monkeypatch.setenv("SAM_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ImageTooLargeError):
        load_image(encode(Image.new("RGB", (20, 20)), "PNG"))


def test_not_an_image():
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"<html>404 Not Found</html>")


def test_truncated_image():
    data = encode(Image.effect_noise((200, 200), 60).convert("RGB"), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "gone.png")


def test_arrays_are_accepted():
    assert load_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert load_image(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(ImageError):
        load_image(np.zeros((5, 6, 2), np.uint8))
