"""The geometry between an image and SAM's square model frame.

These reproduce Meta's ``segment_anything`` ``SamPredictor`` /
``ResizeLongestSide`` exactly: the longest side is resized to the model's input
size with bilinear filtering, the aspect ratio is kept, and the image is padded
at the bottom and right. Prompts are scaled by the same factors; logits go back
through upsampling, cropping of the padding and resizing to the original size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: ImageNet mean in [0, 1] units. keras-hub's ViTDet encoder subtracts it
#: internally, so padding with it is what Meta's zero padding after
#: normalisation is.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)


@dataclass(frozen=True)
class Frame:
    """How an image of ``original_size`` sits in the square model input.

    Attributes:
        original_size: ``(height, width)`` of the image as the annotator sees it.
        resized_size: ``(height, width)`` after the longest-side resize.
        input_size: side of the square model input (e.g. 1024).

    Example:
        >>> f = Frame.for_image((720, 1280), 1024)
        >>> f.resized_size
        (576, 1024)
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int

    @classmethod
    def for_image(cls, original_size: tuple[int, int], input_size: int) -> "Frame":
        """The frame of an image of ``(height, width)`` for a model of ``input_size``."""
        return cls(tuple(original_size), resized_shape(original_size, input_size), input_size)

    def to_model(self, coords: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` x/y coordinates from the original image to the model frame."""
        return apply_coords(coords, self.original_size, self.resized_size)

    def to_original(self, coords: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_model`."""
        return apply_coords(coords, self.resized_size, self.original_size)


def resized_shape(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """``(height, width)`` after resizing the longest side to ``long_side``.

    Same rounding as ``ResizeLongestSide.get_preprocess_shape``.
    """
    height, width = size
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: np.ndarray, input_size: int) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 image so that its longest side is ``input_size``.

    Bilinear through Pillow, as ``ResizeLongestSide.apply_image`` does.
    """
    new_h, new_w = resized_shape(image.shape[:2], input_size)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def preprocess(image: np.ndarray, input_size: int) -> np.ndarray:
    """The ``(input_size, input_size, 3)`` float32 model input for an RGB uint8 image.

    Values are in [0, 1]; the bottom/right padding is the ImageNet mean so that
    it becomes exactly 0 after the encoder's own normalisation.
    """
    resized = resize_image(image, input_size).astype(np.float32) / 255.0
    padded = np.empty((input_size, input_size, 3), dtype=np.float32)
    padded[...] = IMAGENET_MEAN
    padded[: resized.shape[0], : resized.shape[1]] = resized
    return padded


def apply_coords(
    coords: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]
) -> np.ndarray:
    """Scale ``(..., 2)`` x/y coordinates from an image of ``from_size`` to ``to_size``."""
    coords = np.asarray(coords, dtype=np.float32).copy()
    coords[..., 0] *= to_size[1] / from_size[1]
    coords[..., 1] *= to_size[0] / from_size[0]
    return coords


def postprocess_logits(logits, frame: Frame):
    """Low-resolution mask logits ``(N, h, w)`` -> logits at the original size ``(N, H, W)``.

    Accepts a torch tensor, returns one on the same device: upsample to the
    model input size, crop away the padding, resize to the original size, all
    bilinear without corner alignment (``Sam.postprocess_masks``).
    """
    import torch.nn.functional as F

    x = logits[:, None].float()
    x = F.interpolate(x, (frame.input_size, frame.input_size), mode="bilinear", align_corners=False)
    x = x[..., : frame.resized_size[0], : frame.resized_size[1]]
    x = F.interpolate(x, frame.original_size, mode="bilinear", align_corners=False)
    return x[:, 0]
