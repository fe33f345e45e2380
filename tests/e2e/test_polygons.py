"""Polygon output behind a real Label Studio: a click's polygons are saved in an annotation and exported as COCO.

The project uses the shipped ``label_config_polygons.xml``. Label Studio must
take the regions exactly as the backend returns them (interactive answer,
saved annotation, predictions from *Retrieve Predictions*), and its own COCO
export must hold each polygon as a segmentation in pixels of the image.
"""

from __future__ import annotations

import io
import json
import zipfile

import cv2
import numpy as np
import pytest

from harness import REPO, Project
from sam_backend.sam.synthetic import bounding_box, iou
from scenes import keypoint_region, rectangle_region

POLYGON_CONFIG = (REPO / "label_config_polygons.xml").read_text()
NAMES = ("landscape.jpg", "exif-rotated.jpg")


def draw(polygons: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Polygons in image pixels (pixel ``x`` spans ``[x, x+1)``) filled into an ``(H, W)`` mask."""
    canvas = np.zeros(size, np.uint8)
    for points in polygons:
        # fillPoly puts pixel centres at integers; 8 fractional bits keep sub-pixel vertices.
        cv2.fillPoly(canvas, [np.round((np.asarray(points) - 0.5) * 256).astype(np.int32)], 1, shift=8)
    return canvas.astype(bool)


def region_pixels(region: dict) -> np.ndarray:
    """A polygon region's points in pixels of the size it was made for."""
    scale = [region["original_width"] / 100.0, region["original_height"] / 100.0]
    return np.asarray(region["value"]["points"], np.float64) * scale


@pytest.fixture(scope="module")
def polygon_project(label_studio, backend, images) -> Project:
    project = label_studio.create_project("sam-backend e2e: polygons", label_config=POLYGON_CONFIG)
    chosen = {name: images[name] for name in NAMES}
    tasks = label_studio.import_files(project["id"], {name: image.data for name, image in chosen.items()})
    ml = label_studio.connect_backend(project["id"], backend.url)
    return Project(project["id"], ml, tasks, chosen)


def click_polygons(label_studio, project: Project, name: str) -> list[dict]:
    image = project.images[name]
    click = keypoint_region(image, image.click())
    answer = label_studio.interactive(project.ml["id"], project.tasks[name]["id"], [click])
    assert "errors" not in answer, answer
    return answer["data"]["result"]


@pytest.mark.parametrize("name", NAMES)
def test_a_click_returns_polygons_of_the_clicked_shape(label_studio, polygon_project, name):
    image = polygon_project.images[name]
    regions = click_polygons(label_studio, polygon_project, name)
    assert regions
    for region in regions:
        assert region["type"] == "polygonlabels" and region["from_name"] == "polygon" and region["to_name"] == "image"
        assert region["value"]["polygonlabels"] == ["Object"] and region["value"]["closed"] is True
        assert len(region["value"]["points"]) >= 3
        # The displayed size: for the EXIF image that is the stored size transposed.
        assert (region["original_width"], region["original_height"]) == (image.width, image.height)
    drawn = draw([region_pixels(r) for r in regions], image.size)
    assert iou(drawn, image.disc) > 0.6, f"{name}: IoU {iou(drawn, image.disc):.2f} with the clicked disc"
    assert drawn[image.box].mean() < 0.2, "the polygon spills over the other shape"


def test_the_polygons_are_saved_and_exported_as_coco_segmentations(label_studio, polygon_project):
    name = "landscape.jpg"
    image = polygon_project.images[name]
    task_id = polygon_project.tasks[name]["id"]
    regions = click_polygons(label_studio, polygon_project, name)

    # Accept the suggestion and submit, as the editor does: the result goes back as it came.
    saved = label_studio.api("POST", f"/api/tasks/{task_id}/annotations/",
                             json={"result": regions, "was_cancelled": False, "lead_time": 2.5}).json()
    stored = label_studio.api("GET", f"/api/annotations/{saved['id']}").json()["result"]
    assert len(stored) == len(regions)
    by_id = {r["id"]: r for r in stored}
    for region in regions:
        kept = by_id[region["id"]]
        assert kept["type"] == "polygonlabels" and kept["value"]["polygonlabels"] == ["Object"]
        np.testing.assert_allclose(kept["value"]["points"], region["value"]["points"])

    export = label_studio.api("GET", f"/api/projects/{polygon_project.id}/export?exportType=COCO")
    with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
        (result_name,) = [n for n in archive.namelist() if n.endswith("result.json")]
        coco = json.loads(archive.read(result_name))
    (entry,) = [i for i in coco["images"] if i["file_name"].endswith(name)]
    assert (entry["width"], entry["height"]) == (image.width, image.height)
    categories = {c["id"]: c for c in coco["categories"]}
    annotations = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
    assert len(annotations) == len(regions)
    segmentations = []
    for annotation in annotations:
        # Label Studio 1.23 files every label that a <KeyPointLabels> also has (the smart
        # keypoints share the polygon labels) under one keypoint category, "default".
        category = categories[annotation["category_id"]]
        assert category["name"] == "Object" or (
            category["name"] == "default" and "Object" in category.get("keypoints", [])), coco["categories"]
        (flat,) = annotation["segmentation"]
        segmentations.append(np.asarray(flat, np.float64).reshape(-1, 2))
    # Each exported polygon is one of ours, in pixels.
    ours = sorted((region_pixels(r) for r in regions), key=len)
    for exported, mine in zip(sorted(segmentations, key=len), ours):
        np.testing.assert_allclose(exported, mine, atol=1e-6)
    drawn = draw(segmentations, image.size)
    assert iou(drawn, image.disc) > 0.6, f"COCO segmentation: IoU {iou(drawn, image.disc):.2f} with the disc"
    largest = max(annotations, key=lambda a: a["area"])
    assert 0.7 < largest["area"] / image.disc.sum() < 1.3


def test_retrieve_predictions_stores_polygons_from_a_detectors_boxes(label_studio, backend, polygon_project):
    version = backend.health()["model_version"]
    for name, image in polygon_project.images.items():
        label_studio.api("POST", "/api/predictions", json={
            "task": polygon_project.tasks[name]["id"], "model_version": "detector-v1", "score": 0.9,
            "result": [rectangle_region(image, tuple(float(v) for v in bounding_box(image.disc)))]})
    answer = label_studio.api(
        "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={polygon_project.id}",
        json={"selectedItems": {"all": True, "excluded": []}}).json()
    assert answer.get("processed_items") == len(polygon_project.images), answer
    tasks = {t["id"]: t for t in label_studio.tasks(polygon_project.id)}
    for name, image in polygon_project.images.items():
        (prediction,) = [p for p in tasks[polygon_project.tasks[name]["id"]]["predictions"]
                         if p["model_version"] == version]
        regions = prediction["result"]
        assert regions and {r["type"] for r in regions} == {"polygonlabels"}, name
        drawn = draw([region_pixels(r) for r in regions], image.size)
        assert iou(drawn, image.disc) > 0.6, f"{name}: IoU {iou(drawn, image.disc):.2f} with the boxed disc"
