"""Loading images the way the annotator sees them: EXIF-rotated, RGB, 8 bit."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_backend.errors import ImageError, ImageTooLargeError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

#: Default pixel limit (width x height); ``SAM_MAX_IMAGE_PIXELS`` overrides it.
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 x MAX_IMAGE_PIXELS)

# We enforce our own, configurable limit below; Pillow's global check would
# otherwise refuse (or warn about) images that the operator allowed.
Image.MAX_IMAGE_PIXELS = None


def max_pixels_from_env() -> int:
    """The pixel limit from ``SAM_MAX_IMAGE_PIXELS``, else the default."""
    value = os.environ.get("SAM_MAX_IMAGE_PIXELS")
    return int(value) if value else DEFAULT_MAX_PIXELS


def load_image(source: ImageSource, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
    """Load an image as an ``(H, W, 3)`` uint8 RGB array, as a browser shows it.

    EXIF orientation is applied (Label Studio's coordinates are those of the
    displayed image), and grayscale, palette, alpha, CMYK and 16-bit images are
    converted to 8-bit RGB.

    Args:
        source: a file path, the file's bytes, a PIL image, or an array
            (``(H, W)`` or ``(H, W, 3|4)``).
        max_pixels: refuse images with more pixels than this (decompression
            bombs); defaults to ``SAM_MAX_IMAGE_PIXELS`` or 178,956,970.
        name: how error messages call the image (default: its path).

    Raises:
        ImageError: not an image, truncated or corrupt.
        ImageTooLargeError: more pixels than ``max_pixels``.

    Example:
        >>> rgb = load_image("photo.jpg")  # doctest: +SKIP
        >>> rgb.shape, rgb.dtype  # doctest: +SKIP
        ((720, 1280, 3), dtype('uint8'))
    """
    limit = max_pixels_from_env() if max_pixels is None else max_pixels
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, limit)
    if isinstance(source, Image.Image):
        image, name = source, name or "image"
    else:
        name = name or ("image bytes" if isinstance(source, bytes) else str(source))
        try:
            fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
            image = Image.open(fp)
        except FileNotFoundError:
            raise ImageError(f"Image file not found: {name}.") from None
        except UnidentifiedImageError:
            raise ImageError(
                f"{name} is not an image Pillow can read. Use a JPEG, PNG, WebP, TIFF, BMP or GIF file."
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name} is truncated or corrupt ({exc}).") from None
    _check_size(image.width, image.height, limit, name)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return np.asarray(_to_rgb(image))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is truncated or corrupt ({exc}).") from None


def _check_size(width: int, height: int, limit: int, name: str) -> None:
    if width * height > limit:
        raise ImageTooLargeError(
            f"{name} has {width}x{height} = {width * height:,} pixels, more than "
            f"the limit of {limit:,}. Downscale the image, or raise "
            "SAM_MAX_IMAGE_PIXELS if you trust it."
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name} is empty ({width}x{height}).")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_wide_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels show on a white page in the browser, not as the
        # (often black) colour stored under them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a 16-bit (or 32-bit integer / float) single-channel image to 8 bits."""
    is_float = np.issubdtype(array.dtype, np.floating)
    array = array.astype(np.float64)
    if is_float and array.max(initial=0) <= 1.0:
        scaled = array * 255.0
    elif array.max(initial=0) <= 255:
        scaled = array
    else:
        scaled = array / 257.0  # 65535 -> 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, limit: int) -> np.ndarray:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(
            f"An image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}."
        )
    _check_size(array.shape[1], array.shape[0], limit, "image array")
    if array.dtype != np.uint8:
        array = _wide_to_uint8(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return np.asarray(_to_rgb(Image.fromarray(array, "RGBA")))
    return np.ascontiguousarray(array)
