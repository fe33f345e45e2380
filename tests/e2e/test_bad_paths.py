"""What an annotator sees when things break: a task whose image is gone, a backend restarted mid-session."""

from __future__ import annotations

from dataclasses import replace

import pytest
import requests

from harness import make_project
from scenes import decode_brush, keypoint_region


@pytest.fixture(scope="module")
def project(label_studio, backend, images):
    """A project of its own, so deleting a file here disturbs no other test."""
    chosen = {name: images[name] for name in ("landscape.jpg", "portrait.jpg")}
    chosen["deleted.png"] = replace(images["grayscale.png"], name="deleted.png")
    return make_project(label_studio, backend, "sam-backend e2e bad paths", chosen)


def click(label_studio, project, name: str) -> dict:
    image = project.images[name]
    return label_studio.interactive(project.ml["id"], project.tasks[name]["id"], [keypoint_region(image, image.click())])


def assert_mask_on_the_click(answer: dict, image) -> None:
    assert "errors" not in answer, answer
    mask = decode_brush(answer["data"]["result"][0])
    x, y = image.click()
    assert mask.shape == image.size and mask[int(y), int(x)]


def test_a_deleted_image_is_an_error_for_its_task_only(label_studio, backend, project):
    task = project.tasks["deleted.png"]
    label_studio.upload_path(task["data"]["image"]).unlink()
    # Label Studio itself no longer serves it (1.23 answers 500, not 404, for a missing upload)...
    assert label_studio.api("GET", task["data"]["image"], expect=None).status_code >= 400

    answer = click(label_studio, project, "deleted.png")
    # ...and the editor gets an error for this task (Label Studio passes on our 502 as its message).
    assert answer.get("errors") and "data" not in answer, answer
    assert "502" in answer["errors"][0], answer
    assert backend.health()["status"] == "UP"

    for name in ("landscape.jpg", "portrait.jpg"):
        assert_mask_on_the_click(click(label_studio, project, name), project.images[name])


def test_a_backend_restarted_mid_session_works_again_without_reconnecting(label_studio, backend, project):
    ml_id = project.ml["id"]
    assert_mask_on_the_click(click(label_studio, project, "landscape.jpg"), project.images["landscape.jpg"])

    backend.stop()
    try:
        with pytest.raises(requests.ConnectionError):
            backend.health()
        answer = click(label_studio, project, "portrait.jpg")
        assert answer.get("errors") and "data" not in answer, answer
        assert "Connection" in answer["errors"][0], answer
        assert label_studio.api("GET", f"/api/ml/{ml_id}").json()["state"] == "DI"  # Disconnected
    finally:
        backend.start()  # same port, as after a crash and a restart by the supervisor

    # The same ML backend entry, not reconnected in the UI: clicks work again.
    for name in ("portrait.jpg", "landscape.jpg"):
        assert_mask_on_the_click(click(label_studio, project, name), project.images[name])
    assert label_studio.api("GET", f"/api/ml/{ml_id}").json()["state"] == "CO"
    assert [m["id"] for m in label_studio.api("GET", f"/api/ml?project={project.id}").json()] == [ml_id]
