"""Polygon regions through the served backend: clicks, ``/predict`` without a click, ``sam-backend preannotate``.

The demo preset segments generated shapes well (``test_demo_preset.py``), so
the polygons it returns are drawn back and compared with the true shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.sam.synthetic import bounding_box, interior_point, iou
from sam_backend.server.app import create_app
from sam_backend.server.prelabel import PrelabelSettings, predict_task_masks

from test_demo_preset import BLUE, RED, box_at, disc_at, scene_with
from test_polygons import draw_regions
from test_server import keypoint, make_backend, predict_body

REPO = Path(__file__).resolve().parents[1]
POLYGON_CONFIG = (REPO / "label_config_polygons.xml").read_text()
BRUSH_CONFIG = (REPO / "label_config.xml").read_text()
# The shipped brush config with the polygon control added: both kinds on one image.
BOTH_CONFIG = BRUSH_CONFIG.replace(
    "</BrushLabels>",
    '</BrushLabels>\n  <PolygonLabels name="polygon" toName="image"><Label value="Object"/>'
    '<Label value="Background"/></PolygonLabels>',
)
SIZE = (300, 460)


@pytest.fixture(scope="module")
def demo():
    from sam_backend.sam.engine import SamEngine

    return SamEngine.from_preset("demo")


@pytest.fixture(scope="module")
def scene():
    return scene_with(SIZE, [disc_at(SIZE, 0.3, 0.4, color=RED), box_at(SIZE, 0.72, 0.62, color=BLUE)])


@pytest.fixture()
def served(demo, scene, media, tmp_path):
    """A test client of the demo backend and the scene's URL on the media server."""
    Image.fromarray(scene.image).save(media.root / "shapes.png")
    return create_app(make_backend(demo, tmp_path)).test_client(), f"{media.url}/shapes.png"


def click_on(mask, label="Object"):
    h, w = mask.shape
    x, y = interior_point(mask)
    return keypoint(100 * (x + 0.5) / w, 100 * (y + 0.5) / h, label=label, width=w, height=h)


def box_on(mask, label="Object"):
    x0, y0, x1, y1 = (float(v) for v in bounding_box(mask))
    h, w = mask.shape
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                      "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}}


def setup(client, label_config, extra_params=None):
    answer = client.post("/setup", json={"project": "1.1795260000", "schema": label_config,
                                         "extra_params": extra_params})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def click(client, url, regions, label_config):
    answer = client.post("/predict", json=predict_body(url, regions, label_config=label_config))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()["results"][0]["result"]


# ------------------------------------------------------------------ interactive


@pytest.mark.parametrize("prompt", ["point", "box"])
def test_click_with_a_polygon_config_returns_polygons_of_the_shape(served, scene, prompt):
    client, url = served
    disc, _ = scene.masks
    regions = click(client, url, [click_on(disc) if prompt == "point" else box_on(disc)], POLYGON_CONFIG)
    assert regions and all(r["type"] == "polygonlabels" for r in regions)
    for region in regions:
        assert region["from_name"] == "polygon" and region["to_name"] == "image"
        assert region["value"]["polygonlabels"] == ["Object"] and region["value"]["closed"] is True
        assert (region["original_width"], region["original_height"]) == (SIZE[1], SIZE[0])
        assert len(region["value"]["points"]) >= 3
    drawn = draw_regions(regions)
    assert iou(drawn, disc) >= 0.8, f"IoU {iou(drawn, disc):.3f} with the clicked disc"


def test_click_label_maps_onto_the_polygon_control(served, scene):
    client, url = served
    disc, _ = scene.masks
    regions = click(client, url, [click_on(disc, label="Background")], POLYGON_CONFIG)
    assert {r["value"]["polygonlabels"][0] for r in regions} == {"Background"}
    config = POLYGON_CONFIG.replace('<Label value="Background" background="#4D96FF"/>\n  </PolygonLabels>',
                                    "</PolygonLabels>")
    assert parse_label_config(config).polygon_labels == ("Object",)
    regions = click(client, url, [click_on(disc, label="Background")], config)
    assert {r["value"]["polygonlabels"][0] for r in regions} == {"Object"}  # its first label


def test_with_both_controls_brush_by_default_polygons_when_the_project_says(served, scene, monkeypatch):
    client, url = served
    disc, _ = scene.masks
    assert [r["type"] for r in click(client, url, [click_on(disc)], BOTH_CONFIG)] == ["brushlabels"]

    monkeypatch.setenv("SAM_OUTPUT", "polygon")
    assert {r["type"] for r in click(client, url, [click_on(disc)], BOTH_CONFIG)} == {"polygonlabels"}

    setup(client, BOTH_CONFIG, {"output": "both"})  # the project's extra params win
    kinds = [r["type"] for r in click(client, url, [click_on(disc)], BOTH_CONFIG)]
    assert kinds[0] == "brushlabels" and set(kinds[1:]) == {"polygonlabels"}

    setup(client, BOTH_CONFIG, '{"output": "brush"}')  # as Label Studio sends it: a JSON string
    assert [r["type"] for r in click(client, url, [click_on(disc)], BOTH_CONFIG)] == ["brushlabels"]


