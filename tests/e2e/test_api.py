"""The backend behind a real Label Studio, driven through Label Studio's API as its UI drives it."""

from __future__ import annotations

import pytest

from sam_backend.sam.synthetic import iou
from scenes import check_exif_image, decode_brush, keypoint_region, rectangle_region

IMAGES = ["landscape.jpg", "portrait.jpg", "exif-rotated.jpg", "grayscale.png", "alpha.png"]
PROMPTS = ["point", "point+negative", "box", "box+point"]


def test_label_studio_reports_the_backend_connected(label_studio, backend, project):
    ml = label_studio.api("GET", f"/api/ml/{project.ml['id']}").json()  # re-checks /health and /setup
    assert ml["state"] == "CO", ml  # MLBackendState.CONNECTED
    assert ml["is_interactive"] is True
    assert ml["model_version"] == backend.health()["model_version"]
    listed = label_studio.api("GET", f"/api/ml?project={project.id}").json()
    assert [m["id"] for m in listed] == [project.ml["id"]]


def test_uploads_are_stored_as_sent(label_studio, project):
    """Label Studio keeps the uploaded bytes (EXIF tag included), so the backend sees what the browser sees."""
    check_exif_image(project.images["exif-rotated.jpg"])
    for name, task in project.tasks.items():
        assert label_studio.upload_path(task["data"]["image"]).read_bytes() == project.images[name].data


def prompt_regions(image, prompt: str) -> list[dict]:
    click = keypoint_region(image, image.click())
    if prompt == "point":
        return [click]
    if prompt == "point+negative":
        return [click, keypoint_region(image, image.negative(), positive=False)]
    box = rectangle_region(image, image.disc_box())
    return [box] if prompt == "box" else [box, click]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("name", IMAGES)
def test_interactive_annotating_returns_the_clicked_shape(label_studio, backend, project, name, prompt):
    image = project.images[name]
    answer = label_studio.interactive(project.ml["id"], project.tasks[name]["id"], prompt_regions(image, prompt))
    assert "errors" not in answer, answer
    prediction = answer["data"]
    assert prediction["model_version"] == backend.health()["model_version"]
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "brush" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Object"]
    # The displayed size: for the EXIF image that is the stored size transposed.
    assert (region["original_width"], region["original_height"]) == (image.width, image.height)
    mask = decode_brush(region)
    assert mask.shape == image.size

    x, y = image.click()
    assert mask[int(y), int(x)], "the clicked point is outside the mask"
    if prompt == "point+negative":
        nx, ny = image.negative()
        assert not mask[int(ny), int(nx)], "the negative point is inside the mask"
    # And the mask is the clicked shape, not a blob that happens to cover the point.
    assert iou(mask, image.disc) > 0.6, f"IoU with the clicked disc {iou(mask, image.disc):.2f}"
    assert mask[image.box].mean() < 0.2, "the mask spills over the other shape"


def predictions_by_task(label_studio, project) -> dict[int, list[dict]]:
    return {task["id"]: task["predictions"] for task in label_studio.tasks(project.id)}


def test_retrieve_predictions_stores_our_model_version_once(label_studio, backend, project):
    """Data Manager → Actions → *Retrieve Predictions* for all tasks, twice."""
    version = backend.health()["model_version"]
    action = ("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}")
    selected = {"selectedItems": {"all": True, "excluded": []}}

    answer = label_studio.api(*action, json=selected).json()
    assert answer.get("processed_items") == len(project.tasks), answer
    first = predictions_by_task(label_studio, project)
    assert set(first) == {t["id"] for t in project.tasks.values()}
    for task_id, predictions in first.items():
        assert [p["model_version"] for p in predictions] == [version], (task_id, predictions)

    label_studio.api(*action, json=selected)
    second = predictions_by_task(label_studio, project)
    assert {k: [p["id"] for p in v] for k, v in second.items()} == {k: [p["id"] for p in v] for k, v in first.items()}

