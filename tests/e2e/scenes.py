"""Images to upload: generated shape scenes whose true masks are known, in several formats.

Each scene has a disc (the shape to click) and a rectangle apart from it (where
a negative point goes), so a test can check that the returned mask covers the
clicked point and the disc, and leaves the rectangle out. Files come in the
forms users upload: landscape and portrait JPEG, a JPEG whose pixels are stored
rotated with an EXIF orientation tag, a grayscale PNG, an RGBA PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sam_backend.sam.synthetic import Shape, bounding_box, ellipse, interior_point, rectangle, render

EXIF_ORIENTATION = 0x0112
BACKGROUND = (((150, 150, 150), (110, 120, 135)), "gradient", 0.4, 8.0)
RED, BLUE = (200, 40, 40), (40, 60, 210)
# For grayscale the shapes must differ in brightness, not only in hue.
DARK, LIGHT = (35, 35, 35), (235, 235, 235)


@dataclass
class SceneImage:
    """An image file and, in displayed (EXIF-applied) pixels, what is in it."""

    name: str
    data: bytes
    size: tuple[int, int]  # displayed (height, width)
    disc: np.ndarray  # (H, W) bool: the shape to click
    box: np.ndarray  # (H, W) bool: the other shape

    @property
    def width(self) -> int:
        return self.size[1]

    @property
    def height(self) -> int:
        return self.size[0]

    def click(self) -> tuple[float, float]:
        """The disc's innermost pixel centre, ``(x, y)`` in displayed pixels."""
        x, y = interior_point(self.disc)
        return x + 0.5, y + 0.5

    def negative(self) -> tuple[float, float]:
        """A point inside the rectangle, ``(x, y)``."""
        x, y = interior_point(self.box)
        return x + 0.5, y + 0.5

    def disc_box(self, margin: float = 4.0) -> tuple[float, float, float, float]:
        """``x0, y0, x1, y1`` around the disc, a little loose as a person drags it."""
        x0, y0, x1, y1 = bounding_box(self.disc).tolist()
        return (max(x0 - margin, 0), max(y0 - margin, 0),
                min(x1 + margin, self.width), min(y1 + margin, self.height))


def _scene(size, disc_at, box_at, disc_color, box_color, seed):
    h, w = size
    s = min(h, w)
    disc = Shape("ellipse", ellipse((disc_at[0] * w, disc_at[1] * h), (0.17 * s, 0.17 * s)),
                 (disc_color, (255, 255, 255)), "flat")
    box = Shape("rectangle", rectangle((box_at[0] * w, box_at[1] * h), (0.16 * s, 0.1 * s), 0.3),
                (box_color, (230, 210, 40)), "flat")
    return render(size, [disc, box], BACKGROUND, noise=3.0, rng=np.random.default_rng(seed))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def build_images() -> dict[str, SceneImage]:
    """The uploaded set, by file name."""
    images = {}

    def add(name, scene, data):
        disc, box = scene.masks
        images[name] = SceneImage(name, data, scene.size, disc, box)

    scene = _scene((360, 560), (0.3, 0.4), (0.72, 0.62), RED, BLUE, 1)
    add("landscape.jpg", scene, _encode(Image.fromarray(scene.image), "JPEG", quality=92))

    scene = _scene((600, 380), (0.35, 0.3), (0.6, 0.72), BLUE, RED, 2)
    add("portrait.jpg", scene, _encode(Image.fromarray(scene.image), "JPEG", quality=92))

    # Displayed 400x640 (landscape); stored 640x400 (portrait) with orientation 6
    # ("rotate 90° clockwise to display"), as phone cameras write them.
    scene = _scene((400, 640), (0.25, 0.35), (0.7, 0.6), RED, BLUE, 3)
    stored = Image.fromarray(scene.image).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    add("exif-rotated.jpg", scene, _encode(stored, "JPEG", quality=92, exif=exif.tobytes()))

    scene = _scene((420, 420), (0.3, 0.3), (0.68, 0.7), DARK, LIGHT, 4)
    gray = Image.fromarray(scene.image).convert("L")
    add("grayscale.png", scene, _encode(gray, "PNG"))

    # Opaque shapes on a half-transparent background.
    scene = _scene((380, 520), (0.3, 0.35), (0.7, 0.65), RED, BLUE, 5)
    alpha = np.where(scene.masks.any(0), 255, 140).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([scene.image, alpha]), "RGBA")
    add("alpha.png", scene, _encode(rgba, "PNG"))
    return images


def check_exif_image(image: SceneImage) -> None:
    """The EXIF file really is stored rotated and displays as the scene (guards the fixture itself)."""
    from PIL import ImageOps

    stored = Image.open(io.BytesIO(image.data))
    assert stored.size == (image.height, image.width), "stored transposed"
    shown = ImageOps.exif_transpose(stored)
    assert shown.size == (image.width, image.height)


# ------------------------------------------ regions as the editor serializes them


def keypoint_region(image: SceneImage, point: tuple[float, float], positive: bool = True, label: str = "Object") -> dict:
    """A smart keypoint as ``serializeAnnotation()`` gives it (Alt held: ``is_positive: false``)."""
    x, y = point
    return {
        "id": f"kp{len(label)}{int(x)}{int(y)}", "from_name": "keypoint", "to_name": "image",
        "type": "keypointlabels", "origin": "manual",
        "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "value": {"x": 100 * x / image.width, "y": 100 * y / image.height, "width": 0.6,
                  "keypointlabels": [label], "labels": [label]},
        "is_positive": positive,
    }


def rectangle_region(image: SceneImage, box: tuple[float, float, float, float], label: str = "Object") -> dict:
    """A smart rectangle (``x, y, width, height`` in percent of the displayed image)."""
    x0, y0, x1, y1 = box
    return {
        "id": f"bx{int(x0)}{int(y0)}", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
        "origin": "manual", "original_width": image.width, "original_height": image.height, "image_rotation": 0,
        "value": {"x": 100 * x0 / image.width, "y": 100 * y0 / image.height,
                  "width": 100 * (x1 - x0) / image.width, "height": 100 * (y1 - y0) / image.height,
                  "rotation": 0, "rectanglelabels": [label]},
    }


def decode_brush(region: dict) -> np.ndarray:
    """A returned brush region as an ``(H, W)`` bool mask, decoded by label-studio-sdk as Label Studio does."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return np.reshape(decode_rle(region["value"]["rle"]), (h, w, 4))[:, :, 3] > 127
