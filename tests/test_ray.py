"""``preannotate --ray`` and ``precompute --ray``: a local Ray instance against the loopback Label Studio API.

One Ray instance (2 CPUs, no dashboard, a small object store) serves the
module; each run starts its own actors, which load the tiny preset.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from fake_labelstudio import FakeLabelStudio
from sam_backend.commands.cli import build_parser, main
from sam_backend.embeddings.disk_store import DiskStore
from test_preannotate import box
from test_server import LABEL_CONFIG

PROJECT = 5
IMAGES = 5


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
             logging_level=logging.WARNING, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture()
def labelstudio(tmp_path):
    """Tasks on distinct images: with boxes, one without any prompt, one whose image is missing."""
    rng = np.random.default_rng(7)
    files = tmp_path / "files"
    (files / str(PROJECT)).mkdir(parents=True)
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    for i in range(IMAGES):
        Image.fromarray(random_image(rng, 80, 120)).save(files / str(PROJECT) / f"{i}.png")
        fake.add_task(PROJECT, f"{PROJECT}/{i}.png", predictions=[
            {"id": 100 + i, "model_version": "detector", "result": [box("Cat"), box("Dog")][: 1 + i % 2]}])
    fake.add_task(PROJECT, f"{PROJECT}/missing.png", predictions=[{"id": 99, "model_version": "detector", "result": [box()]}])
    fake.add_task(PROJECT, f"{PROJECT}/0.png")  # nothing to start from
    yield fake
    fake.close()


def preannotate(fake, preset, store, *extra):
    return main(["preannotate", "--url", fake.url, "--api-key", fake.token, "--project", str(PROJECT),
                 "--preset", str(preset), "--cache-dir", str(store), "--batch-size", "3", "--no-progress", *extra])


def ours(fake) -> list[dict]:
    return [p for p in fake.predictions(PROJECT) if "sam-backend" in str(p.get("model_version"))]


def without_ours(fake) -> None:
    for task in fake.tasks[PROJECT]:
        task["predictions"] = [p for p in task["predictions"] if "sam-backend" not in str(p.get("model_version"))]


def by_task(predictions: list[dict]) -> dict:
    """Each task's prediction without what is random by design (region ids) or per upload (prediction ids)."""
    return {p["task"]: {"model_version": p["model_version"], "score": p.get("score"),
                        "result": [{k: v for k, v in r.items() if k != "id"} for r in p["result"]]}
            for p in predictions}


def uploads(fake) -> int:
    return sum(1 for method, path in fake.requests if method == "POST" and path.endswith("/import/predictions"))


def test_preannotate_on_ray_gives_the_single_machine_predictions_once(ray_instance, labelstudio, tiny_preset_dir,
                                                                      tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model-dir"))
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "single") == 1
    single = capsys.readouterr().out
    expected = by_task(ours(labelstudio))
    assert len(expected) == IMAGES + 1 and sum(bool(p["result"]) for p in expected.values()) == IMAGES

    without_ours(labelstudio)
    before = uploads(labelstudio)
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "ray", "--ray", "--ray-actors", "2") == 1
    out, err = capsys.readouterr()
    assert "on Ray (local, 2 actor(s))" in err
    assert by_task(ours(labelstudio)) == expected  # the same regions, masks and scores for the same tasks
    # The same summary: counts, and the missing image's reason.
    assert out.splitlines()[1:] == single.splitlines()[1:]
    assert f"{IMAGES + 1} task(s) got a prediction ({IMAGES + IMAGES // 2} mask(s); 1 without any)" in out
    missing = labelstudio.tasks[PROJECT][IMAGES]["id"]
    assert f"task {missing}: " in out and "missing.png" in out and "404" in out
    assert uploads(labelstudio) - before == 2  # 6 predictions in batches of --batch-size 3
    # The actors filled the store they were given (5 distinct images).
    assert DiskStore(tmp_path / "ray", 1 << 30).stats().entries == IMAGES

    ids = sorted(p["id"] for p in ours(labelstudio))
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "ray", "--ray") == 1  # the missing image again
    out = capsys.readouterr().out
    assert f"{IMAGES + 1} task(s) skipped" in out and "0 task(s) got a prediction" in out
    assert sorted(p["id"] for p in ours(labelstudio)) == ids


