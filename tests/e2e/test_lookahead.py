"""Look-ahead behind a real Label Studio: the next task's image is encoded while the annotator works on this one."""

from __future__ import annotations

import re

import requests

from harness import make_project, wait_for
from scenes import keypoint_region

NAMES = ["landscape.jpg", "portrait.jpg", "grayscale.png"]


def metric(backend, name: str) -> float:
    text = requests.get(backend.url + "/metrics", timeout=10).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_next_tasks_first_click_is_served_from_the_store(label_studio, backend, images):
    # A project of its own: its images (new upload paths) are in no store yet.
    project = make_project(label_studio, backend, "sam-backend e2e look-ahead", {n: images[n] for n in NAMES})
    tasks = sorted(project.tasks.items(), key=lambda item: item[1]["id"])  # Label Studio's sequential order
    encodes, hits = metric(backend, "sam_lookahead_encodes_total"), metric(backend, "sam_lookahead_hits_total")

    (first_name, first), (second_name, second) = tasks[0], tasks[1]
    image = images[first_name]
    answer = label_studio.interactive(project.ml["id"], first["id"], [keypoint_region(image, image.click())])
    assert "errors" not in answer and answer["data"]["result"], answer

    # The annotator works on the first task; meanwhile the backend reads Label Studio's task list and
    # encodes the next tasks (two here) into its store.
    wait_for(lambda: metric(backend, "sam_lookahead_encodes_total") >= encodes + 2, 120,
             "the look-ahead encodes of the next tasks", backend.server)
    state = backend.health()["lookahead"]
    assert state["depth"] == 4 and state["projects"][str(project.id)] == "on", state

    image = images[second_name]
    answer = label_studio.interactive(project.ml["id"], second["id"], [keypoint_region(image, image.click())])
    assert "errors" not in answer and answer["data"]["result"], answer
    assert metric(backend, "sam_lookahead_hits_total") == hits + 1  # its first click found the embedding ready
    assert f"task {second['id']} encoded ahead of the annotator" in backend.server.log.read_text()
