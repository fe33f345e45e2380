"""Masks as polygon regions, label configs with polygons, and the choice of output (pure functions).

Polygons are judged by drawing them back: ``rasterise`` fills the pixels
whose centres lie inside the polygon, in Label Studio's continuous image
coordinates (pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``). Pillow's and
OpenCV's fills also take every pixel an edge touches, which would hide a
half-pixel shift; this one does not, so a polygon traced half a pixel off
fails the exact checks below.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from sam_backend.errors import BadRequestError, LabelConfigError
from sam_backend.labelstudio.labelconfig import LabelConfig, parse_label_config
from sam_backend.labelstudio.output import OutputSettings, mask_to_regions
from sam_backend.labelstudio.polygons import (
    PolygonSettings,
    mask_to_polygon_regions,
    mask_to_polygons,
    percent_to_polygon,
    polygon_label_for,
    polygon_to_percent,
)
from sam_backend.sam.synthetic import iou

IMAGE = '<Image name="image" value="$image"/>'
BRUSH = '<BrushLabels name="brush" toName="image"><Label value="Dog"/><Label value="Cat"/></BrushLabels>'
POLYGONS = '<PolygonLabels name="poly" toName="image"><Label value="Cat"/><Label value="Zebra"/></PolygonLabels>'
KEYPOINTS = ('<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/><Label value="Zebra"/>'
             '</KeyPointLabels>')
POLYGON_ONLY = parse_label_config(f"<View>{IMAGE}{POLYGONS}{KEYPOINTS}</View>")
BOTH = parse_label_config(f"<View>{IMAGE}{BRUSH}{POLYGONS}{KEYPOINTS}</View>")
BRUSH_ONLY = parse_label_config(f"<View>{IMAGE}{BRUSH}{KEYPOINTS}</View>")


# ------------------------------------------------------------------ helpers


def rasterise(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre ``(x + 0.5, y + 0.5)`` is inside the polygon (even-odd rule)."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = xs + 0.5, ys + 0.5
    inside = np.zeros(shape, bool)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        crosses = (ay > cy) != (by > cy)
        x_at = ax + (cy - ay) * (bx - ax) / (by - ay if by != ay else 1.0)
        inside ^= crosses & (cx < x_at)
    return inside


def draw_regions(regions: list[dict]) -> np.ndarray:
    """Label Studio polygon regions back to one mask, from their percent points."""
    height, width = regions[0]["original_height"], regions[0]["original_width"]
    mask = np.zeros((height, width), bool)
    for region in regions:
        points = np.asarray(region["value"]["points"], np.float64) * [width / 100.0, height / 100.0]
        mask |= rasterise(points, (height, width))
    return mask


def disc(shape, center, radius):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return (xs + 0.5 - center[0]) ** 2 + (ys + 0.5 - center[1]) ** 2 <= radius ** 2


def rectangle(shape, x0, y0, x1, y1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def l_shape(shape=(100, 110)):
    return rectangle(shape, 10, 10, 30, 90) | rectangle(shape, 10, 70, 85, 90)


def two_blobs(shape=(120, 200)):
    return disc(shape, (50, 60), 30) | rectangle(shape, 120, 30, 180, 70)


def ring(shape=(130, 150)):
    outer = disc(shape, (75.3, 64.6), 50)
    return outer & ~disc(shape, (75.3, 64.6), 25), outer


def ellipse(shape, center, radii, angle):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    dx, dy = xs + 0.5 - center[0], ys + 0.5 - center[1]
    c, s = np.cos(angle), np.sin(angle)
    return ((c * dx + s * dy) / radii[0]) ** 2 + ((c * dy - s * dx) / radii[1]) ** 2 <= 1


# ------------------------------------------------------------------ the rasteriser itself


def test_rasteriser_is_exact_and_sees_half_pixel_shifts():
    square = np.array([[2.0, 1.0], [6.0, 1.0], [6.0, 4.0], [2.0, 4.0]])
    assert (rasterise(square, (6, 8)) == rectangle((6, 8), 2, 1, 6, 4)).all()
    # Through the edge pixels' centres (what plain findContours gives): a row and a column short.
    centres = square + [[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]]
    assert rasterise(centres, (6, 8)).sum() < rectangle((6, 8), 2, 1, 6, 4).sum()


# ------------------------------------------------------------------ shapes


SHAPES = {
    "disc": lambda: (disc((120, 160), (70.3, 60.7), 40),) * 2,
    "small disc": lambda: (disc((40, 40), (20.2, 19.6), 8),) * 2,
    "tilted ellipse": lambda: (ellipse((200, 300), (150, 90), (120, 50), 0.6),) * 2,
    "rectangle": lambda: (rectangle((60, 80), 20, 10, 40, 20),) * 2,
    "L-shape": lambda: (l_shape(),) * 2,
    "two blobs": lambda: (two_blobs(),) * 2,
    "ring": ring,  # holes are filled: compared with the outer disc
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_polygons_drawn_back_match_the_mask(name):
    mask, expected = SHAPES[name]()
    polygons = mask_to_polygons(mask)
    drawn = np.zeros(mask.shape, bool)
    for points in polygons:
        assert points.shape[0] >= 3 and points.shape[1] == 2
        drawn |= rasterise(points, mask.shape)
    assert iou(drawn, expected) >= 0.95, f"{name}: IoU {iou(drawn, expected):.3f}"
    # Area kept, not shrunk or grown by half a pixel all round.
    assert abs(drawn.sum() / expected.sum() - 1) < 0.03, f"{name}: area ratio {drawn.sum() / expected.sum():.3f}"


@pytest.mark.parametrize("name, most", [("disc", 40), ("tilted ellipse", 60), ("L-shape", 8), ("ring", 40)])
def test_vertex_counts_stay_small(name, most):
    polygons = mask_to_polygons(SHAPES[name]()[0])
    assert len(polygons) == 1
    assert 4 <= len(polygons[0]) <= most, f"{name}: {len(polygons[0])} vertices"


def test_a_rectangle_comes_back_exactly_with_its_four_corners():
    mask = rectangle((60, 80), 20, 10, 40, 20)
    (points,) = mask_to_polygons(mask)
    assert 4 <= len(points) <= 8
    assert sorted(map(tuple, points.tolist())) == [(20, 10), (20, 20), (40, 10), (40, 20)]
    assert (rasterise(points, mask.shape) == mask).all()


def test_a_single_pixel_is_its_unit_square():
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    (points,) = mask_to_polygons(mask, PolygonSettings(min_area=0, tolerance=0))
    assert sorted(map(tuple, points.tolist())) == [(3, 2), (3, 3), (4, 2), (4, 3)]
    # Simplified 1 px at a time, a unit square has nothing left: a degenerate part, skipped.
    assert mask_to_polygons(mask, PolygonSettings(min_area=0, tolerance=1)) == []


def test_tolerance_trades_vertices_for_fidelity():
    mask = disc((300, 300), (150, 150), 120)
    counts = [len(mask_to_polygons(mask, PolygonSettings(tolerance=t))[0]) for t in (0, 0.5, 1, 3)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 3 * counts[-1], counts
    coarse = rasterise(mask_to_polygons(mask, PolygonSettings(tolerance=3))[0], mask.shape)
    assert 0.95 <= iou(coarse, mask) < iou(rasterise(mask_to_polygons(mask)[0], mask.shape), mask)


def test_parts_are_largest_first_and_can_be_limited():
    mask = two_blobs()
    big, small = mask_to_polygons(mask)
    assert rasterise(big, mask.shape)[60, 50] and rasterise(small, mask.shape)[50, 150]
    (largest,) = mask_to_polygons(mask, PolygonSettings(max_parts=1))
    assert (largest == big).all()
    # A part under the minimum area is dropped: SAM's specks.
    specked = mask.copy()
    specked[5:7, 5:7] = True
    assert len(mask_to_polygons(specked)) == 2
    assert len(mask_to_polygons(specked, PolygonSettings(min_area=0))) == 3
    assert len(mask_to_polygons(mask, PolygonSettings(min_area=2500))) == 1  # the 60x40 box is 2400 px


def test_a_one_pixel_line_never_gives_a_polygon_with_fewer_than_three_points(caplog):
    mask = np.zeros((20, 60), bool)
    mask[10, 5:55] = True
    for tolerance in (0, 0.5, 1, 2, 5):
        for points in mask_to_polygons(mask, PolygonSettings(tolerance=tolerance)):
            assert len(points) >= 3
    # Below 1 px of tolerance the line keeps its four corners; at 1 px and more
    # it simplifies to a segment, which is skipped and logged.
    assert [len(p) for p in mask_to_polygons(mask, PolygonSettings(tolerance=0.5))] == [4]
    with caplog.at_level(logging.INFO, "sam_backend"):
        assert mask_to_polygon_regions(mask, "Cat", 0.9, POLYGON_ONLY, PolygonSettings(tolerance=5)) == []
    assert "1 part(s)" in caplog.text and "degenerate after simplification" in caplog.text


def test_empty_mask_gives_no_region_and_says_why(caplog):
    with caplog.at_level(logging.INFO, "sam_backend"):
        assert mask_to_polygon_regions(np.zeros((30, 40), bool), "Cat", 0.9, POLYGON_ONLY) == []
    assert "The mask is empty" in caplog.text
    caplog.clear()
    speck = np.zeros((30, 40), bool)
    speck[3:5, 3:5] = True
    with caplog.at_level(logging.INFO, "sam_backend"):
        assert mask_to_polygon_regions(speck, "Cat", 0.9, POLYGON_ONLY) == []
    assert "smaller than 10 px" in caplog.text


def test_a_mask_must_be_two_dimensional():
    with pytest.raises(ValueError, match="two-dimensional"):
        mask_to_polygons(np.zeros((4, 4, 3), bool))


# ------------------------------------------------------------------ Label Studio's format


def test_region_has_label_studios_polygon_shape():
    mask = two_blobs()
    regions = mask_to_polygon_regions(mask, "Zebra", 0.87, POLYGON_ONLY, image_rotation=90)
    assert len(regions) == 2 and len({r["id"] for r in regions}) == 2
    for region in regions:
        assert region["type"] == "polygonlabels" and region["from_name"] == "poly" and region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == (200, 120)
        assert region["image_rotation"] == 90 and region["score"] == 0.87
        value = region["value"]
        assert value["closed"] is True and value["polygonlabels"] == ["Zebra"]
        assert all(len(p) == 2 and 0 <= p[0] <= 100 and 0 <= p[1] <= 100 for p in value["points"])
    assert iou(draw_regions(regions), mask) >= 0.95


def test_same_keys_as_the_shared_polygon_example():
    import json
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "shared" / "examples" / "polygon_result.json"
    if not example.exists():
        pytest.skip("../shared/examples/polygon_result.json is not beside this checkout")
    shared = json.loads(example.read_text())
    (region,) = mask_to_polygon_regions(rectangle((600, 800), 80, 60, 400, 300), "Thing", 0.9, POLYGON_ONLY)
    assert set(shared) - {"_comment"} <= set(region)
    assert set(shared["value"]) == set(region["value"])


@pytest.mark.parametrize("size", [(90, 200), (333, 71), (1080, 1920)])
def test_percent_round_trip_on_non_square_images(size):
    height, width = size
    mask = rectangle(size, width // 7, height // 5, width - width // 3, height - height // 4)
    (region,) = mask_to_polygon_regions(mask, "Cat", 0.9, POLYGON_ONLY)
    assert (region["original_width"], region["original_height"]) == (width, height)
    points = percent_to_polygon(region["value"]["points"], width, height)
    np.testing.assert_allclose(points, mask_to_polygons(mask)[0], atol=1e-3)
    assert (draw_regions([region]) == mask).all()


def test_percent_helpers_are_inverse_and_check_their_input():
    points = np.array([[0.0, 0.0], [17.0, 3.5], [200.0, 90.0]])
    np.testing.assert_allclose(percent_to_polygon(polygon_to_percent(points, 200, 90), 200, 90), points, atol=1e-3)
    with pytest.raises(BadRequestError, match=r"\[x, y\]"):
        percent_to_polygon([[1, 2, 3]], 10, 10)


def test_exif_rotated_image_gives_percent_of_the_displayed_image():
    from sam_backend.sam.images import load_image

    # Displayed 60 wide x 100 high after EXIF orientation 6; stored 100 x 60.
    shown = np.zeros((100, 60, 3), np.uint8)
    shown[10:40, 5:25] = (255, 0, 0)  # a red block near the displayed top-left
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif.tobytes())
    rgb = load_image(buffer.getvalue())
    assert rgb.shape[:2] == (100, 60)
    mask = rgb[:, :, 0] > 128
    assert (mask == (shown[:, :, 0] > 0)).all()
    (region,) = mask_to_polygon_regions(mask, "Cat", 0.9, POLYGON_ONLY)
    assert (region["original_width"], region["original_height"]) == (60, 100)
    # Columns 5-24 of 60 and rows 10-39 of 100, as displayed.
    corners = sorted([(100 * 5 / 60, 10.0), (100 * 25 / 60, 10.0), (100 * 25 / 60, 40.0), (100 * 5 / 60, 40.0)])
    np.testing.assert_allclose(sorted(map(tuple, region["value"]["points"])), corners, atol=1e-3)
    assert (draw_regions([region]) == mask).all()


# ------------------------------------------------------------------ label configs


def test_config_with_polygons_only():
    assert POLYGON_ONLY.polygon_name == "poly" and POLYGON_ONLY.polygon_labels == ("Cat", "Zebra")
    assert POLYGON_ONLY.brush_name is None and POLYGON_ONLY.brush_labels == ()
    assert POLYGON_ONLY.keypoint_names == ("kp",)


def test_config_with_both():
    assert (BOTH.brush_name, BOTH.polygon_name) == ("brush", "poly")
    assert BOTH.brush_labels == ("Dog", "Cat") and BOTH.polygon_labels == ("Cat", "Zebra")


def test_config_with_neither_names_both_tags():
    with pytest.raises(LabelConfigError) as error:
        parse_label_config(f"<View>{IMAGE}{KEYPOINTS}</View>")
    message = str(error.value)
    assert "<BrushLabels>" in message and "<PolygonLabels>" in message and '("image")' in message
    assert "label_config_polygons.xml" in message


def test_polygons_bound_to_another_image_do_not_count():
    xml = (f'<View>{IMAGE}<Image name="other" value="$other"/>'
           '<PolygonLabels name="poly" toName="other"><Label value="A"/></PolygonLabels></View>')
    config = parse_label_config(xml)
    assert config.image_name == "other" and config.polygon_name == "poly"
    with pytest.raises(LabelConfigError, match="no <BrushLabels> or <PolygonLabels>"):
        parse_label_config(f'<View>{IMAGE}<Image name="other" value="$other"/>{KEYPOINTS}</View>')


def test_polygon_control_without_labels_is_refused():
    with pytest.raises(LabelConfigError, match='<PolygonLabels name="poly"> has no <Label>'):
        parse_label_config(f'<View>{IMAGE}<PolygonLabels name="poly" toName="image"/></View>')


def test_shipped_polygon_config():
    from pathlib import Path

    from label_studio_sdk.label_interface import LabelInterface

    text = (Path(__file__).resolve().parents[1] / "label_config_polygons.xml").read_text()
    config = parse_label_config(text)
    assert config.polygon_name and config.brush_name is None
    assert config.keypoint_names and config.rectangle_names
    interface = LabelInterface(text)
    for name in config.keypoint_names + config.rectangle_names:
        assert set(interface.get_control(name).labels) == set(config.polygon_labels)


# ------------------------------------------------------------------ output kind


@pytest.mark.parametrize(
    "config, environ, extra, kinds",
    [
        (BRUSH_ONLY, {}, None, ("brush",)),
        (POLYGON_ONLY, {}, None, ("polygon",)),
        (BOTH, {}, None, ("brush",)),
        (BOTH, {"SAM_OUTPUT": "polygon"}, None, ("polygon",)),
        (BOTH, {"SAM_OUTPUT": "Both"}, None, ("brush", "polygon")),
        (BOTH, {"SAM_OUTPUT": "polygon"}, {"output": "brush"}, ("brush",)),
        (BOTH, {}, {"output": "polygon"}, ("polygon",)),
        (BOTH, {"SAM_OUTPUT": "brush"}, {"output": "both"}, ("brush", "polygon")),
        # SAM_OUTPUT is a server-wide preference: a project without that control gets what it has.
        (BRUSH_ONLY, {"SAM_OUTPUT": "polygon"}, None, ("brush",)),
        (POLYGON_ONLY, {"SAM_OUTPUT": "both"}, None, ("polygon",)),
        (POLYGON_ONLY, {"SAM_OUTPUT": "brush"}, {"output": ""}, ("polygon",)),
    ],
)
def test_output_kind_from_config_environment_and_extra_params(config, environ, extra, kinds):
    assert OutputSettings.from_sources(environ, extra).kinds(config) == kinds


@pytest.mark.parametrize("config, output, tag", [(BRUSH_ONLY, "polygon", "PolygonLabels"),
                                                 (BRUSH_ONLY, "both", "PolygonLabels"),
                                                 (POLYGON_ONLY, "brush", "BrushLabels")])
def test_a_project_asking_for_an_output_its_config_lacks_gets_a_clear_error(config, output, tag):
    with pytest.raises(LabelConfigError, match=f"asks for '{output}' output.*no <{tag}> bound to the image"):
        OutputSettings.from_sources({}, {"output": output}).kinds(config)


def test_unknown_output_kind_is_refused():
    with pytest.raises(BadRequestError, match=r"Unknown output kind 'mask' \(SAM_OUTPUT\).*brush, polygon, both"):
        OutputSettings.from_sources({"SAM_OUTPUT": "mask"}, None)
    with pytest.raises(BadRequestError, match="extra params"):
        OutputSettings.from_sources({}, {"output": "rle"})


def test_polygon_settings_from_environment_and_extra_params():
    settings = OutputSettings.from_sources(
        {"SAM_POLYGON_TOLERANCE": "0.5", "SAM_POLYGON_MIN_AREA": "4", "SAM_POLYGON_MAX_PARTS": "3"},
        {"polygon_min_area": 25},
    ).polygon
    assert settings == PolygonSettings(tolerance=0.5, min_area=25.0, max_parts=3)
    nested = OutputSettings.from_sources({}, {"polygon": {"max_parts": 1}, "polygon_tolerance": "2"}).polygon
    assert nested == PolygonSettings(tolerance=2.0, min_area=10.0, max_parts=1)
    assert OutputSettings.from_sources({}, {}).polygon == PolygonSettings()
    # "min_area" alone belongs to automatic masks (a fraction of the image), not to polygons.
    assert OutputSettings.from_sources({}, {"min_area": 0.5}).polygon.min_area == 10.0


@pytest.mark.parametrize("environ, extra, message", [
    ({"SAM_POLYGON_TOLERANCE": "fine"}, None, "tolerance must be a number"),
    ({}, {"polygon_max_parts": 1.5}, "max_parts must be a whole number"),
    ({}, {"polygon_min_area": -1}, "min_area must be 0 or more"),
    ({}, {"polygon": {"tolerance": "nan"}}, "tolerance must be 0 or more"),
])
def test_bad_polygon_settings_are_refused(environ, extra, message):
    with pytest.raises(BadRequestError, match=message):
        OutputSettings.from_sources(environ, extra)


def test_labels_follow_the_clicked_label_per_control(caplog):
    both = OutputSettings(kind="both")
    assert both.labels_for("Cat", BOTH) == {"brush": "Cat", "polygon": "Cat"}
    with caplog.at_level(logging.INFO, "sam_backend"):
        assert both.labels_for("Zebra", BOTH) == {"brush": "Dog", "polygon": "Zebra"}
    assert "control 'brush' has no label 'Zebra'" in caplog.text
    assert OutputSettings().labels_for(None, POLYGON_ONLY) == {"polygon": "Cat"}
    assert polygon_label_for("Dog", POLYGON_ONLY) == "Cat"


def test_mask_to_regions_makes_the_kinds_asked_for():
    mask = two_blobs()
    polygons = mask_to_regions(mask, {"polygon": "Cat"}, 0.8, BOTH)
    assert [r["type"] for r in polygons] == ["polygonlabels", "polygonlabels"]
    both = mask_to_regions(mask, {"brush": "Dog", "polygon": "Cat"}, 0.8, BOTH, PolygonSettings(max_parts=1), 180)
    assert [r["type"] for r in both] == ["brushlabels", "polygonlabels"]
    assert both[0]["value"]["brushlabels"] == ["Dog"] and both[1]["value"]["polygonlabels"] == ["Cat"]
    assert all(r["image_rotation"] == 180 and r["score"] == 0.8 for r in both)
    assert [r["type"] for r in mask_to_regions(mask, {"brush": "Dog"}, 0.8, BOTH)] == ["brushlabels"]


def test_label_config_positional_construction_still_works():
    config = LabelConfig("image", "image", "brush", ("Cat",), ("kp",), ())
    assert config.polygon_name is None and OutputSettings().kinds(config) == ("brush",)
