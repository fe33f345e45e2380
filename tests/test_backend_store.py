"""The backend with a persistent store: image identity, warm-up, refinement, metrics."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.sam.engine import SamEngine
from sam_backend.server.app import create_app
from test_server import decode_brush, keypoint, make_backend, predict_body

IO_MODULE = "label_studio_sdk._extensions.label_studio_tools.core.utils.io"


@pytest.fixture()
def store_engine(tiny_segmenter, tmp_path):
    """A new worker's engine (nothing in memory) and the store the workers share."""

    def make():
        return SamEngine(tiny_segmenter, preset="tiny"), DiskStore(tmp_path / "store", 1 << 30)

    return make


def click(client, url, regions):
    response = client.post("/predict", json=predict_body(url, regions))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"][0]


def test_a_changed_local_file_gets_a_new_embedding(store_engine, tmp_path, monkeypatch, rng):
    root = tmp_path / "local-files"
    (root / "imgs").mkdir(parents=True)
    monkeypatch.setattr(f"{IO_MODULE}.LOCAL_FILES_DOCUMENT_ROOT", str(root))
    path = root / "imgs" / "a.png"
    first, second = random_image(rng, 90, 200), random_image(rng, 90, 200)
    Image.fromarray(first).save(path)
    engine, store = store_engine()
    client = create_app(make_backend(engine, tmp_path, store=store)).test_client()
    url = "/data/local-files/?d=imgs/a.png"

    click(client, url, [keypoint(25, 50)])
    click(client, url, [keypoint(30, 50)])
    assert engine.encoder_calls == 1

    Image.fromarray(second).save(path)  # the annotator's file is replaced in place
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    result = click(client, url, [keypoint(25, 50)])
    assert engine.encoder_calls == 2
    expected = engine.decode(EmbeddingTiers(engine, store).embedding_for("check", second), points=[[50, 45]], labels=[1])
    np.testing.assert_array_equal(decode_brush(result["result"][0]), expected.mask)

    restarted, store = store_engine()  # the old entry stays, but nothing asks for it any more
    client = create_app(make_backend(restarted, tmp_path, store=store)).test_client()
    click(client, url, [keypoint(25, 50)])
    assert restarted.encoder_calls == 0


def test_warm_up_fills_the_store_for_every_worker(store_engine, tmp_path, media, rng):
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    url = media.url + "/img.png"
    warm, store = store_engine()
    backend = make_backend(warm, tmp_path, store=store)
    create_app(backend).test_client().post("/predict", json=predict_body(url, None))
    backend._warmup.submit(lambda: None).result(timeout=30)  # queue drained
    assert warm.encoder_calls == 1

    other_worker, store = store_engine()  # another process: nothing in memory
    client = create_app(make_backend(other_worker, tmp_path, store=store)).test_client()
    assert click(client, url, [keypoint(25, 50)])["result"]
    assert other_worker.encoder_calls == 0


def test_a_click_that_extends_the_prompt_refines_the_previous_mask(engine, tmp_path, media, rng):
    image = random_image(rng, 90, 200)
    Image.fromarray(image).save(media.root / "img.png")
    client = create_app(make_backend(engine, tmp_path)).test_client()
    url = media.url + "/img.png"
    embedding = engine.encode(image)

    one = click(client, url, [keypoint(25, 50)])
    first = engine.decode(embedding, points=[[50, 45]], labels=[1])
    np.testing.assert_array_equal(decode_brush(one["result"][0]), first.mask)

    two = click(client, url, [keypoint(25, 50), keypoint(60, 20, positive=False)])
    refined = engine.decode(embedding, points=[[50, 45], [120, 18]], labels=[1, 0], mask_input=first.low_res_logits[0])
    plain = engine.decode(embedding, points=[[50, 45], [120, 18]], labels=[1, 0])
    assert two["score"] == pytest.approx(refined.score, abs=1e-6)
    assert two["score"] != pytest.approx(plain.score, abs=1e-6)
    np.testing.assert_array_equal(decode_brush(two["result"][0]), refined.mask)

    # A third click builds on the second, whichever order Label Studio lists the regions in.
    three = click(client, url, [keypoint(80, 70), keypoint(60, 20, positive=False), keypoint(25, 50)])
    expected = engine.decode(embedding, points=[[160, 63], [120, 18], [50, 45]], labels=[1, 0, 1],
                             mask_input=refined.low_res_logits[0])
    assert three["score"] == pytest.approx(expected.score, abs=1e-6)

    # A prompt that is not an extension (a point moved) starts afresh.
    moved = click(client, url, [keypoint(26, 50), keypoint(60, 20, positive=False)])
    fresh = engine.decode(embedding, points=[[52, 45], [120, 18]], labels=[1, 0])
    assert moved["score"] == pytest.approx(fresh.score, abs=1e-6)


