"""``sam-backend preannotate`` against a Label Studio API on loopback."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from PIL import Image

from sam_backend.commands.cli import main

from fake_labelstudio import FakeLabelStudio
from test_server import LABEL_CONFIG

PROJECT = 5


def box(label="Cat"):
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 120,
            "original_height": 80, "value": {"x": 10, "y": 10, "width": 40, "height": 50, "rotation": 0,
                                             "rectanglelabels": [label]}}


@pytest.fixture()
def labelstudio(tmp_path, rng):
    files = tmp_path / "files"
    (files / "5").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(files / "5" / "a.png")
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    for i in range(6):
        fake.add_task(PROJECT, "5/a.png", predictions=[{"id": 100 + i, "model_version": "detector", "result": [box()]}])
    fake.add_task(PROJECT, "5/missing.png", predictions=[{"id": 99, "model_version": "detector", "result": [box()]}])
    fake.add_task(PROJECT, "5/a.png")  # nothing to start from
    yield fake
    fake.close()


def run(fake, preset, tmp_path, *extra):
    return main(["preannotate", "--url", fake.url, "--api-key", fake.token, "--project", str(PROJECT),
                 "--preset", str(preset), "--cache-dir", str(tmp_path / "store"), "--batch-size", "3",
                 "--no-progress", *extra])


def ours(fake):
    return [p for p in fake.predictions(PROJECT) if "sam-backend" in str(p.get("model_version"))]


def test_preannotate_predicts_every_task_and_reports_failures(labelstudio, tiny_preset_dir, tmp_path, capsys):
    assert run(labelstudio, tiny_preset_dir, tmp_path) == 1  # one task failed
    out = capsys.readouterr().out
    assert "7 task(s) got a prediction (6 mask(s); 1 without any)" in out
    assert "1 task(s) failed" in out and "missing.png" in out
    predictions = ours(labelstudio)
    assert len(predictions) == 7 and len({p["task"] for p in predictions}) == 7
    with_masks = [p for p in predictions if p["result"]]
    assert all(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["Cat"] for p in with_masks for r in p["result"])
    # Uploads go in batches of --batch-size, not one request per task.
    assert [m for m, path in labelstudio.requests if path.endswith("/import/predictions")].count("POST") == 3


def test_a_second_run_adds_nothing_and_overwrite_replaces(labelstudio, tiny_preset_dir, tmp_path, capsys):
    run(labelstudio, tiny_preset_dir, tmp_path)
    first = {p["id"] for p in ours(labelstudio)}
    capsys.readouterr()
    run(labelstudio, tiny_preset_dir, tmp_path)
    assert {p["id"] for p in ours(labelstudio)} == first
    assert "7 task(s) skipped" in capsys.readouterr().out
    run(labelstudio, tiny_preset_dir, tmp_path, "--overwrite")
    replaced = {p["id"] for p in ours(labelstudio)}
    assert len(replaced) == 7 and not replaced & first


def test_ctrl_c_stops_after_the_current_task_and_the_next_run_resumes(labelstudio, tiny_preset_dir, tmp_path, monkeypatch, capsys):
    from sam_backend.server.backend import SamBackend

    original = SamBackend.prelabel
    calls = []

    def interrupting(self, task, *args, **kwargs):
        calls.append(task["id"])
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler, as from the terminal
        return original(self, task, *args, **kwargs)

    monkeypatch.setattr(SamBackend, "prelabel", interrupting)
    assert run(labelstudio, tiny_preset_dir, tmp_path) == 130
    assert "Stopped early (Ctrl-C)" in capsys.readouterr().out
    stopped = {p["task"] for p in ours(labelstudio)}
    assert len(stopped) == 4  # the current task finished and its batch was uploaded
    monkeypatch.setattr(SamBackend, "prelabel", original)
    run(labelstudio, tiny_preset_dir, tmp_path)
    predictions = ours(labelstudio)
    assert len(predictions) == 7 and len({p["task"] for p in predictions}) == 7  # no duplicates
    assert "4 task(s) skipped" in capsys.readouterr().out


def test_label_studio_going_down_stops_the_run_cleanly(labelstudio, tiny_preset_dir, tmp_path, capsys, monkeypatch):
    from sam_backend.labelstudio import api as ls

    monkeypatch.setattr(ls, "DEFAULT_RETRIES", 1)
    labelstudio.fail_imports = 10**6
    assert run(labelstudio, tiny_preset_dir, tmp_path) == 130
    out = capsys.readouterr().out
    assert "Stopped early (Label Studio refused to upload 3 prediction(s)" in out
    assert ours(labelstudio) == []


def test_dry_run_uploads_nothing_and_limit_stops(labelstudio, tiny_preset_dir, tmp_path, capsys):
    assert run(labelstudio, tiny_preset_dir, tmp_path, "--dry-run", "--limit", "2") == 0
    assert "2 task(s) would get a prediction" in capsys.readouterr().out
    assert ours(labelstudio) == []


def test_bad_credentials_and_projects_are_clear_errors(labelstudio, tiny_preset_dir, tmp_path, caplog):
    assert main(["preannotate", "--url", labelstudio.url, "--api-key", "wrong", "--project", "5",
                 "--preset", str(tiny_preset_dir), "--no-progress"]) == 2
    assert "API key was refused" in caplog.text
    assert main(["preannotate", "--url", labelstudio.url, "--api-key", labelstudio.token, "--project", "404",
                 "--preset", str(tiny_preset_dir), "--no-progress"]) == 2
    assert "no project 404" in caplog.text


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--limit", "-3"), ("--batch-size", "many")])
def test_bad_numbers_are_refused_with_a_message(labelstudio, tiny_preset_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        run(labelstudio, tiny_preset_dir, tmp_path, flag, value)
    assert stop.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert ours(labelstudio) == []
