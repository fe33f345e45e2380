"""``sam-backend precompute`` against a Label Studio API on loopback."""

import pytest
from PIL import Image

from conftest import random_image
from fake_labelstudio import FakeLabelStudio
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.sam.engine import SamEngine
from sam_backend.errors import LabelConfigError
from sam_backend.labelstudio.api import LabelStudioProject
from sam_backend.labelstudio.media import Credentials, MediaFetcher
from sam_backend.commands.precompute import Precomputer, image_data_key
from sam_backend.server.app import create_app
from sam_backend.embeddings.disk_store import DiskStore
from test_server import LABEL_CONFIG, keypoint, make_backend, predict_body

PROJECT = 3


@pytest.fixture()
def labelstudio(tmp_path, rng):
    files = tmp_path / "ls-files"
    (files / str(PROJECT)).mkdir(parents=True)
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    for i in range(3):
        Image.fromarray(random_image(rng, 90, 200)).save(files / str(PROJECT) / f"img{i}.png")
        fake.add_task(PROJECT, f"{PROJECT}/img{i}.png")
    yield fake
    fake.close()


def precomputer(engine, fake, tmp_path, **kwargs):
    project = LabelStudioProject(fake.url, fake.token, PROJECT, retries=0)
    fetcher = MediaFetcher(cache_dir=str(tmp_path / "media"), timeout=5)
    return Precomputer(engine, project, Credentials(fake.url, fake.token), fetcher=fetcher, progress=False, **kwargs)


def store_engine(model, tmp_path):
    return EmbeddingTiers(SamEngine(model, preset="tiny"), store=DiskStore(tmp_path / "store", 1 << 30))


def test_precompute_fills_the_store_and_a_second_run_skips_it(labelstudio, tiny_segmenter, tmp_path):
    labelstudio.add_task(PROJECT, f"{PROJECT}/missing.png")  # 404
    labelstudio.tasks[PROJECT].append({"id": 99, "project": PROJECT, "data": {"text": "no image"},
                                       "annotations": [], "predictions": []})
    engine = store_engine(tiny_segmenter, tmp_path)
    summary = precomputer(engine, labelstudio, tmp_path).run()
    assert (summary.tasks, summary.encoded, summary.stored, summary.no_image) == (5, 3, 0, 1)
    assert list(summary.failed) == [labelstudio.tasks[PROJECT][3]["id"]] and "404" in next(iter(summary.failed.values()))
    assert summary.exit_code == 1 and engine.engine.encoder_calls == 3
    assert engine.store.stats().entries == 3

    again = store_engine(tiny_segmenter, tmp_path)  # a new run: a new process
    summary = precomputer(again, labelstudio, tmp_path).run()
    assert (summary.encoded, summary.stored) == (0, 3) and again.engine.encoder_calls == 0
    assert "0 encoded, 3 already stored, 1 without an image, 1 failed" in summary.lines()[0]


def test_an_interrupted_run_resumes_where_it_stopped(labelstudio, tiny_segmenter, tmp_path):
    engine = store_engine(tiny_segmenter, tmp_path)
    real = engine.engine._encoder
    calls = []

    def encoder(x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second encode
        return real(x)

    engine.engine._encoder = encoder
    summary = precomputer(engine, labelstudio, tmp_path).run()
    assert summary.interrupted and summary.exit_code == 130 and summary.encoded == 1
    assert "run the same command again" in "\n".join(summary.lines())
    assert engine.store.stats().entries == 1  # nothing half-written

    resumed = store_engine(tiny_segmenter, tmp_path)
    summary = precomputer(resumed, labelstudio, tmp_path).run()
    assert (summary.encoded, summary.stored, summary.exit_code) == (2, 1, 0) and resumed.engine.encoder_calls == 2


def test_the_server_answers_from_precomputed_embeddings(labelstudio, tiny_segmenter, tmp_path):
    precomputer(store_engine(tiny_segmenter, tmp_path), labelstudio, tmp_path).run()
    serving = store_engine(tiny_segmenter, tmp_path)  # the serving host, after copying the store
    backend = make_backend(serving.engine, tmp_path / "serving", Credentials(labelstudio.url, labelstudio.token),
                           store=serving.store)
    client = create_app(backend).test_client()
    for task in labelstudio.tasks[PROJECT]:
        body = predict_body(task["data"]["image"], [keypoint(25, 50)], task_id=task["id"])
        response = client.post("/predict", json=body)
        assert response.status_code == 200 and response.get_json()["results"][0]["result"]
    assert serving.engine.encoder_calls == 0


def test_a_view_limits_the_tasks(labelstudio, tiny_segmenter, tmp_path, monkeypatch):
    seen = []
    original = LabelStudioProject.iter_tasks

    def spy(self, view=None, **kwargs):
        seen.append(view)
        return original(self, view, **kwargs)

    monkeypatch.setattr(LabelStudioProject, "iter_tasks", spy)
    precomputer(store_engine(tiny_segmenter, tmp_path), labelstudio, tmp_path, view=12).run()
    assert seen == [12]


def test_image_field_from_the_label_config():
    assert image_data_key(LABEL_CONFIG) == "image"
    no_brush = '<View><Image name="img" value="$photo"/><KeyPointLabels name="kp" toName="img"><Label value="A"/></KeyPointLabels></View>'
    assert image_data_key(no_brush) == "photo"
    with pytest.raises(LabelConfigError, match="--data-key"):
        image_data_key('<View><Text name="t" value="$text"/></View>')


def test_precompute_command(labelstudio, tiny_preset_dir, tmp_path, monkeypatch, capsys):
    from sam_backend.commands.cli import main

    monkeypatch.delenv("SAM_CACHE_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model-dir"))
    args = ["precompute", "--url", labelstudio.url, "--api-key", labelstudio.token, "--project", str(PROJECT),
            "--preset", str(tiny_preset_dir), "--cache-dir", str(tmp_path / "store"), "--no-progress"]
    assert main(args) == 0
    assert "3 encoded, 0 already stored" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 encoded, 3 already stored" in capsys.readouterr().out
    assert DiskStore(tmp_path / "store", 1 << 30).stats().entries == 3

    bad_token = args[:4] + ["wrong"] + args[5:]
    assert main(bad_token) == 2
    assert main(args[:6] + ["404"] + args[7:]) == 2
