"""The shipped demo preset segments generated shapes where they are, through the engine and HTTP.

These tests judge geometry: every scene is drawn from known shapes, and each
mask is compared with the true one. ``assert_selects`` is strict enough that a
shifted or transposed mask fails it (checked below), so a pipeline that
misplaces masks cannot pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_backend.sam.engine import SamEngine
from sam_backend.sam.presets import SHIPPED_PRESETS_DIR, resolve_preset, shipped_presets
from sam_backend.sam.synthetic import Shape, bounding_box, ellipse, interior_point, iou, polygon, rectangle, render
from sam_backend.server.app import create_app

from test_server import decode_brush, keypoint, make_backend, predict_body

DEMO_DIR = SHIPPED_PRESETS_DIR / "demo"
RED, BLUE, YELLOW, GREEN = (200, 40, 40), (40, 60, 210), (230, 210, 40), (40, 170, 80)
BACKGROUND = (((150, 150, 150), (110, 120, 135)), "gradient", 0.4, 8.0)


@pytest.fixture(scope="module")
def demo():
    return SamEngine.from_preset("demo")


def assert_selects(mask: np.ndarray, truth: np.ndarray, min_iou: float = 0.75) -> None:
    """``mask`` is the true shape: same size, overlapping well, centred on it."""
    assert mask.shape == truth.shape, f"mask {mask.shape} for an image of {truth.shape}"
    score = iou(mask, truth)
    assert score >= min_iou, f"IoU {score:.3f} < {min_iou}"
    centre = np.argwhere(mask).mean(0)
    true_centre = np.argwhere(truth).mean(0)
    tolerance = 0.1 * np.sqrt(truth.sum())
    assert np.abs(centre - true_centre).max() <= tolerance, f"mask centred at {centre}, shape at {true_centre}"


def scene_with(size, shapes, background=BACKGROUND):
    return render(size, shapes, background, noise=3.0, rng=np.random.default_rng(0))


def disc_at(size, fx, fy, radius_fraction=0.16, color=RED, fill="flat"):
    h, w = size
    r = radius_fraction * min(h, w)
    return Shape("ellipse", ellipse((fx * w, fy * h), (r, r)), (color, (255, 255, 255)), fill, 0.7, 9.0)


def box_at(size, fx, fy, half=(0.18, 0.1), angle=0.0, color=BLUE, fill="flat"):
    h, w = size
    s = min(h, w)
    return Shape("rectangle", rectangle((fx * w, fy * h), (half[0] * s, half[1] * s), angle), (color, YELLOW), fill, 0.3, 7.0)


# ------------------------------------------------------------------ the preset itself


def test_demo_is_shipped_small_and_documented():
    assert "demo" in shipped_presets()
    assert resolve_preset("demo") == str(DEMO_DIR)
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size <= 10 * 1024 * 1024, f"demo preset is {size / 1e6:.1f} MB"
    card = (DEMO_DIR / "README.md").read_text()
    assert "not a substitute" in card and "IoU" in card
    scores = json.loads((DEMO_DIR / "scores.json").read_text())
    for kind, value in scores["mean_iou"].items():
        assert f"{value:.3f}" in card, f"model card lacks the {kind} score {value:.3f}"


def test_demo_resolves_from_the_environment(monkeypatch):
    from sam_backend.server.backend import SamBackend
    from sam_backend.sam.presets import default_preset

    monkeypatch.setenv("SAM_PRESET", "demo")
    assert default_preset() == "demo"
    assert SamBackend(preset=default_preset()).model_version.startswith("demo@")


def test_assertion_rejects_shifted_and_transposed_masks():
    size = (300, 300)
    scene = scene_with(size, [disc_at(size, 0.3, 0.65)])
    truth = scene.masks[0]
    assert_selects(truth, truth)
    with pytest.raises(AssertionError):
        assert_selects(np.roll(truth, 30, axis=1), truth)
    with pytest.raises(AssertionError):
        assert_selects(truth.T, truth)
    with pytest.raises(AssertionError):
        assert_selects(np.roll(truth, -25, axis=0), truth)


# ------------------------------------------------------------------ through the engine

SIZES = {"landscape": (300, 480), "portrait": (480, 300), "large landscape": (900, 1400), "large portrait": (1300, 700)}
POSITIONS = [(0.25, 0.3), (0.72, 0.7), (0.5, 0.45)]


@pytest.mark.parametrize("orientation", list(SIZES))
@pytest.mark.parametrize("position", POSITIONS)
def test_click_selects_the_shape_under_it(demo, orientation, position):
    size = SIZES[orientation]
    fx, fy = position
    other = box_at(size, 1 - fx, 1 - fy, angle=0.5)
    scene = scene_with(size, [other, disc_at(size, fx, fy)])
    truth = scene.masks[1]
    x, y = interior_point(truth)
    prediction = demo.decode(demo.encode(scene.image), points=[[x + 0.5, y + 0.5]], labels=[1])
    assert_selects(prediction.mask, truth)
    assert prediction.mask[y, x]


@pytest.mark.parametrize("orientation", ["landscape", "large portrait"])
def test_click_on_each_of_several_shapes(demo, orientation):
    size = SIZES[orientation]
    h, w = size
    tri = Shape("polygon", polygon(np.random.default_rng(5), (0.75 * w, 0.3 * h), 0.2 * min(h, w)), (GREEN, GREEN))
    scene = scene_with(size, [box_at(size, 0.3, 0.7, color=BLUE, fill="stripes"), disc_at(size, 0.25, 0.25), tri])
    embedding = demo.encode(scene.image)
    for truth in scene.masks:
        x, y = interior_point(truth)
        assert_selects(demo.decode(embedding, points=[[x + 0.5, y + 0.5]], labels=[1]).mask, truth)


def touching_pair(demo, size=(320, 480)):
    left = disc_at(size, 0.36, 0.5, radius_fraction=0.22, color=GREEN)
    right = box_at(size, 0.62, 0.5, half=(0.14, 0.14), color=BLUE)
    scene = scene_with(size, [left, right])
    disc, square = scene.masks
    pos = np.array(interior_point(disc), dtype=np.float32) + 0.5
    neg = np.array(interior_point(square), dtype=np.float32) + 0.5
    return demo.encode(scene.image), disc, square, pos, neg


def test_negative_point_on_a_touching_shape_keeps_it_out(demo):
    embedding, disc, square, pos, neg = touching_pair(demo)
    both = demo.decode(embedding, points=[pos, neg], labels=[1, 1]).mask
    assert both[disc].mean() > 0.9 and both[square].mean() > 0.8, "two positive clicks take both shapes"
    split = demo.decode(embedding, points=[pos, neg], labels=[1, 0]).mask
    assert split[disc].mean() > 0.9
    assert split[square].mean() < 0.25, f"{split[square].mean():.0%} of the excluded shape kept"
    assert not split[int(neg[1]), int(neg[0])]


@pytest.mark.xfail(strict=True, reason="demo preset under-trained: a negative point only trims a box's mask (see its model card)")
def test_negative_point_removes_a_touching_shape_from_a_box(demo):
    embedding, disc, square, pos, neg = touching_pair(demo)
    box = bounding_box(disc | square)
    assert demo.decode(embedding, box=box).mask[square].mean() > 0.8, "a box around both takes both"
    split = demo.decode(embedding, box=box, points=[pos, neg], labels=[1, 0]).mask
    assert split[disc].mean() > 0.9
    assert split[square].mean() < 0.2, f"{split[square].mean():.0%} of the excluded shape kept"


def test_box_selects_the_shape_inside_it(demo):
    size = (420, 640)
    shapes = [disc_at(size, 0.2, 0.3), box_at(size, 0.65, 0.35, color=YELLOW, fill="checker"), disc_at(size, 0.5, 0.75, color=BLUE)]
    scene = scene_with(size, shapes)
    embedding = demo.encode(scene.image)
    for truth in scene.masks:
        assert_selects(demo.decode(embedding, box=bounding_box(truth)).mask, truth, min_iou=0.85)


def test_box_and_point_select_the_front_shape_of_an_overlap(demo):
    size = (400, 400)
    back = box_at(size, 0.5, 0.5, half=(0.3, 0.22), color=BLUE)
    front = disc_at(size, 0.55, 0.5, radius_fraction=0.14, color=YELLOW)
    scene = scene_with(size, [back, front])
    _, disc = scene.masks
    box = bounding_box(disc)
    x, y = interior_point(disc)
    mask = demo.decode(demo.encode(scene.image), points=[[x + 0.5, y + 0.5]], labels=[1], box=box).mask
    assert_selects(mask, disc)


# ------------------------------------------------------------------ through HTTP


def test_http_click_and_box_return_masks_on_the_shape(demo, tmp_path, media):
    size = (360, 560)
    scene = scene_with(size, [box_at(size, 0.7, 0.6, color=BLUE, angle=0.3), disc_at(size, 0.3, 0.4)])
    Image.fromarray(scene.image).save(media.root / "shapes.jpg", quality=95)
    client = create_app(make_backend(demo, tmp_path)).test_client()
    url = f"{media.url}/shapes.jpg"
    h, w = size
    label_config = Path(__file__).resolve().parents[1].joinpath("label_config.xml").read_text()

    rect, disc = scene.masks
    x, y = interior_point(disc)
    click = keypoint(100 * (x + 0.5) / w, 100 * (y + 0.5) / h, label="Object", width=w, height=h)
    body = predict_body(url, [click], label_config=label_config)
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    region = answer.get_json()["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (w, h)
    assert_selects(decode_brush(region), disc)

    x0, y0, x1, y1 = bounding_box(rect).tolist()
    drawn = {
        "id": "r1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                  "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": ["Object"]},
    }
    answer = client.post("/predict", json=predict_body(url, [drawn], label_config=label_config))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert_selects(decode_brush(answer.get_json()["results"][0]["result"][0]), rect, min_iou=0.85)
