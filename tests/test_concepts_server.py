"""Concept prompts through the server and the preannotate command, with the tiny SAM 3 preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_backend.commands.cli import main
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.media import Credentials
from sam_backend.sam3.engine import ConceptEngine
from sam_backend.sam3.tiny import write_tiny_concept_preset
from sam_backend.server.app import create_app
from sam_backend.server.backend import ModelHolder

from fake_labelstudio import FakeLabelStudio
from test_server import decode_brush, make_backend

CONFIG = (Path(__file__).resolve().parent.parent / "label_config_concepts.xml").read_text()
PROJECT = 7


@pytest.fixture(scope="module")
def concept_preset(tmp_path_factory):
    return str(write_tiny_concept_preset(tmp_path_factory.mktemp("sam3") / "tiny"))


@pytest.fixture()
def scene(rng):
    image = (rng.random((90, 160, 3)) * 80).astype(np.uint8)
    image[20:60, 30:80] = (40, 200, 40)
    return image


@pytest.fixture()
def backend(engine, tmp_path, media, scene, concept_preset):
    from sam_backend.embeddings.disk_store import DiskStore

    Image.fromarray(scene).save(media.root / "shelf.png")
    store = DiskStore(tmp_path / "store", budget_bytes=1 << 30)
    backend = make_backend(engine, tmp_path, store=store)
    backend.concept_preset = concept_preset
    backend.concepts = ModelHolder(concept_preset, loader=ConceptEngine.from_preset, store=store).start()
    backend.concepts.wait()
    return backend


def text_region(text, name="prompt"):
    return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": [text]}}


def exemplar_region(x0, y0, x1, y1, label="Bottle", size=(90, 160), name="exemplar"):
    h, w = size
    return {"from_name": name, "to_name": "image", "type": "rectanglelabels", "original_width": w,
            "original_height": h, "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                                            "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}}


def ask(client, media, *regions, extra=None, config=CONFIG):
    body = {"tasks": [{"id": 1, "data": {"image": media.url + "/shelf.png"}}], "label_config": config,
            "project": f"{PROJECT}.1795260000", "params": {"context": {"result": list(regions)}}}
    return client.post("/predict", json=body)


def test_a_phrase_finds_every_instance_as_regions_of_its_label(backend, media, scene):
    client = create_app(backend, start_loading=False).test_client()
    response = ask(client, media, text_region("Can: green boxes"))
    assert response.status_code == 200, response.get_json()
    (prediction,) = response.get_json()["results"]
    assert prediction["model_version"] == backend.concept_model_version and "tiny" in prediction["model_version"]
    regions = prediction["result"]
    assert len(regions) >= 2, "the tiny preset's decisive detections: several instances"
    assert all(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["Can"] for r in regions)
    assert all(0.5 < r["score"] <= 1 for r in regions)
    masks = [decode_brush(r) for r in regions]
    assert all(m.shape == scene.shape[:2] and m.any() for m in masks)
    assert len({m.tobytes() for m in masks}) == len(masks), "separate instances, not one merged mask"


def test_a_labels_name_searches_its_hint_and_a_second_phrase_costs_no_encode(backend, media):
    client = create_app(backend, start_loading=False).test_client()
    tiers = backend.concepts.embeddings()
    first = ask(client, media, text_region("bottle")).get_json()["results"][0]
    calls = tiers.engine.encoder_calls
    second = ask(client, media, text_region("Can")).get_json()["results"][0]
    assert tiers.engine.encoder_calls == calls == 1
    assert {r["value"]["brushlabels"][0] for r in first["result"]} == {"Bottle"}
    assert {r["value"]["brushlabels"][0] for r in second["result"]} <= {"Can"}
    # The vision features are in the store, under SAM 3's own fingerprint.
    assert tiers.fingerprint != backend.holder.embeddings().fingerprint
    assert any(key.startswith(tiers.fingerprint[:32]) for key in _store_keys(backend))


def _store_keys(backend):
    root = Path(backend.concepts.embeddings().store.location)
    return ["/".join(p.relative_to(root).parts[-2:]).removesuffix(".npz") for p in root.rglob("*.npz")]


def test_an_exemplar_box_finds_objects_like_it(backend, media):
    client = create_app(backend, start_loading=False).test_client()
    response = ask(client, media, exemplar_region(30, 20, 80, 60, label="Bottle"))
    assert response.status_code == 200, response.get_json()
    regions = response.get_json()["results"][0]["result"]
    assert regions and {r["value"]["brushlabels"][0] for r in regions} == {"Bottle"}


def test_polygons_when_the_project_asks_for_them(backend, media):
    client = create_app(backend, start_loading=False).test_client()
    config = CONFIG.replace("</View>", '<PolygonLabels name="polygon" toName="image"><Label value="Bottle"/>'
                            '<Label value="Can"/></PolygonLabels></View>')
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": config, "extra_params": {"output": "polygon"}})
    regions = ask(client, media, text_region("Bottle"), config=config).get_json()["results"][0]["result"]
    assert regions and all(r["type"] == "polygonlabels" for r in regions)


def counterexample_region(x0, y0, x1, y1, label="Bottle"):
    return exemplar_region(x0, y0, x1, y1, label=label, name="counterexample")


def test_counterexample_boxes_reach_sam3_as_negative_boxes(backend, media, monkeypatch):
    """As the editor sends them: the exemplar, and the counter-example of the same label drawn after it."""
    client = create_app(backend, start_loading=False).test_client()
    engine = backend.concepts.embeddings().engine
    asked, find = [], engine.find

    def spy(embedding, **prompt):
        asked.append(prompt)
        return find(embedding, **prompt)

    monkeypatch.setattr(engine, "find", spy)
    alone = ask(client, media, exemplar_region(30, 20, 80, 60)).get_json()["results"][0]
    both = ask(client, media, exemplar_region(30, 20, 80, 60), counterexample_region(100, 10, 150, 80)).get_json()
    (prediction,) = both["results"]
    assert asked[1]["box_labels"] == [True, False] and len(asked[1]["boxes"]) == 2 and asked[1]["phrase"] is None
    assert {r["value"]["brushlabels"][0] for r in prediction["result"]} == {"Bottle"}
    assert [r["score"] for r in prediction["result"]] != [r["score"] for r in alone["result"]], \
        "the counter-example changes what SAM 3 finds"


def test_counterexamples_alone_search_their_labels_phrase(backend, media, monkeypatch):
    client = create_app(backend, start_loading=False).test_client()
    engine = backend.concepts.embeddings().engine
    asked, find = [], engine.find
    monkeypatch.setattr(engine, "find", lambda embedding, **prompt: asked.append(prompt) or find(embedding, **prompt))
    response = ask(client, media, counterexample_region(100, 10, 150, 80, label="Can"))
    assert response.status_code == 200, response.get_json()
    assert asked[0]["phrase"] == "drink can" and asked[0]["box_labels"] == [False]
    assert {r["value"]["brushlabels"][0] for r in response.get_json()["results"][0]["result"]} <= {"Can"}
    with_phrase = ask(client, media, text_region("Bottle: green boxes"), counterexample_region(100, 10, 150, 80))
    assert with_phrase.status_code == 200 and asked[1]["phrase"] == "green boxes"
    assert asked[1]["box_labels"] == [False]


@pytest.mark.parametrize("regions, status, message", [
    ([text_region("   ")], 400, "phrase is empty"),
    ([counterexample_region(100, 10, 150, 10)], 400, "zero"),
    ([counterexample_region(100, 10, 150, 80, label="Cat")], 400, "counter-example box says what not to find"),
    ([text_region("Can: " + " ".join(["nucleus"] * 40))], 400, "at most 30"),
    ([exemplar_region(30, 20, 30, 60)], 400, "zero"),
    ([text_region("shiny things")], 400, "Which label"),
])
def test_bad_concept_prompts_say_what_is_wrong(backend, media, regions, status, message):
    client = create_app(backend, start_loading=False).test_client()
    response = ask(client, media, *regions)
    assert response.status_code == status
    assert message in response.get_json()["error"]


def test_a_phrase_that_finds_nothing_says_so(backend, media):
    client = create_app(backend, start_loading=False).test_client()
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG,
                                "extra_params": {"concept_threshold": 0.9999}})
    (prediction,) = ask(client, media, text_region("Bottle")).get_json()["results"]
    assert prediction["result"] == [] and "Nothing like 'bottle' found" in prediction["message"]


def test_without_a_concept_preset_a_concept_prompt_is_refused_clearly(engine, tmp_path, media, scene, monkeypatch):
    monkeypatch.delenv("SAM_CONCEPT_PRESET", raising=False)
    Image.fromarray(scene).save(media.root / "shelf.png")
    backend = make_backend(engine, tmp_path)
    client = create_app(backend, start_loading=False).test_client()
    response = ask(client, media, text_region("Bottle"))
    assert response.status_code == 501
    assert "--concept-preset" in response.get_json()["error"]
    assert "concepts" not in client.get("/health").get_json()


def test_health_reports_the_concept_model(backend):
    client = create_app(backend, start_loading=False).test_client()
    concepts = client.get("/health").get_json()["concepts"]
    assert concepts["state"] == "ready" and concepts["model_version"] == backend.concept_model_version


def test_a_broken_concept_preset_is_reported_not_fatal(engine, tmp_path, media):
    backend = make_backend(engine, tmp_path)
    backend.concept_preset = str(tmp_path / "no-such-preset")
    backend.concepts = ModelHolder(backend.concept_preset, loader=ConceptEngine.from_preset).start()
    backend.concepts.wait()
    client = create_app(backend, start_loading=False).test_client()
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["concepts"]["state"] == "failed"
    assert "tiny-preset sam3" in health["concepts"]["error"]


def test_label_config_reads_the_text_prompt_exemplar_control_and_phrases():
    config = parse_label_config(CONFIG)
    assert config.text_prompt_names == ("prompt",) and config.exemplar_names == ("exemplar",)
    assert config.counterexample_names == ("counterexample",)
    assert config.rectangle_names == (), "exemplar and counter-example boxes are not SAM box prompts"
    assert dict(config.label_phrases) == {"Bottle": "bottle", "Can": "drink can"}


# ------------------------------------------------------------------ preannotate --mode concepts

@pytest.fixture()
def labelstudio(tmp_path, scene):
    files = tmp_path / "files"
    (files / str(PROJECT)).mkdir(parents=True)
    Image.fromarray(scene).save(files / str(PROJECT) / "a.png")
    fake = FakeLabelStudio(files, label_config=CONFIG)
    for _ in range(3):
        fake.add_task(PROJECT, f"{PROJECT}/a.png")
    fake.add_task(PROJECT, f"{PROJECT}/missing.png")
    yield fake
    fake.close()


def preannotate(fake, preset, concept_preset, tmp_path, *extra):
    return main(["preannotate", "--url", fake.url, "--api-key", fake.token, "--project", str(PROJECT),
                 "--preset", str(preset), "--mode", "concepts", "--concept-preset", concept_preset,
                 "--cache-dir", str(tmp_path / "store"), "--no-progress", *extra])


def test_preannotate_concepts_fills_the_project_and_resumes(labelstudio, tiny_preset_dir, concept_preset, tmp_path,
                                                            capsys):
    assert preannotate(labelstudio, tiny_preset_dir, concept_preset, tmp_path, "--concept", "Can=green box") == 1
    out = capsys.readouterr().out
    assert "3 task(s) got a prediction" in out and "missing.png" in out
    predictions = [p for p in labelstudio.predictions(PROJECT) if "tiny" in str(p.get("model_version"))]
    assert len(predictions) == 3
    labels = {r["value"]["brushlabels"][0] for p in predictions for r in p["result"]}
    assert labels == {"Bottle", "Can"}, "one decode per label, every label"
    assert preannotate(labelstudio, tiny_preset_dir, concept_preset, tmp_path) == 1
    assert "3 task(s) skipped" in capsys.readouterr().out


def test_preannotate_concepts_refuses_an_unknown_label_or_an_empty_phrase(labelstudio, tiny_preset_dir,
                                                                          concept_preset, tmp_path, caplog):
    assert preannotate(labelstudio, tiny_preset_dir, concept_preset, tmp_path, "--concept", "Cat=cat") == 2
    assert "'Cat'" in caplog.text and "does not have" in caplog.text
    assert preannotate(labelstudio, tiny_preset_dir, concept_preset, tmp_path, "--concept", "Can=") == 2
    assert "no phrase" in caplog.text
    assert main(["preannotate", "--url", labelstudio.url, "--api-key", labelstudio.token, "--project",
                 str(PROJECT), "--preset", str(tiny_preset_dir), "--mode", "concepts", "--no-progress"]) == 2
    assert "--concept-preset" in caplog.text


def test_retrieve_predictions_in_concepts_mode(backend, tmp_path, labelstudio):
    backend.credentials = Credentials(labelstudio.url, labelstudio.token)
    client = create_app(backend, start_loading=False).test_client()
    client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG, "extra_params": {"prelabel": "concepts"}})
    tasks = [labelstudio.add_task(PROJECT, f"{PROJECT}/a.png") for _ in range(2)]
    body = {"tasks": tasks, "project": f"{PROJECT}.1", "label_config": CONFIG, "params": {"context": None}}
    results = client.post("/predict", json=body).get_json()["results"]
    assert len(results) == 2 and all(r["model_version"] == backend.concept_model_version for r in results)
    assert all(r["result"] for r in results)


def test_look_ahead_encodes_the_next_tasks_sam3_features_too(engine, tmp_path, concept_preset, monkeypatch, rng):
    from sam_backend.embeddings.disk_store import DiskStore
    from sam_backend.embeddings.store import entry_key
    from sam_backend.server.lookahead import LookAhead

    monkeypatch.setenv("SAM_CONCEPT_LOOKAHEAD", "1")
    files = tmp_path / "files"
    (files / str(PROJECT)).mkdir(parents=True)
    fake = FakeLabelStudio(files, label_config=CONFIG)
    try:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(files / str(PROJECT) / f"{i}.png")
            fake.add_task(PROJECT, f"{PROJECT}/{i}.png")
        store = DiskStore(tmp_path / "store", 1 << 30)
        backend = make_backend(engine, tmp_path, credentials=Credentials(fake.url, fake.token), store=store)
        backend.concept_preset = concept_preset
        backend.concepts = ModelHolder(concept_preset, loader=ConceptEngine.from_preset, store=store).start()
        backend.concepts.wait()
        backend.lookahead = LookAhead(backend, depth=2)
        backend.lookahead.saw(str(PROJECT), fake.tasks[PROJECT][0]["id"], parse_label_config(CONFIG))
        assert backend.lookahead.wait_idle()

        def stored(tiers, index):
            task = fake.tasks[PROJECT][index]
            key, _ = backend.image_source(task["data"]["image"], task["id"], str(PROJECT))
            return tiers.store.get(entry_key(tiers.fingerprint, key)) is not None

        sam, sam3 = backend.holder.embeddings(), backend.concepts.embeddings()
        assert [stored(sam, i) for i in range(4)] == [False, True, True, False]
        assert [stored(sam3, i) for i in range(4)] == [False, True, False, False], "only the next task for SAM 3"
        assert backend.lookahead.concept_encodes._value.get() == 1
    finally:
        fake.close()


# ------------------------------------------------------------------ precompute --concept-preset

def precompute(fake, preset, tmp_path, *extra):
    return main(["precompute", "--url", fake.url, "--api-key", fake.token, "--project", str(PROJECT),
                 "--preset", str(preset), "--cache-dir", str(tmp_path / "store"), "--no-progress", *extra])


def test_precompute_stores_sam3_features_that_the_server_then_reads(labelstudio, engine, tiny_preset_dir,
                                                                      concept_preset, tmp_path, capsys):
    from sam_backend.embeddings.disk_store import DiskStore

    assert precompute(labelstudio, tiny_preset_dir, tmp_path, "--concept-preset", concept_preset) == 1  # missing.png
    out = capsys.readouterr().out
    assert "1 encoded, 2 already stored" in out, "three tasks of one image: encoded once"
    assert "SAM: 1 encoded, 2 already stored; SAM 3: 1 encoded, 2 already stored" in out
    assert precompute(labelstudio, tiny_preset_dir, tmp_path, "--concept-preset", concept_preset) == 1
    assert "0 encoded, 3 already stored" in capsys.readouterr().out, "a second run encodes nothing"

    store = DiskStore(tmp_path / "store", budget_bytes=1 << 30)
    assert store.stats().entries == 2, "one entry per model"
    backend = make_backend(engine, tmp_path / "serving", Credentials(labelstudio.url, labelstudio.token), store=store)
    backend.concept_preset = concept_preset
    backend.concepts = ModelHolder(concept_preset, loader=ConceptEngine.from_preset, store=store).start()
    backend.concepts.wait()
    client = create_app(backend, start_loading=False).test_client()
    task = labelstudio.tasks[PROJECT][0]
    body = {"tasks": [task], "label_config": CONFIG, "project": f"{PROJECT}.1",
            "params": {"context": {"result": [text_region("Can: green boxes")]}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.get_json()["results"][0]["result"]
    assert backend.concepts.embeddings().engine.encoder_calls == 0, "the phrase read the precomputed features"


def test_precompute_concepts_only(labelstudio, tiny_preset_dir, concept_preset, tmp_path, capsys, caplog,
                                  monkeypatch):
    from sam_backend.embeddings.disk_store import DiskStore

    monkeypatch.delenv("SAM_CONCEPT_PRESET", raising=False)
    assert precompute(labelstudio, tiny_preset_dir, tmp_path, "--concepts-only") == 2
    assert "--concepts-only needs a SAM 3 preset" in caplog.text
    monkeypatch.setenv("SAM_CONCEPT_PRESET", concept_preset)  # as the server reads it
    assert precompute(labelstudio, tiny_preset_dir, tmp_path, "--concepts-only") == 1
    out = capsys.readouterr().out
    assert "1 encoded, 2 already stored" in out and "SAM:" not in out
    assert DiskStore(tmp_path / "store", budget_bytes=1 << 30).stats().entries == 1


def test_an_unlabelled_exemplar_box_is_not_taken_for_a_counterexample():
    from sam_backend.errors import PromptError
    from sam_backend.labelstudio.concepts import concept_request_from_context

    config = parse_label_config(CONFIG)
    box = exemplar_region(30, 20, 80, 60)
    del box["value"]["rectanglelabels"]
    with pytest.raises(PromptError, match="Which label"):  # two labels: the box alone cannot tell
        concept_request_from_context({"result": [box]}, config, (90, 160))
    request = concept_request_from_context({"result": [box, counterexample_region(100, 10, 150, 80)]}, config,
                                           (90, 160))
    assert (request.phrase, request.label, request.box_labels) == (None, "Bottle", [True, False])