def test_refinement_memory_expires_and_can_be_turned_off(engine, tmp_path, media, rng, monkeypatch):
    from sam_backend.server.refinement import RefinementMemory, prompt_signature

    now = [0.0]
    memory = RefinementMemory(ttl_seconds=60, max_entries=2, clock=lambda: now[0])
    one = prompt_signature([[1, 2]], [1], None)
    memory.remember("img", one, np.ones((4, 4)))
    assert memory.previous("img", prompt_signature([[1, 2], [3, 4]], [1, 1], None)) is not None
    assert memory.previous("img", prompt_signature([[1, 2]], [1], [0, 0, 5, 5])) is not None  # a box added
    assert memory.previous("other", prompt_signature([[1, 2], [3, 4]], [1, 1], None)) is None
    assert memory.previous("img", prompt_signature([[1, 2], [3, 4], [5, 6]], [1, 1, 1], None)) is None
    now[0] = 61
    assert memory.previous("img", prompt_signature([[1, 2], [3, 4]], [1, 1], None)) is None
    for i in range(5):
        memory.remember("img", prompt_signature([[i, i]], [1], None), np.ones((4, 4)))
    assert len(memory) == 2
    monkeypatch.setenv("SAM_REFINE_SECONDS", "0")
    assert not RefinementMemory.from_env().enabled
    monkeypatch.setenv("SAM_REFINE_SECONDS", "soon")
    assert RefinementMemory.from_env().ttl_seconds == 300


def test_metrics_count_tiers_times_and_load(store_engine, tmp_path, media, rng):
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    url = media.url + "/img.png"
    engine, store = store_engine()
    client = create_app(make_backend(engine, tmp_path, store=store)).test_client()
    click(client, url, [keypoint(25, 50)])
    click(client, url, [keypoint(25, 50)])
    engine, store = store_engine()
    restarted = create_app(make_backend(engine, tmp_path, store=store)).test_client()
    click(restarted, url, [keypoint(25, 50)])

    def value(text, line):
        (match,) = [row for row in text.splitlines() if row.startswith(line + " ")]
        return float(match.split()[-1])

    first = client.get("/metrics").get_data(as_text=True)
    assert value(first, 'sam_embedding_lookups_total{result="miss",tier="memory"}') == 1
    assert value(first, 'sam_embedding_lookups_total{result="hit",tier="memory"}') == 1
    assert value(first, 'sam_embedding_lookups_total{result="miss",tier="disk"}') == 1
    assert value(first, "sam_encode_seconds_count") == 1
    assert value(first, "sam_decode_seconds_count") == 2
    assert value(first, "sam_images_in_flight") == 0
    assert value(first, "sam_model_load_seconds") >= 0
    second = restarted.get("/metrics").get_data(as_text=True)
    assert value(second, 'sam_embedding_lookups_total{result="hit",tier="disk"}') == 1
    assert value(second, "sam_encode_seconds_count") == 0


def test_a_server_without_a_usable_store_still_answers(tiny_preset_dir, tmp_path, media, rng, monkeypatch, caplog):
    import logging

    from sam_backend.server.backend import ModelHolder, SamBackend
    from sam_backend.labelstudio.media import Credentials, MediaFetcher

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SAM_CACHE_DIR", str(blocker / "store"))
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    holder = ModelHolder(str(tiny_preset_dir))
    with caplog.at_level(logging.WARNING):
        holder.start().wait(120)
    assert holder.state == "ready" and holder.loaded_embeddings.store is None
    assert "memory only" in caplog.text
    backend = SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(tmp_path / "media")), credentials=Credentials())
    assert click(create_app(backend).test_client(), media.url + "/img.png", [keypoint(25, 50)])["result"]


def test_loading_pays_the_first_clicks_one_time_costs(engine, caplog):
    import logging

    from sam_backend.server.backend import ModelHolder

    with caplog.at_level(logging.INFO, logger="sam_backend"):
        holder = ModelHolder("tiny", loader=lambda preset: engine).start()
        assert holder.wait(60) and holder.state == "ready"
    assert "Warmed up" in caplog.text and "Warm-up after loading failed" not in caplog.text
    assert engine.stats.decode_seconds._sum.get() == 0  # not counted as a click
