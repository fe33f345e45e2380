"""Pre-annotation against the real Label Studio: a detector's boxes become masks, whole projects resumably.

Each test makes its own project: the shared one already has our (empty)
predictions from *Retrieve Predictions*, which a resumable run would skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from sam_backend.sam.synthetic import bounding_box, iou
from harness import Backend, make_project, wait_for
from scenes import decode_brush, rectangle_region

DETECTOR = "detector-v1"
# The demo preset's IoU head is less confident than SAM's (docs/preannotation.md).
DEMO_AUTO = {"SAM_AUTO_PRED_IOU_THRESH": "0.8", "SAM_AUTO_STABILITY_SCORE_THRESH": "0.9"}


def import_detector_boxes(label_studio, project, names) -> None:
    for name in names:
        image = project.images[name]
        label_studio.api("POST", "/api/predictions", json={
            "task": project.tasks[name]["id"], "model_version": DETECTOR, "score": 0.9,
            "result": [rectangle_region(image, tuple(float(v) for v in bounding_box(image.disc)))]})


def masks_of(prediction) -> list[np.ndarray]:
    assert all(region["type"] == "brushlabels" for region in prediction["result"])
    return [decode_brush(region) for region in prediction["result"]]


def ours(label_studio, project, version) -> dict[int, list[dict]]:
    return {t["id"]: [p for p in t["predictions"] if p["model_version"] == version]
            for t in label_studio.tasks(project.id)}


def test_retrieve_predictions_turns_a_detectors_boxes_into_masks(label_studio, backend, images):
    project = make_project(label_studio, backend, "sam-backend e2e: detector boxes", images)
    import_detector_boxes(label_studio, project, images)
    version = backend.health()["model_version"]
    answer = label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
                              json={"selectedItems": {"all": True, "excluded": []}}).json()
    assert answer.get("processed_items") == len(images), answer
    predictions = ours(label_studio, project, version)
    for name, image in images.items():
        (prediction,) = predictions[project.tasks[name]["id"]]
        (mask,) = masks_of(prediction)
        assert mask.shape == image.size, name  # displayed size, EXIF applied
        assert prediction["result"][0]["value"]["brushlabels"] == ["Object"]
        assert iou(mask, image.disc) > 0.6, f"{name}: IoU {iou(mask, image.disc):.2f} with the boxed disc"


def check_one_mask_prediction_each(predictions, project, images, boxed) -> None:
    """Exactly one prediction per task (nothing duplicated), whose masks find the task's disc."""
    for name, image in images.items():
        (prediction,) = predictions[project.tasks[name]["id"]]
        masks = masks_of(prediction)
        assert masks and all(m.shape == image.size for m in masks), name
        best = max(iou(m, image.disc) for m in masks)
        assert best > 0.6, f"{name} ({'box' if name in boxed else 'auto'}): best IoU {best:.2f} with the disc"
        if name in boxed:
            assert len(masks) == 1  # a detector's box gives one mask


def run_preannotate(label_studio, tmp_path, project, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "LABEL_STUDIO_"))}
    env.update(DEMO_AUTO, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.personal_token,
               MODEL_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "sam_backend", "preannotate", "--project", str(project.id), "--preset", "demo",
         "--mode", "boxes-then-auto", "--batch-size", "2", "--no-progress", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_preannotate_a_whole_project_and_resume_without_duplicates(label_studio, backend, images, tmp_path):
    project = make_project(label_studio, backend, "sam-backend e2e: preannotate", images)
    boxed = sorted(images)[:2]
    import_detector_boxes(label_studio, project, boxed)
    version = backend.health()["model_version"]  # the CLI's predictions carry the server's version

    first = run_preannotate(label_studio, tmp_path, project, "--limit", "3")  # "interrupted" after 3 tasks
    assert first.returncode == 0, first.stderr + first.stdout
    assert sum(bool(v) for v in ours(label_studio, project, version).values()) == 3

    second = run_preannotate(label_studio, tmp_path, project)
    assert second.returncode == 0, second.stderr + second.stdout
    assert f"{len(images) - 3} task(s) got a prediction" in second.stdout, second.stdout
    assert "3 task(s) skipped" in second.stdout, second.stdout
    predictions = ours(label_studio, project, version)
    check_one_mask_prediction_each(predictions, project, images, boxed)

    ids = {task: [p["id"] for p in v] for task, v in predictions.items()}
    third = run_preannotate(label_studio, tmp_path, project)
    assert third.returncode == 0 and f"{len(images)} task(s) skipped" in third.stdout, third.stdout
    assert {task: [p["id"] for p in v] for task, v in ours(label_studio, project, version).items()} == ids


def test_retrieve_predictions_past_the_budget_are_posted_later(label_studio, images, tmp_path_factory, artifacts):
    """A budget of 0 s: Label Studio gets no prediction in its answer; the backend posts them all afterwards."""
    log = artifacts / "sam-backend-budget.log"
    log.write_text("")
    served = Backend.launch("demo", label_studio, tmp_path_factory.mktemp("budget"), log,
                            settings={"SAM_PREDICT_BUDGET": "0", "SAM_PRELABEL": "auto", **DEMO_AUTO})
    try:
        project = make_project(label_studio, served, "sam-backend e2e: budget", images)
        version = served.health()["model_version"]
        started = time.monotonic()
        label_studio.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}",
                         json={"selectedItems": {"all": True, "excluded": []}})
        assert time.monotonic() - started < 30  # not the minutes the masks take on a CPU
        assert sum(len(v) for v in ours(label_studio, project, version).values()) < len(images)

        def all_posted():
            return all(len(v) == 1 for v in ours(label_studio, project, version).values())

        wait_for(all_posted, 600, "the late predictions to reach Label Studio", served.server, interval=2.0)
        for name, image in images.items():
            (prediction,) = ours(label_studio, project, version)[project.tasks[name]["id"]]
            masks = masks_of(prediction)
            assert masks and max(iou(m, image.disc) for m in masks) > 0.6, name
        assert "posted to Label Studio after the request's budget" in log.read_text()
    finally:
        served.stop()


def test_preannotate_on_ray_fills_a_project(label_studio, backend, images, tmp_path, monkeypatch):
    """``preannotate --ray``: a local Ray instance (2 CPUs, a small object store), the model in its actors."""
    project = make_project(label_studio, backend, "sam-backend e2e: preannotate --ray", images)
    boxed = sorted(images)[:2]
    import_detector_boxes(label_studio, project, boxed)
    version = backend.health()["model_version"]
    monkeypatch.setenv("RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES", str(300 * 1024 * 1024))  # shared CI machine

    first = run_preannotate(label_studio, tmp_path, project, "--ray", "--ray-actors", "2")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "on Ray (local, 2 actor(s))" in first.stderr, first.stderr
    assert f"{len(images)} task(s) got a prediction" in first.stdout, first.stdout
    predictions = ours(label_studio, project, version)
    check_one_mask_prediction_each(predictions, project, images, boxed)

    ids = {task: [p["id"] for p in v] for task, v in predictions.items()}
    second = run_preannotate(label_studio, tmp_path, project, "--ray")
    assert second.returncode == 0 and f"{len(images)} task(s) skipped" in second.stdout, second.stderr + second.stdout
    assert {task: [p["id"] for p in v] for task, v in ours(label_studio, project, version).items()} == ids
