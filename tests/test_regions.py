"""Label config parsing and region <-> prompt translation (pure functions)."""

import math

import numpy as np
import pytest

from sam_backend.errors import BadRequestError, LabelConfigError, PromptError
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.regions import (
    brush_label_for,
    fit_mask,
    mask_to_brush_region,
    prompt_from_context,
    rectangle_to_box,
)

CONFIG = parse_label_config(
    '<View><Image name="photo" value="$url"/><Image name="other" value="$other"/>'
    '<BrushLabels name="mask" toName="photo"><Label value="Car"/><Label value="Tree"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="photo" smart="true"><Label value="Tree"/><Label value="Sky"/></KeyPointLabels>'
    '<RectangleLabels name="rect" toName="photo" smart="true"><Label value="Car"/></RectangleLabels>'
    '<KeyPointLabels name="kp_other" toName="other"><Label value="Tree"/></KeyPointLabels>'
    "</View>"
)


def kp(x, y, **extra):
    region = {"from_name": "kp", "to_name": "photo", "type": "keypointlabels",
              "original_width": 400, "original_height": 200, "value": {"x": x, "y": y, "keypointlabels": ["Tree"]}}
    region.update(extra)
    return region


def rect(x, y, w, h, rotation=0, label="Car"):
    return {"from_name": "rect", "to_name": "photo", "type": "rectanglelabels", "original_width": 400,
            "original_height": 200, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                                              "rectanglelabels": [label]}}


def test_config_finds_image_brush_and_smart_controls():
    assert CONFIG.image_name == "photo" and CONFIG.image_key == "url"
    assert CONFIG.brush_name == "mask" and CONFIG.brush_labels == ("Car", "Tree")
    assert CONFIG.keypoint_names == ("kp",) and CONFIG.rectangle_names == ("rect",)


@pytest.mark.parametrize(
    "xml, message",
    [
        ('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i"><Label value="A"/></KeyPointLabels></View>',
         'no <BrushLabels> or <PolygonLabels> bound to the image ("i")'),
        ('<View><Text name="t" value="$t"/><BrushLabels name="b" toName="t"><Label value="A"/></BrushLabels></View>',
         "no <Image> tag"),
        ("", "no label config"),
        ("<View><Image", "cannot be parsed"),
    ],
)
def test_config_errors_name_what_is_missing(xml, message):
    with pytest.raises(LabelConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_label_config(xml)


def test_keypoints_percent_to_pixels_and_polarity():
    ctx = {"result": [kp(25, 50, is_positive=True), kp(50, 10, is_positive=False), kp(75, 90)]}
    prompt = prompt_from_context(ctx, CONFIG, (200, 400))
    assert prompt.points == [[100.0, 100.0], [200.0, 20.0], [300.0, 180.0]]
    assert prompt.labels == [1, 0, 1] and prompt.box is None and prompt.label == "Tree"
    assert (prompt.original_width, prompt.original_height) == (400, 200)


def test_percentages_map_onto_the_loaded_image_size():
    prompt = prompt_from_context({"result": [kp(25, 50)]}, CONFIG, (100, 200))
    assert prompt.points == [[50.0, 50.0]]
    assert (prompt.original_width, prompt.original_height) == (400, 200)


def test_several_rectangles_last_one_wins():
    prompt = prompt_from_context({"result": [rect(0, 0, 10, 10), rect(50, 50, 25, 25)]}, CONFIG, (200, 400))
    assert prompt.box == [200.0, 100.0, 300.0, 150.0] and prompt.points == []


def test_rotated_rectangle_uses_its_axis_aligned_bounds():
    box = rectangle_to_box({"x": 50, "y": 50, "width": 25, "height": 10, "rotation": 90}, 400, 200)
    # 100 px wide, 20 px high, rotated 90 degrees clockwise about (200, 100).
    np.testing.assert_allclose(box, [180, 100, 200, 200], atol=1e-9)
    box = rectangle_to_box({"x": 0, "y": 0, "width": 10, "height": 10, "rotation": 45}, 100, 100)
    np.testing.assert_allclose(box, [-10 / math.sqrt(2), 0, 10 / math.sqrt(2), 20 / math.sqrt(2)], atol=1e-9)


def test_zero_size_rectangle_is_refused():
    with pytest.raises(PromptError, match="zero width or height"):
        prompt_from_context({"result": [rect(10, 10, 0, 5)]}, CONFIG, (200, 400))


def test_other_images_and_controls_are_ignored():
    other = kp(10, 10)
    other.update(from_name="kp_other", to_name="other")
    brush = {"from_name": "mask", "to_name": "photo", "type": "brushlabels", "value": {}}
    unknown = kp(10, 10, from_name="not_in_config")
    assert not prompt_from_context({"result": [other, brush, unknown]}, CONFIG, (200, 400))


@pytest.mark.parametrize("region", [kp("a", 1), {"from_name": "kp", "to_name": "photo", "type": "keypointlabels"}, "x"])
def test_malformed_regions_are_bad_requests(region):
    with pytest.raises(BadRequestError):
        prompt_from_context({"result": [region]}, CONFIG, (200, 400))


def test_label_mapping(caplog):
    assert brush_label_for("Tree", CONFIG) == "Tree"
    with caplog.at_level("INFO"):
        assert brush_label_for("Sky", CONFIG) == "Car"
    assert "no label 'Sky'" in caplog.text
    assert brush_label_for(None, CONFIG) == "Car"


def test_brush_region_round_trips_through_label_studio_rle():
    from label_studio_sdk.converter.brush import decode_rle

    mask = np.zeros((30, 50), bool)
    mask[5:20, 10:45] = True
    region = mask_to_brush_region(mask, "Car", 0.9, CONFIG, image_rotation=0)
    assert region["from_name"] == "mask" and region["to_name"] == "photo" and region["value"]["brushlabels"] == ["Car"]
    decoded = np.reshape(decode_rle(region["value"]["rle"]), (30, 50, 4))[:, :, 3] > 0
    np.testing.assert_array_equal(decoded, mask)


def test_fit_mask_resizes_to_the_reported_size():
    mask = np.zeros((10, 20), bool)
    mask[:, :10] = True
    fitted = fit_mask(mask, 40, 20)
    assert fitted.shape == (20, 40) and fitted[:, :20].all() and not fitted[:, 20:].any()
