"""SAM 3 concept prompts behind a real Label Studio, with the tiny SAM 3 preset.

A server started with a concept preset (``SAM_CONCEPT_PRESET``, made by
``sam-backend tiny-preset sam3``) and the shipped ``label_config_concepts.xml``
(which Label Studio must accept): a phrase typed into the TextArea, sent
through Label Studio's interactive API, returns regions of the chosen label,
which Label Studio saves as an annotation; an exemplar box does too; a bad
phrase reaches the editor as an error; ``preannotate --mode concepts`` fills
the project. In the editor itself (Chromium), an exemplar box and then a
counter-example box of the same label are sent to the backend together.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from editor import log_in, open_task, pick_smart_tool, screen_point, turn_on_auto_annotation
from harness import REPO, Backend, Project, wait_for

CONCEPT_CONFIG = (REPO / "label_config_concepts.xml").read_text()
NAMES = ("landscape.jpg", "portrait.jpg")


@pytest.fixture(scope="module")
def concept_preset(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("sam3") / "sam3-tiny"
    done = subprocess.run([sys.executable, "-m", "sam_backend", "tiny-preset", "sam3", str(directory)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return str(directory)


@pytest.fixture(scope="module")
def concept_backend(label_studio, concept_preset, tmp_path_factory, artifacts):
    log = artifacts / "sam-backend-concepts.log"
    log.write_text("")
    served = Backend.launch("demo", label_studio, tmp_path_factory.mktemp("concepts"), log,
                            settings={"SAM_CONCEPT_PRESET": concept_preset})
    try:
        wait_for(lambda: served.health().get("concepts", {}).get("state") == "ready", 300, "SAM 3 to load",
                 served.server)
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def concept_project(label_studio, concept_backend, images) -> Project:
    project = label_studio.create_project("sam-backend e2e: concepts", label_config=CONCEPT_CONFIG)
    chosen = {name: images[name] for name in NAMES}
    tasks = label_studio.import_files(project["id"], {name: image.data for name, image in chosen.items()})
    ml = label_studio.connect_backend(project["id"], concept_backend.url)
    return Project(project["id"], ml, tasks, chosen)


def typed(text: str) -> dict:
    return {"id": "prompt1", "from_name": "prompt", "to_name": "image", "type": "textarea", "origin": "manual",
            "value": {"text": [text]}}


def test_a_typed_phrase_returns_every_instance_as_regions_of_its_label(label_studio, concept_backend,
                                                                       concept_project):
    name = "landscape.jpg"
    image, task_id = concept_project.images[name], concept_project.tasks[name]["id"]
    answer = label_studio.interactive(concept_project.ml["id"], task_id, [typed("Can: round shapes")])
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]
    assert len(regions) >= 2, answer
    for region in regions:
        assert region["type"] == "brushlabels" and region["from_name"] == "brush" and region["to_name"] == "image"
        assert region["value"]["brushlabels"] == ["Can"] and 0.5 < region["score"] <= 1
        assert (region["original_width"], region["original_height"]) == (image.width, image.height)
    # Label Studio stores them as the annotator's annotation.
    saved = label_studio.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": regions}).json()
    stored = label_studio.api("GET", f"/api/annotations/{saved['id']}").json()["result"]
    assert [r["value"]["brushlabels"] for r in stored] == [["Can"]] * len(regions)
    assert concept_backend.health()["concepts"]["model_version"].startswith("sam3-tiny@sam-backend-")


def test_an_exemplar_box_returns_objects_like_it(label_studio, concept_project):
    name = "portrait.jpg"
    image, task_id = concept_project.images[name], concept_project.tasks[name]["id"]
    box = {"id": "ex1", "from_name": "exemplar", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
           "original_width": image.width, "original_height": image.height, "image_rotation": 0,
           "value": {"x": 20, "y": 20, "width": 30, "height": 25, "rotation": 0, "rectanglelabels": ["Bottle"]}}
    answer = label_studio.interactive(concept_project.ml["id"], task_id, [box])
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]
    assert regions and {r["value"]["brushlabels"][0] for r in regions} == {"Bottle"}


def test_a_bad_phrase_reaches_the_editor_as_an_error(label_studio, concept_backend, concept_project):
    task_id = concept_project.tasks["landscape.jpg"]["id"]
    answer = label_studio.interactive(concept_project.ml["id"], task_id, [typed("Can: " + "very " * 40 + "long")])
    assert answer.get("errors") and "data" not in answer, answer
    assert "at most 30" in answer["errors"][0], answer
    assert concept_backend.health()["status"] == "UP"


def test_preannotate_concepts_fills_the_project(label_studio, concept_backend, concept_preset, concept_project,
                                                tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM_", "LABEL_STUDIO_"))}
    env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.personal_token,
               MODEL_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "sam_backend", "preannotate", "--project", str(concept_project.id), "--preset", "demo",
         "--mode", "concepts", "--concept-preset", concept_preset, "--concept", "Can=drink can", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(NAMES)} task(s) got a prediction" in done.stdout, done.stdout
    version = concept_backend.health()["concepts"]["model_version"]
    for task in label_studio.tasks(concept_project.id):
        ours = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(ours) == 1 and ours[0]["result"], task["id"]
        assert {r["value"]["brushlabels"][0] for r in ours[0]["result"]} <= {"Bottle", "Can"}


def drag(page, image, box: tuple[float, float, float, float]) -> None:
    """Draw a rectangle over image pixels ``(x0, y0, x1, y1)`` with the selected tool."""
    x0, y0 = screen_point(image, box[0], box[1])
    x1, y1 = screen_point(image, box[2], box[3])
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    page.mouse.up()


def test_in_the_editor_an_exemplar_and_then_a_counterexample_go_together(label_studio, concept_backend, images,
                                                                         page):
    """What the issue's "exemplar intent" and the counter-example control rely on: the editor's own requests."""
    shapes = images["landscape.jpg"]
    project = label_studio.create_project("sam-backend e2e: concepts in the editor", label_config=CONCEPT_CONFIG)
    task_id = label_studio.import_files(project["id"], {"landscape.jpg": shapes.data})["landscape.jpg"]["id"]
    label_studio.connect_backend(project["id"], concept_backend.url)

    log_in(page, label_studio)
    image = open_task(page, label_studio, project["id"], task_id)
    turn_on_auto_annotation(page)
    w, h = shapes.width, shapes.height

    def interactive(response) -> bool:
        return response.url.endswith("/interactive-annotating")

    # label_config_concepts.xml's label groups: brush 0, exemplar 1, counterexample 2, keypoint 3.
    pick_smart_tool(page, 1, "Bottle", "rectangle-tool")
    with page.expect_response(interactive) as first:
        drag(page, image, (0.1 * w, 0.1 * h, 0.4 * w, 0.5 * h))
    sent = first.value.request.post_data_json["context"]["result"]
    assert [(r["from_name"], r["type"]) for r in sent] == [("exemplar", "rectanglelabels")], sent
    assert "errors" not in first.value.json(), first.value.json()

    pick_smart_tool(page, 2, "Bottle", "rectangle-tool", nth=1)
    with page.expect_response(interactive) as second:
        drag(page, image, (0.55 * w, 0.5 * h, 0.9 * w, 0.9 * h))
    sent = second.value.request.post_data_json["context"]["result"]
    assert sorted(r["from_name"] for r in sent) == ["counterexample", "exemplar"], sent
    answer = second.value.json()
    assert "errors" not in answer, answer
    assert {r["value"]["brushlabels"][0] for r in answer["data"]["result"]} <= {"Bottle"}
    assert "1 counter-example(s)" in concept_backend.server.tail(200), "the backend read a counter-example box"
