"""Learning from a project's annotations: prompts, loss, masks from regions, tuning, the gate, versions, serving."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_backend.labelstudio.annotations import annotation_masks, chosen_annotation
from sam_backend.labelstudio.rle import mask_to_rle
from sam_backend.learning.prompts import corrective_point, jittered_box, negative_point, sample_in
from sam_backend.learning.versions import TrainingBusy, VersionError, VersionStore
from sam_backend.sam.synthetic import generate_cell_scene

from fake_labelstudio import FakeLabelStudio
from test_server import LABEL_CONFIG

PROJECT = 9


# ------------------------------------------------------------------ prompts


def test_sampled_points_lie_inside_the_region(rng):
    mask = np.zeros((40, 60), bool)
    mask[10:20, 30:35] = True
    for _ in range(50):
        x, y = sample_in(rng, mask)
        assert mask[int(y), int(x)]
    assert sample_in(rng, np.zeros((4, 4), bool)) is None


def test_jittered_box_moves_each_side_by_at_most_sams_noise(rng):
    mask = np.zeros((256, 256), bool)
    mask[50:150, 60:200] = True
    for _ in range(50):
        (x0, y0), (x1, y1) = jittered_box(rng, mask, 256)
        limit = 20 * 256 / 1024 + 1e-4
        assert abs(x0 - 60) <= limit and abs(y0 - 50) <= limit and abs(x1 - 200) <= limit and abs(y1 - 150) <= limit
        assert x1 > x0 and y1 > y0


def test_corrective_point_comes_from_the_error_and_is_labelled_by_the_truth(rng):
    truth = np.zeros((32, 32), bool)
    truth[4:20, 4:20] = True
    missed = truth.copy()
    missed[12:20, 4:20] = False  # the prediction misses the lower half
    for _ in range(30):
        (x, y), label = corrective_point(rng, missed, truth)
        assert 12 <= y < 20 and label == 1.0
    spilled = truth.copy()
    spilled[20:30, 4:20] = True  # the prediction spills below the object
    for _ in range(30):
        (x, y), label = corrective_point(rng, spilled, truth)
        assert 20 <= y < 30 and label == 0.0


def test_negative_point_lies_outside_the_object(rng):
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    others = np.zeros_like(mask)
    others[20:40, 42:60] = True
    for _ in range(30):
        x, y = negative_point(rng, mask, others, 64)
        assert not mask[int(y), int(x)] and others[int(y), int(x)]  # preferably on the neighbour


def test_sam_objective_prefers_the_truth():
    import torch

    from sam_backend.learning.objective import SamObjective

    target = torch.zeros((2, 16, 16))
    target[:, 4:12, 4:12] = 1.0
    good = (target * 20 - 10)[:, None].repeat(1, 4, 1, 1)
    bad = -good
    iou = torch.ones((2, 4))
    objective = SamObjective()
    assert objective(good, iou, target, multimask=False).loss < objective(bad, iou, target, multimask=False).loss
    # Ambiguous prompts train the best of the three outputs: one right output is enough.
    mixed = bad.clone()
    mixed[:, 2] = good[:, 2]
    step = objective(mixed, iou, target, multimask=True)
    assert step.iou == 1.0


# ------------------------------------------------------------------ annotations


def brush_region(mask: np.ndarray, label: str = "Cell", region_id: str = "r1") -> dict:
    height, width = mask.shape
    return {"id": region_id, "from_name": "brush", "to_name": "image", "type": "brushlabels",
              "original_width": width, "original_height": height, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def test_brush_and_polygon_regions_become_masks_at_the_image_size():
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:30] = True
    polygon = {"id": "p1", "type": "polygonlabels", "original_width": 40, "original_height": 30,
               "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["Cell"]}}
    rectangle = {"id": "b1", "type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5}}
    found = annotation_masks([brush_region(mask), polygon, rectangle], (30, 40))
    assert [o.region_id for o in found.objects] == ["r1", "p1"] and not found.unreadable
    assert np.array_equal(found.objects[0].mask, mask) and found.objects[0].label == "Cell"
    assert found.objects[1].mask[:15, :20].all() and not found.objects[1].mask[16:, 21:].any()
    # A brush drawn on the image at another size is scaled to the fetched image.
    assert annotation_masks([brush_region(mask)], (60, 80)).objects[0].mask.sum() == 4 * mask.sum()


def test_unreadable_regions_are_reported_not_used():
    broken = brush_region(np.ones((4, 4), bool))
    broken["value"]["rle"] = [1, 2, 3]
    wrong_size = brush_region(np.ones((4, 4), bool))
    wrong_size["original_width"] = 5
    empty = brush_region(np.zeros((4, 4), bool))
    flat = {"id": "p", "type": "polygonlabels", "value": {"points": [[0, 0], [10, 10]], "polygonlabels": []}}
    found = annotation_masks([broken, wrong_size, empty, flat], (4, 4))
    assert not found.objects and len(found.unreadable) == 4
    assert "cannot be decoded" in found.unreadable[0] and "not 5x4x4" in found.unreadable[1]
    assert "empty" in found.unreadable[2] and "3 points" in found.unreadable[3]


def test_chosen_annotation_prefers_ground_truth_then_the_latest():
    annotations = [{"id": 1, "result": [], "updated_at": "2026-01-02"},
                   {"id": 2, "result": [], "updated_at": "2026-01-03"},
                   {"id": 3, "result": [], "updated_at": "2026-01-04", "was_cancelled": True}]
    assert chosen_annotation({"annotations": annotations})["id"] == 2
    annotations[0]["ground_truth"] = True
    assert chosen_annotation({"annotations": annotations})["id"] == 1
    assert chosen_annotation({"annotations": []}) is None


# ------------------------------------------------------------------ versions


def weights_of(engine, scale: float = 1.0):
    return [w * scale if w.ndim >= 2 else w for w in engine.decoder_weights()]


def test_versions_are_saved_whole_and_only_accepted_ones_become_current(tmp_path, engine):
    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    assert store.current(3) is None
    first = store.save(3, weights_of(engine), accepted=True, reason="better", after={"mean_iou": 0.8})
    assert first.name == "tiny@sam-backend-0+p3.v1" and store.current(3).number == 1
    second = store.save(3, weights_of(engine, 2.0), accepted=False, reason="worse")
    assert second.number == 2 and store.current(3).number == 1  # kept with its figures, not used
    assert [v.accepted for v in store.versions(3)] == [True, False]
    loaded = store.load_weights(first)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, weights_of(engine)))


def test_a_corrupt_version_is_never_loaded(tmp_path, engine):
    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    info = store.save(3, weights_of(engine), accepted=True, reason="better")
    path = store.project_dir(3) / "v1" / "decoder.npz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VersionError, match="corrupt"):
        store.load_weights(info)


def test_a_failed_write_leaves_nothing_and_keeps_the_current_version(tmp_path, engine, monkeypatch):
    import sam_backend.learning.versions as versions

    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    store.save(3, weights_of(engine), accepted=True, reason="better")
    real = versions._write_synced

    def full_disk(path, data):
        if path.name == "version.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(versions, "_write_synced", full_disk)
    with pytest.raises(VersionError, match="No space left"):
        store.save(3, weights_of(engine, 2.0), accepted=True, reason="better still")
    assert store.current(3).number == 1 and [v.number for v in store.versions(3)] == [1]
    assert not list(store.project_dir(3).glob(".v*"))


def test_an_interrupted_write_is_ignored_and_cleaned_up(tmp_path, engine):
    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    store.save(3, weights_of(engine), accepted=True, reason="better")
    half = store.project_dir(3) / ".v2.tmp-12345"
    half.mkdir()
    (half / "decoder.npz").write_bytes(b"half")
    assert [v.number for v in store.versions(3)] == [1]
    with store.training_lock(3):
        assert store.discard_partial(3) == 1
    assert not half.exists()


def test_pin_and_unpin(tmp_path, engine):
    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    store.save(3, weights_of(engine), accepted=True, reason="better")
    store.save(3, weights_of(engine, 1.1), accepted=True, reason="better still")
    assert store.pin(3, 1).number == 1 and store.pointer(3) == {"version": 1, "pinned": True}
    store.save(3, weights_of(engine, 1.2), accepted=True, reason="better again")
    assert store.current(3).number == 1  # a pinned version stays, whatever trainings find
    assert store.pin(3, None).number == 3 and not store.pointer(3)["pinned"]
    with pytest.raises(VersionError, match="no version 9"):
        store.pin(3, 9)


def test_one_training_per_project_across_processes(tmp_path):
    import subprocess
    import sys

    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    with store.training_lock(3):
        assert store.is_training(3)
        probe = ("import sys; from sam_backend.learning.versions import VersionStore;"
                 f"print(VersionStore({str(tmp_path)!r}, 'tiny', 'x').is_training(3))")
        assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"
        with pytest.raises(TrainingBusy):
            with store.training_lock(3):
                pass
    assert not store.is_training(3)


def test_pending_annotations_are_counted_across_workers(tmp_path):
    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    other = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    assert store.count_pending(3) == 1 and other.count_pending(3, add=2) == 3
    assert store.count_pending(3, reset=True) == 0


# ------------------------------------------------------------------ serving


def test_every_worker_moves_to_a_new_version_and_keeps_the_last_good_one(tmp_path, engine, rng):
    from sam_backend.learning.serving import ProjectDecoders

    store = VersionStore(tmp_path, "tiny", "tiny@sam-backend-0")
    decoders = ProjectDecoders(store, recheck_seconds=0.0)
    assert decoders.engine_for(engine, "3.1700000000") == (engine, None)
    store.save(3, weights_of(engine, 1.5), accepted=True, reason="better")
    # A project the worker serves already: the new version loads in the background, the old decoder answers meanwhile.
    assert decoders.engine_for(engine, "3.1700000000") == (engine, None)
    assert decoders.version_for(3).endswith("+p3.v1")
    served, name = wait_for_version(decoders, engine, 3, "+p3.v1")
    embedding = engine.encode(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mine = served.decode(embedding, points=[[30, 20]], labels=[1]).low_res_logits
    assert not np.allclose(mine, engine.decode(embedding, points=[[30, 20]], labels=[1]).low_res_logits)
    assert decoders.engine_for(engine, 4) == (engine, None)  # other projects keep the preset
    # A new version that cannot be read (another preset's weights): the previous one stays in use.
    store.save(3, weights_of(engine)[:-1], accepted=True, reason="broken")
    deadline = time.monotonic() + 30
    while not decoders.failures and time.monotonic() < deadline:
        assert decoders.engine_for(engine, 3) == (served, name)
        time.sleep(0.05)
    assert decoders.engine_for(engine, 3) == (served, name) and decoders.version_for(3) == name
    assert "do not fit" in next(iter(decoders.failures.values()))  # and on /health, as unusable_versions
    # A worker that starts (a restart) loads the project's version at its first request.
    fresh = ProjectDecoders(store, recheck_seconds=0.0)
    store.pin(3, 1)
    assert fresh.engine_for(engine, 3)[1] == name


def wait_for_version(decoders, engine, project, suffix: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served, name = decoders.engine_for(engine, project)
        if name and name.endswith(suffix):
            return served, name
        time.sleep(0.05)
    raise AssertionError(f"project {project} never moved to {suffix}")


# ------------------------------------------------------------------ training a project


def cell_project(tmp_path, tasks: int, seed: int = 5, annotate=True):
    """A fake Label Studio project of cell images, each annotated with its cells as brush regions."""
    files = tmp_path / "files"
    (files / str(PROJECT)).mkdir(parents=True)
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    rng = np.random.default_rng(seed)
    for index in range(tasks):
        scene = generate_cell_scene(rng)
        name = f"{PROJECT}/cells-{index}.png"
        Image.fromarray(scene.image).save(files / name)
        result = [brush_region(m, "Cat", f"r{i}") for i, m in enumerate(scene.masks)]
        annotations = [{"id": 500 + index, "result": result, "was_cancelled": False}] if annotate else []
        fake.add_task(PROJECT, name, annotations=annotations)
    return fake


def trainer_for(fake, preset: str, tmp_path, steps: int = 120):
    from sam_backend.embeddings.tiers import EmbeddingTiers
    from sam_backend.labelstudio.api import LabelStudioProject
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.learning.project import ProjectTrainer
    from sam_backend.learning.tuning import TuneSettings
    from sam_backend.sam.presets import preset_model_version
    from sam_backend.server.loading import load_engine

    engine = load_engine(preset, warm_up=False)
    store = VersionStore(tmp_path / "versions", preset, preset_model_version(preset))
    project = LabelStudioProject(fake.url, fake.token, PROJECT)
    trainer = ProjectTrainer(EmbeddingTiers(engine), project, store, Credentials(fake.url, fake.token),
                             settings=TuneSettings(steps=steps))
    return trainer, store


@pytest.fixture()
def cells(tmp_path, monkeypatch):
    """Makes :func:`cell_project` s (images on loopback, which is allowed here), closed at the end."""
    monkeypatch.setenv("SAM_MEDIA_ALLOWED_HOSTS", "127.0.0.1")
    made = []

    def make(tasks: int):
        made.append(cell_project(tmp_path, tasks))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def test_a_better_decoder_is_accepted_and_a_worse_one_rejected(tmp_path, cells, monkeypatch):
    from sam_backend.learning import project as project_module

    fake = cells(12)
    fake.tasks[PROJECT][3]["annotations"][0]["result"][0]["value"]["rle"] = [7, 7]  # one unreadable region
    trainer, store = trainer_for(fake, "demo", tmp_path)
    outcome = trainer.run()
    assert outcome.status == "accepted", outcome.reason
    info = outcome.version
    assert info.after["mean_iou"] > info.before["mean_iou"] and info.details["held_out_tasks"] == 5
    assert info.details["training_tasks"] == 7 and store.current(PROJECT).number == 1
    assert "held-out mean IoU" in info.reason and "replaces the preset" in info.reason

    # The gate: a training that makes things worse is kept on disk with its figures, and not used.
    real_fit = project_module.DecoderTuner.fit

    def spoiled(self, images, should_stop=None):
        tuned, report = real_fit(self, images, should_stop)
        for parameter in tuned.decoder_parameters():
            parameter.data.mul_(-1.0)
        return tuned, report

    monkeypatch.setattr(project_module.DecoderTuner, "fit", spoiled)
    worse = trainer.run()
    assert worse.status == "rejected" and worse.version.number == 2 and not worse.version.accepted
    assert worse.version.after["mean_iou"] < worse.version.before["mean_iou"]
    assert "stays in use" in worse.version.reason and store.current(PROJECT).number == 1
    assert worse.version.details["started_from"].endswith("+p9.v1")


def test_too_few_annotations_and_label_studio_failures_change_nothing(tmp_path, cells):
    fake = cells(6)
    trainer, store = trainer_for(fake, "demo", tmp_path, steps=5)
    outcome = trainer.run()
    assert outcome.status == "skipped" and "needs at least 10" in outcome.reason
    assert outcome.cause == "too_few_annotations" and not store.versions(PROJECT)
    fake.fail_lists[PROJECT] = 503
    trainer.project.retries = 0
    failed = trainer.run()
    assert failed.status == "failed" and "Label Studio" in failed.reason and failed.cause == "label_studio"
    assert store.last_outcome(PROJECT)["status"] == "failed" and store.current(PROJECT) is None


def test_a_full_disk_fails_the_training_and_the_current_version_stays(tmp_path, cells, monkeypatch):
    import sam_backend.learning.versions as versions

    fake = cells(10)
    trainer, store = trainer_for(fake, "demo", tmp_path, steps=5)
    engine = trainer.tiers.engine
    store.save(PROJECT, engine.decoder_weights(), accepted=True, reason="the version in use")

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(versions, "_write_synced", full_disk)
    outcome = trainer.run()
    assert outcome.status == "failed" and outcome.cause == "write" and "No space left" in outcome.reason
    assert store.current(PROJECT).number == 1 and [v.number for v in store.versions(PROJECT)] == [1]
    assert not list(store.project_dir(PROJECT).glob(".v*"))


def test_too_few_left_to_learn_from_after_the_held_out_share_is_skipped(tmp_path, cells, monkeypatch):
    from sam_backend.learning import project as project_module

    fake = cells(10)
    trainer, store = trainer_for(fake, "demo", tmp_path, steps=5)
    # Chance can put more than the share on the held-out side (about 0.3 % of projects of 10 to 15 tasks).
    monkeypatch.setattr(project_module, "held_out", lambda ids, project: set(sorted(ids)[:7]))
    outcome = trainer.run()
    assert outcome.status == "skipped" and "3 left to learn from" in outcome.reason and not store.versions(PROJECT)


def test_an_interrupted_training_writes_nothing(tmp_path, cells):
    from sam_backend.learning.tuning import Interrupted

    fake = cells(10)
    trainer, store = trainer_for(fake, "demo", tmp_path, steps=50)
    calls = []
    with pytest.raises(Interrupted):
        trainer.run(should_stop=lambda: calls.append(1) or len(calls) > 15)
    assert not store.versions(PROJECT) and not store.is_training(PROJECT)


def test_held_out_tasks_stay_held_out_as_the_project_grows():
    from sam_backend.learning.project import held_out

    small = held_out(list(range(1, 31)), 4)
    large = held_out(list(range(1, 301)), 4)
    assert len(small) >= 6 and len(large) >= 60 and len(large) < 90  # at least 20 %, not far above
    # A task stays on its side as the project grows (once chance gives more than the floor).
    assert {t for t in held_out(list(range(1, 1001)), 4) if t <= 300} == large
    assert small & large <= held_out(list(range(1, 1001)), 4)


# ------------------------------------------------------------------ webhook events


def test_event_project_reads_label_studios_payloads():
    from sam_backend.server.training import event_project

    # Shapes from Label Studio 1.23: ml/api_connector.py (START_TRAINING) and webhooks/utils.py (project events).
    start = {"action": "START_TRAINING", "project": {"id": 12, "title": "Cells", "label_config": "<View/>"}}
    created = {"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "task": 40, "project": 12, "result": []},
               "task": {"id": 40, "project": 12, "data": {}}, "project": {"id": 12}}
    many = {"action": "ANNOTATIONS_CREATED", "annotation": [{"id": 3}], "annotations": [{"id": 3, "project": 12}]}
    assert event_project(start) == event_project(created) == event_project(many) == 12
    assert event_project({"action": "PROJECT_UPDATED"}) is None


def test_annotation_events_are_debounced_and_start_training_starts_at_once(monkeypatch, tmp_path):
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.server.backend import SamBackend
    from sam_backend.server.training import TrainingService

    backend = SamBackend(preset="demo", credentials=Credentials("http://ls.example", "token"))
    service = TrainingService(backend, every=3)
    started = []
    monkeypatch.setattr(service, "start", lambda project, why: started.append((project, why)) or {"status": "started"})
    event = {"action": "ANNOTATION_CREATED", "annotation": {"project": 12}, "project": {"id": 12}}
    assert service.handle(event)["status"] == "counted"
    assert service.handle(event)["message"] == "2 of 3 annotations before the next training"
    assert service.handle(event)["status"] == "started" and started == [(12, "3 new annotations")]
    assert service.handle(event)["status"] == "counted"  # the count starts again
    assert service.handle({"action": "START_TRAINING", "project": {"id": 12}})["status"] == "started"
    assert started[-1] == (12, "Start Training")
    assert service.handle({"action": "TASKS_CREATED", "project": {"id": 12}})["status"] == "ignored"
    # A versions directory that cannot be written: the event is answered, and the reason logged and counted.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    service.versions.root = blocked
    answer = service.handle(event)
    assert answer["status"] == "not started" and "versions directory" in answer["message"]


def test_training_is_not_started_without_credentials_or_twice(tmp_path):
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.server.backend import SamBackend
    from sam_backend.server.training import TrainingService

    service = TrainingService(SamBackend(preset="demo", credentials=Credentials(None, None)))
    answer = service.start(12, "Start Training")
    assert answer["status"] == "not started" and "LABEL_STUDIO_API_KEY" in answer["message"]
    service = TrainingService(SamBackend(preset="demo", credentials=Credentials("http://ls.example", "t")))
    with service.versions.training_lock(12):
        assert service.start(12, "Start Training")["message"] == "project 12 is already training"
    text = b"".join(m.name.encode() for m in service.collect())
    assert b"sam_training_not_started" in text


# ------------------------------------------------------------------ the whole path


def test_start_training_through_the_webhook_trains_in_a_child_and_predictions_carry_the_version(
        tmp_path, cells, monkeypatch):
    """The server's whole path: "Start Training", the child process, the gate, then /setup and /predict."""
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.server.app import create_app
    from sam_backend.server.backend import SamBackend

    fake = cells(10)
    monkeypatch.setenv("SAM_TRAIN_STEPS", "80")
    monkeypatch.setenv("SAM_CACHE_DIR", str(tmp_path / "store"))
    backend = SamBackend(preset="demo", credentials=Credentials(fake.url, fake.token))
    app = create_app(backend)
    backend.holder.wait(120)
    client = app.test_client()
    task = fake.tasks[PROJECT][0]
    body = {"tasks": [{"id": task["id"], "data": {"image": fake.url + task["data"]["image"]}}],
            "project": f"{PROJECT}.1700000000", "label_config": LABEL_CONFIG,
            "params": {"context": {"result": [{"type": "keypointlabels", "from_name": "keypoint",
                                               "to_name": "image", "original_width": 100,
                                               "original_height": 100, "is_positive": True,
                                               "value": {"x": 50, "y": 50, "width": 1,
                                                         "keypointlabels": ["Cat"]}}]}}}
    before = client.post("/predict", json=body).get_json()["results"][0]
    assert before["model_version"] == backend.model_version  # the preset's, before any training
    started = time.monotonic()
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert answer.status_code == 201 and answer.get_json()["status"] == "started"
    assert time.monotonic() - started < 1.0  # well inside Label Studio's webhook timeout
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}}
                       ).get_json()["status"] == "not started"  # one training per project
    training = app.extensions["sam_training"]
    assert training.wait_idle(300)
    outcome = backend.decoders.store.last_outcome(PROJECT)
    assert outcome["status"] == "accepted", outcome
    # The worker that watched the training loaded the version: its very next answers carry it.
    setup = client.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": LABEL_CONFIG})
    version = setup.get_json()["model_version"]
    assert version.startswith("demo@sam-backend-") and version.endswith(f"+p{PROJECT}.v1")
    prediction = client.post("/predict", json=body).get_json()["results"][0]
    assert prediction["model_version"] == version
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'sam_training_runs_total{cause="better",outcome="accepted"} 1.0' in metrics
    assert version in client.get("/versions").get_json()["versions"]


