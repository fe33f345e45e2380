"""Learning from the team's annotations behind a real Label Studio.

Annotations are submitted through Label Studio's API (its project webhook tells
the backend of each), "Start Training" is pressed through the API (Label Studio
posts ``START_TRAINING`` to ``/webhook``), the backend trains in the
background, and the next prediction carries the project's new model version.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import requests
from PIL import Image

from harness import Backend, wait_for
from sam_backend.labelstudio.rle import mask_to_rle
from sam_backend.sam.synthetic import generate_cell_scene, interior_point

CELLS = 10


@pytest.fixture(scope="module")
def training_backend(label_studio, tmp_path_factory, artifacts):
    """A backend of its own: a short training, and no automatic one while the test annotates."""
    log = artifacts / "sam-backend-learning.log"
    log.write_text("")
    served = Backend.launch("demo", label_studio, tmp_path_factory.mktemp("sam-backend-learning"), log,
                            settings={"SAM_TRAIN_STEPS": "100", "SAM_TRAIN_EVERY": "100"})
    yield served
    served.stop()


def brush(mask: np.ndarray) -> dict:
    height, width = mask.shape
    return {"from_name": "brush", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Object"]}}


def test_annotations_then_start_training_give_a_new_model_version(label_studio, training_backend):
    rng = np.random.default_rng(11)
    scenes = {f"cells-{i}.png": generate_cell_scene(rng) for i in range(CELLS)}
    files = {}
    for name, scene in scenes.items():
        buffer = io.BytesIO()
        Image.fromarray(scene.image).save(buffer, format="PNG")
        files[name] = buffer.getvalue()
    project = label_studio.create_project("sam-backend e2e learning")
    tasks = label_studio.import_files(project["id"], files)
    ml = label_studio.connect_backend(project["id"], training_backend.url)

    for name, task in tasks.items():
        result = [{"id": f"c{i}", **brush(mask)} for i, mask in enumerate(scenes[name].masks)]
        label_studio.api("POST", f"/api/tasks/{task['id']}/annotations/", json={"result": result})
    # Label Studio's project webhook brought each annotation to the backend, which counts them for SAM_TRAIN_EVERY.
    log = training_backend.server.log
    wait_for(lambda: f"{CELLS} of 100 annotations before the next training" in log.read_text(), 60,
             "the annotation events", training_backend.server)

    # "Start Training" in the model's settings.
    label_studio.api("POST", f"/api/ml/{ml['id']}/train")
    wait_for(lambda: re.search(rf"Project {project['id']}: training (accepted|rejected|failed|skipped)", log.read_text()),
             600, "the training", training_backend.server)
    text = log.read_text()
    assert f"Project {project['id']}: training accepted" in text, text[-3000:]
    version = f"+p{project['id']}.v1"

    # Label Studio lists the new version (it asks the backend's /versions)...
    listed = label_studio.api("GET", f"/api/ml/{ml['id']}/versions").json()["versions"]
    assert any(v.endswith(version) for v in listed), listed
    # ... and the next prediction carries it.
    name, task = next(iter(tasks.items()))
    scene = scenes[name]
    x, y = interior_point(scene.masks[0])
    height, width = scene.image.shape[:2]
    keypoint = {"id": "kp1", "from_name": "keypoint", "to_name": "image", "type": "keypointlabels",
                "origin": "manual", "original_width": width, "original_height": height, "image_rotation": 0,
                "value": {"x": 100 * (x + 0.5) / width, "y": 100 * (y + 0.5) / height, "width": 0.6,
                          "keypointlabels": ["Object"]}, "is_positive": True}
    answer = label_studio.interactive(ml["id"], task["id"], [keypoint])
    assert "errors" not in answer and answer["data"]["result"], answer
    assert answer["data"]["model_version"].endswith(version), answer["data"]["model_version"]
    metrics = requests.get(training_backend.url + "/metrics", timeout=10).text
    assert 'sam_training_runs_total{cause="better",outcome="accepted"} 1.0' in metrics
