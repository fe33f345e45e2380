"""Look-ahead: the next tasks of a project are encoded behind the annotator's clicks, against a fake Label Studio.

Each task's image is filled with one value (its index), which the recording
encoder of ``test_encode_queue`` reads back, so that tests see which images
were encoded, in what order, and can hold one encode on a gate.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fake_labelstudio import FakeLabelStudio
from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.embeddings.encode_queue import EncodeJob, EncodeQueue, EncodeSkipped, Priority
from sam_backend.embeddings.memory import LRUCache
from sam_backend.embeddings.store import StoredEmbedding, entry_key
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.labelstudio.media import Credentials
from sam_backend.sam.engine import SamEngine
from sam_backend.server.app import create_app
from sam_backend.server.lookahead import LookAhead
from test_encode_queue import FakeEncoder, image, wait_until
from test_server import LABEL_CONFIG, keypoint, make_backend

PROJECT = 5
CONFIG = parse_label_config(LABEL_CONFIG)


@pytest.fixture()
def labelstudio(tmp_path):
    """Ten tasks of project 5, task i on an image filled with 10 * (i + 1); task 3 is labeled."""
    files = tmp_path / "files"
    (files / str(PROJECT)).mkdir(parents=True)
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    for i in range(10):
        Image.fromarray(image(10 * (i + 1))).save(files / str(PROJECT) / f"{i}.png")
        fake.add_task(PROJECT, f"{PROJECT}/{i}.png", annotations=[{"id": 1, "result": []}] if i == 3 else [])
    yield fake
    fake.close()


def tasks(fake) -> list[dict]:
    return fake.tasks[PROJECT]


def value(fake, index: int) -> int:
    return 10 * (index + 1)


@pytest.fixture()
def worker(tiny_segmenter, tmp_path, labelstudio):
    """A backend (one gunicorn worker's) on a disk store, with Label Studio's URL and token, look-ahead 4."""
    return make_worker(tiny_segmenter, tmp_path, labelstudio)


def make_worker(segmenter, tmp_path, fake, token=None, depth=4, store_dir="store", **options):
    engine = SamEngine(segmenter, preset="tiny")
    encoder = FakeEncoder(engine)
    store = DiskStore(tmp_path / store_dir, 1 << 30)
    credentials = Credentials(fake.url, token or fake.token) if fake is not None else Credentials()
    backend = make_backend(engine, tmp_path, credentials=credentials, store=store)
    backend.lookahead = LookAhead(backend, depth=depth, **options)
    encoder.calls.clear()  # the warm-up's blank image
    backend.encoder = encoder
    return backend


def stored(backend, fake, index: int) -> bool:
    task = tasks(fake)[index]
    key, _ = backend.image_source(task["data"]["image"], task["id"], str(PROJECT))
    tiers = backend.holder.embeddings()
    return tiers.store.get(entry_key(tiers.fingerprint, key)) is not None


def list_requests(fake) -> int:
    return sum(1 for method, path in fake.requests if method == "GET" and path.rstrip("/") == "/api/tasks")


def test_the_next_unlabeled_tasks_are_encoded_in_label_studios_order(worker, labelstudio):
    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[0]["id"], CONFIG)
    assert worker.lookahead.wait_idle()
    # Tasks 1, 2, 4, 5: task 3 is labeled, task 6 is past the depth.
    assert worker.encoder.order == [value(labelstudio, i) for i in (1, 2, 4, 5)]
    assert [stored(worker, labelstudio, i) for i in range(8)] == [False, True, True, False, True, True, False, False]
    assert worker.lookahead.encodes._value.get() == 4
    assert worker.lookahead.status() == {"depth": 4, "projects": {str(PROJECT): "on"}}


def test_the_task_list_is_read_a_page_from_the_annotator_and_cached(worker, labelstudio):
    for i in range(300):  # a large project: it is never listed whole
        labelstudio.add_task(PROJECT, f"{PROJECT}/0.png")
    first = tasks(labelstudio)[0]["id"]
    worker.lookahead.saw(str(PROJECT), first, CONFIG)
    assert worker.lookahead.wait_idle()
    # Pages of 2 x depth tasks from the annotator on, until 8 unlabeled ones: page 1 holds the labeled
    # task 3, so page 2 is read too; not the other 38 pages.
    assert list_requests(labelstudio) == 2
    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[1]["id"], CONFIG)  # the next task: the cached list
    assert worker.lookahead.wait_idle()
    assert list_requests(labelstudio) == 2
    assert worker.encoder.order == [value(labelstudio, i) for i in (1, 2, 4, 5, 6)]

    worker.lookahead.list_seconds = 0  # expired: Label Studio is asked again, from where the annotator is
    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[4]["id"], CONFIG)
    assert worker.lookahead.wait_idle()
    assert list_requests(labelstudio) == 3


def test_a_first_click_on_a_looked_ahead_task_is_a_hit_and_encodes_nothing(worker, labelstudio):
    client = create_app(worker).test_client()

    def click(index: int):
        task = tasks(labelstudio)[index]
        body = {"tasks": [{**task, "project": PROJECT}], "project": f"{PROJECT}.1795260000",
                "label_config": LABEL_CONFIG, "params": {"context": {"result": [keypoint(50, 50)]}}}
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.get_json()

    click(0)
    assert worker.lookahead.wait_idle()
    encoded = len(worker.encoder.order)
    click(1)
    assert len(worker.encoder.order) == encoded  # served from the store
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "sam_lookahead_hits_total 1.0" in metrics and "sam_lookahead_encodes_total 4.0" in metrics
    assert client.get("/health").get_json()["lookahead"] == {"depth": 4, "projects": {str(PROJECT): "on"}}


def test_a_jump_drops_the_queued_look_aheads_of_the_old_place(worker, labelstudio):
    queue = worker.holder.embeddings().queue
    worker.encoder.hold = 250  # an annotator's click on another image holds the encoder
    held = queue.submit("click", EncodeJob(image(250)), Priority.CLICK)
    assert worker.encoder.started.wait(10)

    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[0]["id"], CONFIG)
    wait_until(lambda: len(queue) == 4)
    old = list(worker.lookahead._projects[str(PROJECT)].futures)
    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[6]["id"], CONFIG)  # the annotator jumps to task 6
    wait_until(lambda: all(future.done() for future in old))
    assert all(isinstance(future.exception(), EncodeSkipped) for future in old)
    worker.encoder.gate.set()
    held.result(10)
    assert worker.lookahead.wait_idle()
    # Only the new place's tasks (7, 8, 9) were encoded after the held click; nothing was wasted.
    assert worker.encoder.order == [250] + [value(labelstudio, i) for i in (7, 8, 9)]
    assert worker.lookahead.waste._value.get() == 0


def test_passing_encoded_look_aheads_without_a_click_is_waste(worker, labelstudio):
    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[0]["id"], CONFIG)
    assert worker.lookahead.wait_idle()
    worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[6]["id"], CONFIG)  # jumps over 1, 2, 4, 5
    assert worker.lookahead.wait_idle()
    assert worker.lookahead.waste._value.get() == 4


def test_a_click_never_waits_for_a_look_ahead_that_has_not_started(tiny_segmenter):
    engine = SamEngine(tiny_segmenter, preset="tiny")
    encoder = FakeEncoder(engine, hold=1)
    queue = EncodeQueue(engine)
    first = queue.submit("first", EncodeJob(image(1)), Priority.CLICK)
    assert encoder.started.wait(10)
    ahead = [queue.submit(f"ahead{i}", EncodeJob(image(100 + i)), Priority.LOOKAHEAD) for i in range(3)]
    warm = queue.submit("warm", EncodeJob(image(60)), Priority.WARMUP)
    click = queue.submit("click", EncodeJob(image(50)), Priority.CLICK)
    encoder.gate.set()
    for future in [first, click, warm, *ahead]:
        future.result(10)
    assert encoder.order == [1, 50, 60, 100, 101, 102]


def test_a_click_on_a_queued_look_ahead_takes_it_over(tiny_segmenter, tmp_path):
    from sam_backend.embeddings.tiers import EmbeddingTiers

    engine = SamEngine(tiny_segmenter, preset="tiny")
    encoder = FakeEncoder(engine, hold=1)
    tiers = EmbeddingTiers(engine, store=DiskStore(tmp_path / "store", 1 << 30))
    first = tiers.queue.submit("first", EncodeJob(image(1)), Priority.CLICK)
    assert encoder.started.wait(10)
    ahead = tiers.look_ahead("img-7", image(70), protect_seconds=600)
    result = {}
    clicker = threading.Thread(target=lambda: result.update(e=tiers.embedding_for("img-7", image(70))))
    clicker.start()
    wait_until(lambda: tiers.queue._items["img-7"].priority == Priority.CLICK)
    assert tiers.queue.discard(["img-7"]) == 0  # a click's now: not dropped on a jump
    encoder.gate.set()
    clicker.join(10)
    first.result(10)
    assert ahead.result(10) == "taken over" and encoder.order == [1, 70]
    assert tiers.memory.get("img-7") is result["e"]  # kept as a click's embedding, not a spare


def test_another_workers_look_ahead_is_not_encoded_twice(tiny_segmenter, tmp_path, labelstudio):
    """Two workers on one store see the same place: each image is encoded once between them."""
    workers = [make_worker(tiny_segmenter, tmp_path, labelstudio) for _ in range(2)]
    threads = [threading.Thread(target=w.lookahead.saw, args=(str(PROJECT), tasks(labelstudio)[0]["id"], CONFIG))
               for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(w.lookahead.wait_idle() for w in workers)
    encoded = sorted(v for w in workers for v in w.encoder.order)
    assert encoded == [value(labelstudio, i) for i in (1, 2, 4, 5)]


@pytest.mark.parametrize("case, reason", [
    ("no credentials", "no Label Studio URL and token"),
    ("refused", "Label Studio answered 401"),
    ("down", "Label Studio answered 503"),
])
def test_without_label_studio_look_ahead_is_off_with_a_reason_and_clicks_work(case, reason, tiny_segmenter,
                                                                               tmp_path, labelstudio, media, caplog):
    fake = None if case == "no credentials" else labelstudio
    backend = make_worker(tiny_segmenter, tmp_path, fake, token="wrong" if case == "refused" else None)
    if case == "down":
        labelstudio.fail_lists[PROJECT] = 503
    Image.fromarray(image(200)).save(media.root / "img.png")
    client = create_app(backend).test_client()
    task = tasks(labelstudio)[0]
    for _ in range(2):
        body = {"tasks": [{**task, "data": {"image": media.url + "/img.png"}}],
                "project": f"{PROJECT}.1795260000", "label_config": LABEL_CONFIG,
                "params": {"context": {"result": [keypoint(50, 50)]}}}
        response = client.post("/predict", json=body)
        assert response.status_code == 200 and response.get_json()["results"][0]["result"]
        assert backend.lookahead.wait_idle()
    state = client.get("/health").get_json()["lookahead"]["projects"][str(PROJECT)]
    assert state.startswith(reason), state
    assert caplog.text.count("Look-ahead is off for project") == 1  # one warning, not one per click
    assert backend.encoder.order == [200]  # the clicked image only


def test_a_task_whose_image_cannot_be_fetched_is_skipped_once(worker, labelstudio):
    tasks(labelstudio)[1]["data"]["image"] = f"/data/upload/{PROJECT}/missing.png"
    worker.lookahead.list_seconds = 0
    for _ in range(3):
        worker.lookahead.saw(str(PROJECT), tasks(labelstudio)[0]["id"], CONFIG)
        assert worker.lookahead.wait_idle()
    assert worker.lookahead.skipped.labels("fetch")._value.get() == 1
    # The window moved on to task 6 instead.
    assert sorted(set(worker.encoder.order)) == [value(labelstudio, i) for i in (2, 4, 5, 6)]
    get_missing = [p for m, p in labelstudio.requests if p.endswith("missing.png")]
    assert len(get_missing) == 1  # never fetched again


# ------------------------------------------------------------------ budgets


def test_a_spare_in_memory_never_costs_a_recently_used_entry():
    cache = LRUCache(budget_bytes=30, sizeof=len)
    cache.put("clicked", b"x" * 20)
    assert not cache.put_spare("ahead", b"y" * 20, protect_seconds=60)  # would evict a fresh click's entry
    assert "clicked" in cache and "ahead" not in cache
    assert cache.put_spare("small", b"z" * 10, protect_seconds=60)  # room without evicting
    cache.put("next", b"n" * 10)  # a click's entry evicts the spare first
    assert "small" not in cache and "clicked" in cache
    assert cache.put_spare("ahead", b"y" * 20, protect_seconds=0)  # nothing is recent any more
    assert "clicked" not in cache


def test_a_spare_on_disk_never_costs_a_recently_used_entry(tmp_path):
    entry = StoredEmbedding(np.zeros((8, 8, 4), np.float16), (8, 8), (8, 8), 32)
    key = {name: entry_key("f" * 32, name) for name in ("probe", "clicked-1", "clicked-2", "clicked-3", "ahead")}
    probe = DiskStore(tmp_path / "probe", 1 << 30)
    probe.put(key["probe"], entry)
    size = probe.stats().bytes
    store = DiskStore(tmp_path / "store", int(2.5 * size))
    store.put(key["clicked-1"], entry)
    store.put(key["clicked-2"], entry)
    assert not store.put_spare(key["ahead"], entry, protect_seconds=600)
    assert store.get(key["ahead"]) is None and store.stats().entries == 2
    old = time.time() - 3600
    os.utime(store._path(key["clicked-1"]), (old, old))  # used an hour ago
    assert store.put_spare(key["ahead"], entry, protect_seconds=600)
    assert store.get(key["clicked-1"]) is None and store.get(key["clicked-2"]) is not None
    assert os.stat(store._path(key["ahead"])).st_mtime < time.time() - 500  # dated as used 600 s ago
    assert store.put(key["clicked-3"], entry)  # a click's entry evicts the spare before the other click's
    assert store.get(key["clicked-2"]) is not None and store.get(key["ahead"]) is None