def test_polygon_settings_from_extra_params_apply(served, scene):
    client, url = served
    disc, _ = scene.masks
    fine = click(client, url, [click_on(disc)], POLYGON_CONFIG)
    setup(client, POLYGON_CONFIG, {"polygon_tolerance": 4, "polygon_max_parts": 1})
    coarse = click(client, url, [click_on(disc)], POLYGON_CONFIG)
    assert len(coarse) == 1
    assert len(coarse[0]["value"]["points"]) < max(len(r["value"]["points"]) for r in fine)


def test_a_project_asking_for_polygons_without_a_polygon_control_is_told(served, scene):
    client, url = served
    disc, _ = scene.masks
    answer = setup(client, BRUSH_CONFIG, {"output": "polygon"})
    assert "no <PolygonLabels> bound to the image" in answer["warning"]
    response = client.post("/predict", json=predict_body(url, [click_on(disc)], label_config=BRUSH_CONFIG))
    assert response.status_code == 422
    assert "asks for 'polygon' output" in response.get_json()["error"]
    setup(client, BRUSH_CONFIG, {"output": "sideways"})
    response = client.post("/predict", json=predict_body(url, [click_on(disc)], label_config=BRUSH_CONFIG))
    assert response.status_code == 400 and "Unknown output kind" in response.get_json()["error"]


# ------------------------------------------------------------------ without a click


def test_prelabel_boxes_become_polygons(demo, scene):
    config = parse_label_config(POLYGON_CONFIG)
    disc, rect = scene.masks
    boxes = [box_on(disc), box_on(rect, "Background")]
    task = {"id": 3, "predictions": [{"model_version": "detector", "result": boxes}]}
    found = predict_task_masks(demo, demo.encode(scene.image), task, config, PrelabelSettings(mode="boxes"))
    assert found.source == "boxes"
    by_label = {}
    for region in found.regions:
        assert region["type"] == "polygonlabels" and region["from_name"] == "polygon"
        by_label.setdefault(region["value"]["polygonlabels"][0], []).append(region)
    assert iou(draw_regions(by_label["Object"]), disc) >= 0.8
    assert iou(draw_regions(by_label["Background"]), rect) >= 0.8
    assert found.score is not None


def test_automatic_masks_become_polygons(demo, scene):
    config = parse_label_config(POLYGON_CONFIG)
    settings = PrelabelSettings.from_sources({}, {"prelabel": "auto", "pred_iou_thresh": 0.8,
                                                  "stability_score_thresh": 0.9, "points_per_side": 8})
    found = predict_task_masks(demo, demo.encode(scene.image), {"id": 4}, config, settings)
    assert found.source == "auto" and found.regions
    assert {r["type"] for r in found.regions} == {"polygonlabels"}
    assert {r["value"]["polygonlabels"][0] for r in found.regions} == {"Object"}
    drawn = draw_regions(found.regions)
    for truth in scene.masks:
        assert drawn[truth].mean() > 0.8  # every shape is outlined


def test_retrieve_predictions_with_a_polygon_config(served, scene):
    client, url = served
    disc, _ = scene.masks
    body = predict_body(url, None, label_config=POLYGON_CONFIG)
    body["tasks"][0]["predictions"] = [{"id": 1, "model_version": "detector", "result": [box_on(disc)]}]
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    (prediction,) = answer.get_json()["results"]
    assert {r["type"] for r in prediction["result"]} == {"polygonlabels"}
    assert iou(draw_regions(prediction["result"]), disc) >= 0.8


# ------------------------------------------------------------------ sam-backend preannotate


@pytest.fixture()
def labelstudio(tmp_path, scene):
    from fake_labelstudio import FakeLabelStudio

    files = tmp_path / "files"
    (files / "5").mkdir(parents=True)
    Image.fromarray(scene.image).save(files / "5" / "shapes.png")
    fake = FakeLabelStudio(files, label_config=POLYGON_CONFIG)
    disc, _ = scene.masks
    fake.add_task(5, "5/shapes.png", predictions=[{"id": 1, "model_version": "detector", "result": [box_on(disc)]}])
    yield fake
    fake.close()


def preannotate(fake, tmp_path, *extra):
    from sam_backend.commands.cli import main

    return main(["preannotate", "--url", fake.url, "--api-key", fake.token, "--project", "5", "--preset", "demo",
                 "--cache-dir", str(tmp_path / "store"), "--no-progress", *extra])


def test_preannotate_uploads_polygons_for_a_polygon_project(labelstudio, scene, tmp_path, capsys):
    assert preannotate(labelstudio, tmp_path) == 0
    (prediction,) = [p for p in labelstudio.predictions(5) if "sam-backend" in str(p.get("model_version"))]
    assert prediction["result"] and {r["type"] for r in prediction["result"]} == {"polygonlabels"}
    assert iou(draw_regions(prediction["result"]), scene.masks[0]) >= 0.8


def test_preannotate_output_flag(labelstudio, scene, tmp_path, caplog):
    labelstudio.label_config = BRUSH_CONFIG
    assert preannotate(labelstudio, tmp_path, "--output", "polygon") == 2
    assert "no <PolygonLabels> bound to the image" in caplog.text
    labelstudio.label_config = BOTH_CONFIG
    assert preannotate(labelstudio, tmp_path, "--output", "both") == 0
    (prediction,) = [p for p in labelstudio.predictions(5) if "sam-backend" in str(p.get("model_version"))]
    kinds = [r["type"] for r in prediction["result"]]
    assert kinds[0] == "brushlabels" and set(kinds[1:]) == {"polygonlabels"}