def test_train_and_versions_commands(tmp_path, cells, capsys):
    from sam_backend.commands.cli import main

    fake = cells(10)
    code = main(["train", "--url", fake.url, "--api-key", fake.token, "--project", str(PROJECT),
                 "--preset", "demo", "--steps", "60", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("accepted: demo@sam-backend-"), out
    assert main(["versions", "--project", str(PROJECT), "--preset", "demo"]) == 0
    listing = capsys.readouterr().out
    assert "* p9 v1   accepted" in listing and "held-out mean IoU" in listing
    assert main(["versions", "--project", str(PROJECT), "--preset", "demo", "--pin", "1", "--log-level",
                 "ERROR"]) == 0
    assert "pinned" in capsys.readouterr().out
    assert main(["versions", "--project", str(PROJECT), "--preset", "demo", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["pinned"] and row["after"]["mean_iou"] > row["before"]["mean_iou"]
    assert main(["versions", "--project", str(PROJECT), "--preset", "demo", "--pin", "7"]) == 1
    # Written under the versions directory (the test's own): the decoder only, a few MB, not the encoder.
    written = Path(os.environ["SAM_VERSIONS_DIR"]) / "demo" / f"project-{PROJECT}" / "v1" / "decoder.npz"
    assert 0 < written.stat().st_size < 5_000_000


def test_a_restart_interrupts_the_training_process_and_nothing_is_written(tmp_path, cells):
    """SIGTERM (a deploy, a restart) stops ``sam-backend train`` between steps: exit 130, no version, no lock."""
    import signal
    import subprocess
    import sys

    fake = cells(10)
    env = dict(os.environ, LABEL_STUDIO_URL=fake.url, LABEL_STUDIO_API_KEY=fake.token, SAM_TRAIN_STEPS="100000",
               SAM_TRAIN_MAX_SECONDS="600", LOG_LEVEL="INFO")
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "sam_backend", "train", "--project", str(PROJECT),
                                  "--preset", "demo"], env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "Loaded demo" not in log.read_text() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(15)  # the images encoded, and well into the 100000 steps
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 130, log.read_text()[-2000:]
    store = VersionStore(os.environ["SAM_VERSIONS_DIR"], "demo", "x")
    assert not store.versions(PROJECT) and not store.is_training(PROJECT)
    assert "training interrupted; nothing was written" in log.read_text()


def test_a_training_process_that_fails_is_counted_and_changes_nothing(tmp_path, monkeypatch):
    from sam_backend.labelstudio.media import Credentials
    from sam_backend.server.backend import SamBackend
    from sam_backend.server.training import TrainingService

    # A preset the child cannot load: it fails at once, and says why.
    backend = SamBackend(preset=str(tmp_path / "no-such-preset"), credentials=Credentials("http://127.0.0.1:9", "t"))
    service = TrainingService(backend)
    assert service.start(12, "Start Training")["status"] == "started"
    assert service.wait_idle(120)
    assert backend.decoders.store.last_outcome(12)["status"] == "failed"
    text = b"".join(line.encode() for m in service.runs.collect() for s in m.samples
                    if s.value for line in [f"{s.labels}"])
    assert b"'outcome': 'failed'" in text and backend.decoders.store.current(12) is None