def test_ctrl_c_stops_the_ray_job_and_what_was_uploaded_stays(ray_instance, labelstudio, tiny_preset_dir, tmp_path,
                                                              capsys, monkeypatch):
    from sam_backend.labelstudio.api import LabelStudioProject

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model-dir"))
    labelstudio.tasks[PROJECT] = labelstudio.tasks[PROJECT][:IMAGES]  # no failure: resuming finishes with 0
    original = LabelStudioProject.create_predictions

    def interrupted_after(self, predictions):
        done = original(self, predictions)
        if not interrupted:
            interrupted.update(p["task"] for p in predictions)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as from the terminal, after the first upload
        return done

    interrupted: set = set()

    monkeypatch.setattr(LabelStudioProject, "create_predictions", interrupted_after)
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "store", "--ray", "--batch-size", "1") == 130
    assert "Stopped early (Ctrl-C)" in capsys.readouterr().out
    stopped = {p["task"] for p in ours(labelstudio)}
    assert 1 <= len(stopped) < IMAGES

    monkeypatch.setattr(LabelStudioProject, "create_predictions", original)
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "store", "--ray") == 0
    assert f"{len(stopped)} task(s) skipped" in capsys.readouterr().out
    predictions = ours(labelstudio)
    assert len(predictions) == IMAGES and len({p["task"] for p in predictions}) == IMAGES  # no duplicates


def test_a_preset_that_cannot_load_ends_the_run_with_its_reason(ray_instance, labelstudio, tmp_path, caplog):
    assert preannotate(labelstudio, tmp_path / "no-such-preset", tmp_path / "store", "--ray") == 2
    assert "no-such-preset" in caplog.text
    assert ours(labelstudio) == []


def test_precompute_on_ray_fills_the_store_the_server_reads(ray_instance, labelstudio, tiny_preset_dir, tmp_path,
                                                           capsys, monkeypatch):
    monkeypatch.delenv("SAM_CACHE_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model-dir"))
    labelstudio.tasks[PROJECT].append({"id": 77, "project": PROJECT, "data": {"text": "no image"},
                                       "annotations": [], "predictions": []})
    args = ["precompute", "--url", labelstudio.url, "--api-key", labelstudio.token, "--project", str(PROJECT),
            "--preset", str(tiny_preset_dir), "--cache-dir", str(tmp_path / "store"), "--no-progress"]
    assert main([*args, "--ray", "--ray-actors", "2"]) == 1  # the missing image
    out = capsys.readouterr().out
    assert f"{IMAGES + 3} task(s)" in out and f"{IMAGES} encoded, 1 already stored, 1 without an image, 1 failed" in out
    assert "missing.png" in out
    assert DiskStore(tmp_path / "store", 1 << 30).stats().entries == IMAGES
    # The single-machine run finds every entry: the same keys.
    assert main(args) == 1
    assert f"0 encoded, {IMAGES + 1} already stored" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["preannotate", "precompute"])
def test_without_ray_the_flag_ends_at_once_naming_the_extra(labelstudio, tiny_preset_dir, tmp_path, monkeypatch,
                                                            caplog, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main([command, "--url", labelstudio.url, "--api-key", labelstudio.token, "--project", str(PROJECT),
                 "--preset", str(tiny_preset_dir), "--no-progress", "--ray"]) == 2
    assert "pip install 'sam-backend[ray]'" in caplog.text
    assert labelstudio.requests == []  # before Label Studio, before the model


def test_the_ray_flags():
    parse = build_parser().parse_args
    base = ["preannotate", "--project", "3"]
    assert parse(base).ray is None
    assert parse([*base, "--ray"]).ray == "local"
    args = parse([*base, "--ray", "ray://head:10001", "--ray-actors", "4", "--ray-gpus-per-actor", "0.5"])
    assert (args.ray, args.ray_actors, args.ray_gpus_per_actor, args.ray_cpus_per_actor) == ("ray://head:10001", 4, 0.5, 1.0)
    assert parse(["precompute", "--project", "3", "--ray", "auto"]).ray == "auto"
    for bad in (["--ray-actors", "0"], ["--ray-gpus-per-actor", "-1"], ["--ray-cpus-per-actor", "0"]):
        with pytest.raises(SystemExit):
            parse([*base, *bad])


def test_the_workers_get_the_settings_of_the_driver():
    from sam_backend.commands.ray_executor import forwarded_env

    env = {"SAM_MEDIA_ALLOWED_HOSTS": "127.0.0.1", "SAM_CACHE_URL": "redis://r:6379/0", "MODEL_DIR": "/data",
           "KERAS_BACKEND": "torch", "LABEL_STUDIO_API_KEY": "secret", "HOME": "/root", "PATH": "/bin"}
    assert forwarded_env(env) == {"SAM_MEDIA_ALLOWED_HOSTS": "127.0.0.1", "SAM_CACHE_URL": "redis://r:6379/0",
                                  "MODEL_DIR": "/data", "KERAS_BACKEND": "torch"}


def test_an_address_nobody_answers_is_a_clear_error_at_once():
    import socket

    from sam_backend.commands.ray_executor import RayUnavailableError, _check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(RayUnavailableError, match=f"127.0.0.1:{port} does not answer"):
            _check_reachable(address)
    _check_reachable("local")  # Ray's own names are Ray's to resolve
    _check_reachable("auto")


def test_every_ray_actor_uses_the_projects_trained_version(ray_instance, labelstudio, tiny_preset_dir, tmp_path,
                                                           capsys, monkeypatch):
    from sam_backend.learning.versions import VersionStore, default_versions_dir
    from sam_backend.sam.engine import SamEngine
    from sam_backend.sam.presets import preset_model_version

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model-dir"))
    labelstudio.tasks[PROJECT] = labelstudio.tasks[PROJECT][:IMAGES]
    preset = str(tiny_preset_dir)
    weights = [w * 1.5 if w.ndim >= 2 else w for w in SamEngine.from_preset(preset).decoder_weights()]
    # The job hands the run's version (name and weights) to every actor: no actor needs the versions directory.
    store = VersionStore(default_versions_dir(), preset, preset_model_version(preset))
    version = store.save(PROJECT, weights, accepted=True, reason="a test version")
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "single") == 0
    single = by_task(ours(labelstudio))
    assert len(single) == IMAGES and {p["model_version"] for p in single.values()} == {version.name}

    without_ours(labelstudio)
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "ray", "--ray", "--ray-actors", "2") == 0
    assert by_task(ours(labelstudio)) == single  # the trained decoder's masks and scores, from every actor
    capsys.readouterr()


