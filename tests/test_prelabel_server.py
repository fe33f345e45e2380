"""``/predict`` without a click: masks from imported boxes, inside a time budget, the rest posted later."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from sam_backend.labelstudio.media import Credentials
from sam_backend.server.app import create_app
from sam_backend.sam.synthetic import bounding_box, iou

from fake_labelstudio import FakeLabelStudio
from test_demo_preset import BLUE, RED, box_at, disc_at, scene_with
from test_server import LABEL_CONFIG, decode_brush, make_backend

SIZE = (240, 360)


def box_region(mask, label="Cat"):
    x0, y0, x1, y1 = (float(v) for v in bounding_box(mask))
    h, w = mask.shape
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": w,
            "original_height": h, "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                                            "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}}


@pytest.fixture()
def scene():
    return scene_with(SIZE, [disc_at(SIZE, 0.3, 0.4, color=RED), box_at(SIZE, 0.72, 0.6, color=BLUE)])


@pytest.fixture()
def labelstudio(tmp_path, scene):
    files = tmp_path / "files"
    (files / "1").mkdir(parents=True)
    Image.fromarray(scene.image).save(files / "1" / "shapes.png")
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(files / "1" / "plain.png")
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    yield fake
    fake.close()


def body_for(tasks, project=1):
    return {"tasks": tasks, "project": f"{project}.1795260000", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": None}}


def detector_task(fake, scene, index, label="Cat"):
    return fake.add_task(1, "1/shapes.png", predictions=[
        {"id": 1 + index, "model_version": "detector-v3", "result": [box_region(scene.masks[index], label)]}])


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def demo():
    from sam_backend.sam.engine import SamEngine

    return SamEngine.from_preset("demo")


def test_retrieve_predictions_turns_imported_boxes_into_labelled_masks(demo, tmp_path, labelstudio, scene):
    backend = make_backend(demo, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    client = create_app(backend).test_client()
    tasks = [detector_task(labelstudio, scene, 1, "Dog"), labelstudio.add_task(1, "1/plain.png"),
             detector_task(labelstudio, scene, 0, "Cat")]
    results = client.post("/predict", json=body_for(tasks)).get_json()["results"]
    assert len(results) == 3
    assert results[1]["result"] == []  # nothing to start from in "boxes" mode
    for result, index, label in ((results[0], 1, "Dog"), (results[2], 0, "Cat")):
        (region,) = result["result"]
        assert region["value"]["brushlabels"] == [label]
        assert result["model_version"] == backend.model_version
        assert iou(decode_brush(region), scene.masks[index]) >= 0.8


def test_a_task_that_fails_does_not_stop_the_others(engine, tmp_path, labelstudio, scene, caplog):
    backend = make_backend(engine, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    client = create_app(backend).test_client()
    missing = labelstudio.add_task(1, "1/deleted.png", predictions=[{"id": 9, "result": [box_region(scene.masks[0])]}])
    tasks = [missing, detector_task(labelstudio, scene, 0), {"id": 77, "data": {}}]
    response = client.post("/predict", json=body_for(tasks))
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert results[0] == [] and len(results[1]["result"]) == 1 and results[2] == []
    assert f"Task {missing['id']}: no prediction" in caplog.text and "Task 77: no prediction" in caplog.text


def test_a_single_task_that_fails_answers_its_error(engine, tmp_path, labelstudio, scene):
    backend = make_backend(engine, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    client = create_app(backend).test_client()
    missing = labelstudio.add_task(1, "1/deleted.png", predictions=[{"id": 9, "result": [box_region(scene.masks[0])]}])
    response = client.post("/predict", json=body_for([missing]))
    assert response.status_code == 502 and "deleted.png" in response.get_json()["error"]


def test_what_misses_the_budget_is_posted_to_label_studio_later(engine, tmp_path, labelstudio, scene):
    backend = make_backend(engine, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    backend.predict_budget = 0.0
    client = create_app(backend).test_client()
    tasks = [detector_task(labelstudio, scene, i % 2) for i in range(4)]
    labelstudio.fail_imports = 1  # the first upload is refused once; the SDK retries it
    started = time.monotonic()
    results = client.post("/predict", json=body_for(tasks)).get_json()["results"]
    assert time.monotonic() - started < 5
    assert len(results) == 4 and results.count([]) >= 3  # at most one finished in no time
    posted = len(tasks) - results.count([])
    assert wait_for(lambda: len(labelstudio.predictions(1)) - 4 >= len(tasks) - posted), labelstudio.requests
    ours = [p for p in labelstudio.predictions(1) if p.get("model_version") == backend.model_version]
    assert sorted(p["task"] for p in ours) == sorted(t["id"] for t, r in zip(tasks, results) if r == [])
    assert all(len(p["result"]) == 1 and p["result"][0]["type"] == "brushlabels" for p in ours)


def test_a_task_still_computing_is_not_computed_twice(engine, tmp_path, labelstudio, scene):
    backend = make_backend(engine, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    backend.predict_budget = 0.0
    computed = []
    original = backend._prelabel_task

    def counting(engine, version, task, *args):
        computed.append(task["id"])
        time.sleep(0.3)
        return original(engine, version, task, *args)

    backend._prelabel_task = counting
    client = create_app(backend).test_client()
    tasks = [detector_task(labelstudio, scene, 0) for _ in range(3)]
    client.post("/predict", json=body_for(tasks))
    backend.predict_budget = 30.0
    second = client.post("/predict", json=body_for(tasks)).get_json()["results"]
    assert sorted(computed) == sorted(t["id"] for t in tasks)
    # The second request answers with whatever it waited for; nothing is posted twice.
    assert wait_for(lambda: backend.jobs.pending == 0)
    time.sleep(0.5)
    answered = {t["id"] for t, r in zip(tasks, second) if r != []}
    posted = [p["task"] for p in labelstudio.predictions(1) if p.get("model_version") == backend.model_version]
    assert sorted(posted + list(answered)) == sorted(t["id"] for t in tasks)


def test_without_label_studio_credentials_late_predictions_wait_for_the_next_request(engine, tmp_path, labelstudio, scene, caplog):
    backend = make_backend(engine, tmp_path, credentials=Credentials())
    backend.fetcher.fetch = lambda url, **kw: str(labelstudio.files / url.split("/data/upload/")[1])
    backend.predict_budget = 0.0
    client = create_app(backend).test_client()
    tasks = [detector_task(labelstudio, scene, 0) for _ in range(2)]
    first = client.post("/predict", json=body_for(tasks)).get_json()["results"]
    assert wait_for(lambda: backend.jobs.pending == 0)
    assert "could not be delivered" in caplog.text and "LABEL_STUDIO_URL" in caplog.text
    second = client.post("/predict", json=body_for(tasks)).get_json()["results"]
    for before, after in zip(first, second):
        assert (before == []) != (after == [])  # each prediction is answered exactly once
    assert not [p for p in labelstudio.predictions(1) if p.get("model_version") == backend.model_version]


def test_prelabel_mode_comes_from_extra_params(engine, tmp_path, labelstudio, scene, monkeypatch):
    monkeypatch.setenv("SAM_PRELABEL", "boxes")
    backend = make_backend(engine, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    client = create_app(backend).test_client()
    task = detector_task(labelstudio, scene, 0)
    client.post("/setup", json={"project": "1.1795260000", "schema": LABEL_CONFIG, "extra_params": {"prelabel": "off"}})
    assert client.post("/predict", json=body_for([task])).get_json()["results"][0]["result"] == []
    client.post("/setup", json={"project": "1.1795260000", "schema": LABEL_CONFIG,
                                "extra_params": '{"prelabel": "everything"}'})
    response = client.post("/predict", json=body_for([task]))
    assert response.status_code == 400 and "Unknown pre-labeling mode" in response.get_json()["error"]