def test_preannotate_concepts_on_ray_gives_the_single_machine_predictions(ray_instance, labelstudio, tiny_preset_dir,
                                                                         tmp_path, capsys):
    """SAM 3 in the actors: the same instances, labels and scores as in this process; and no SAM 1 load there."""
    from sam_backend.sam3.tiny import write_tiny_concept_preset

    concept_preset = str(write_tiny_concept_preset(tmp_path / "sam3"))
    concepts = ("--mode", "concepts", "--concept-preset", concept_preset, "--concept", "Cat=cat")
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "single", *concepts) == 1
    single = capsys.readouterr().out
    expected = by_task([p for p in labelstudio.predictions(PROJECT) if "sam3" in str(p.get("model_version"))])
    assert len(expected) == IMAGES + 1 and all(p["result"] for p in expected.values())
    assert {r["value"]["brushlabels"][0] for p in expected.values() for r in p["result"]} == {"Dog", "Cat"}

    for task in labelstudio.tasks[PROJECT]:
        task["predictions"] = [p for p in task["predictions"] if "sam3" not in str(p.get("model_version"))]
    assert preannotate(labelstudio, tiny_preset_dir, tmp_path / "ray", *concepts, "--ray", "--ray-actors", "2") == 1
    out = capsys.readouterr().out
    assert by_task([p for p in labelstudio.predictions(PROJECT) if "sam3" in str(p.get("model_version"))]) == expected
    assert out.splitlines()[1:] == single.splitlines()[1:]
    # The actors stored SAM 3's vision features (one entry per distinct image).
    assert DiskStore(tmp_path / "ray", 1 << 30).stats().entries == IMAGES


def test_precompute_concepts_only_on_ray_uses_the_single_machine_keys(ray_instance, labelstudio, tmp_path, capsys,
                                                                      monkeypatch):
    """The actors load SAM 3 alone and store its features where a run in this process finds them."""
    from sam_backend.sam3.tiny import write_tiny_concept_preset

    monkeypatch.delenv("SAM_CACHE_URL", raising=False)
    concept_preset = str(write_tiny_concept_preset(tmp_path / "sam3"))
    args = ["precompute", "--url", labelstudio.url, "--api-key", labelstudio.token, "--project", str(PROJECT),
            "--concept-preset", concept_preset, "--concepts-only", "--cache-dir", str(tmp_path / "store"),
            "--no-progress"]
    assert main([*args, "--ray", "--ray-actors", "2"]) == 1  # the missing image
    assert f"{IMAGES} encoded, 1 already stored" in capsys.readouterr().out
    assert DiskStore(tmp_path / "store", 1 << 30).stats().entries == IMAGES
    assert main(args) == 1
    assert f"0 encoded, {IMAGES + 1} already stored" in capsys.readouterr().out
