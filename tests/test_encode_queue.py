"""The encode queue: one encode at a time on a CPU, clicks first, each image once, batches on a GPU.

The tiny model's encoder is replaced by one that records which images it gets
(each test image is filled with one value, which survives preprocessing as
``value / 255``), how many run at once, and that can be held on an event.
"""

import logging
import threading
import time

import numpy as np
import pytest

from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.embeddings.encode_queue import EncodeQueue, EncodeSkipped, Priority
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.sam.engine import SamEngine


def image(value: int) -> np.ndarray:
    return np.full((90, 200, 3), value, np.uint8)


class FakeEncoder:
    """Wraps the real encoder: records calls (image values per call), concurrency, and holds on a gate."""

    def __init__(self, engine: SamEngine, hold: int | None = None, fail: int | None = None, sleep: float = 0.0):
        self.real = engine._encoder
        self.hold, self.fail, self.sleep = hold, fail, sleep
        self.gate = threading.Event()
        self.started = threading.Event()  # the held image's encode has begun
        self.calls: list[list[int]] = []
        self.running = self.most = 0
        self._lock = threading.Lock()
        engine._encoder = self

    def __call__(self, x):
        values = [round(float(x[i, 0, 0, 0]) * 255) for i in range(x.shape[0])]
        with self._lock:
            self.calls.append(values)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.hold in values:
                self.started.set()
                assert self.gate.wait(30), "the test never released the held encode"
            time.sleep(self.sleep)
            if self.fail in values:
                raise RuntimeError(f"encoder failure on image {self.fail}")
            return self.real(x)
        finally:
            with self._lock:
                self.running -= 1

    @property
    def order(self) -> list[int]:
        return [value for call in self.calls for value in call]


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Caller(threading.Thread):
    """``tiers.embedding_for(key, image, priority)`` on a thread; keeps the result or the error."""

    def __init__(self, tiers: EmbeddingTiers, key, img, priority: Priority = Priority.CLICK):
        super().__init__(daemon=True)
        self.tiers, self.key, self.img, self.priority = tiers, key, img, priority
        self.result = self.error = None
        self.finished_at = None
        self.start()

    def run(self):
        try:
            self.result = self.tiers.embedding_for(self.key, self.img, priority=self.priority)
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    def get(self, timeout: float = 30):
        self.join(timeout)
        assert not self.is_alive(), f"{self.key} never finished"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture()
def tiers(tiny_segmenter):
    tiers = EmbeddingTiers(SamEngine(tiny_segmenter, preset="tiny"))
    yield tiers
    tiers.queue.close()


def busy_worker(tiers, value: int = 0, **kwargs) -> tuple[FakeEncoder, Caller]:
    """Hold the worker in the encode of image ``value`` (released by ``fake.gate.set()``)."""
    fake = FakeEncoder(tiers.engine, hold=value, **kwargs)
    busy = Caller(tiers, f"busy-{value}", image(value))
    assert fake.started.wait(10)
    return fake, busy


def test_a_cached_click_does_not_wait_for_another_images_encode(tiers):
    cached = tiers.embedding_for("cached", image(200))
    fake, busy = busy_worker(tiers)
    started = time.monotonic()
    embedding = tiers.embedding_for("cached", lambda: pytest.fail("a cached image is not loaded"))
    prediction = tiers.engine.decode(embedding, points=[[50, 45]], labels=[1])
    assert embedding is cached and prediction.mask.shape == (90, 200)
    assert time.monotonic() - started < 5 and busy.is_alive()  # the other encode is still held
    assert tiers.engine.stats.in_flight._value.get() == 1
    fake.gate.set()
    busy.get()
    assert tiers.engine.stats.in_flight._value.get() == 0


def test_encodes_run_one_at_a_time_on_a_cpu(tiers):
    fake = FakeEncoder(tiers.engine, sleep=0.2)
    start = threading.Barrier(4)

    def ask(value):
        start.wait(10)
        tiers.embedding_for(f"img-{value}", image(value))

    threads = [threading.Thread(target=ask, args=(value,)) for value in (10, 20, 30, 40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(fake.order) == [10, 20, 30, 40] and len(tiers.memory) == 4
    assert fake.most == 1 and len(fake.calls) == 4  # one image per call, one call at a time


def test_warm_ups_yield_to_clicks(tiers):
    fake, busy = busy_worker(tiers)
    warm_a = Caller(tiers, "a", image(10), Priority.WARMUP)
    wait_until(lambda: len(tiers.queue) == 1)
    warm_b = Caller(tiers, "b", image(20), Priority.WARMUP)
    wait_until(lambda: len(tiers.queue) == 2)
    click_c = Caller(tiers, "c", image(30))
    wait_until(lambda: len(tiers.queue) == 3)
    (gauge, _) = tiers.queue.collect()
    assert {s.labels["priority"]: s.value for s in gauge.samples} == {"click": 1, "warmup": 2, "background": 0,
                                                                          "lookahead": 0}
    fake.gate.set()
    for caller in (busy, warm_a, warm_b, click_c):
        caller.get()
    assert fake.order == [0, 30, 10, 20]


def test_a_click_on_a_queued_warm_ups_image_goes_with_the_clicks(tiers):
    fake, busy = busy_worker(tiers)
    warm_a = Caller(tiers, "a", image(10), Priority.WARMUP)
    wait_until(lambda: len(tiers.queue) == 1)
    warm_b = Caller(tiers, "b", image(20), Priority.WARMUP)
    wait_until(lambda: len(tiers.queue) == 2)
    click_b = Caller(tiers, "b", image(20))  # the annotator of task b clicked before its warm-up ran
    time.sleep(0.2)
    assert len(tiers.queue) == 2  # joined the warm-up's encode
    fake.gate.set()
    assert click_b.get() is warm_b.get()
    warm_a.get()
    busy.get()
    assert fake.order == [0, 20, 10]


def test_duplicate_requests_for_one_image_encode_once(tiers):
    fake, busy = busy_worker(tiers)
    callers = [Caller(tiers, "same", image(50), priority) for priority in
               (Priority.WARMUP, Priority.CLICK, Priority.BACKGROUND, Priority.CLICK, Priority.CLICK)]
    wait_until(lambda: len(tiers.queue) == 1)
    time.sleep(0.2)
    fake.gate.set()
    results = [caller.get() for caller in callers]
    busy.get()
    assert all(result is results[0] for result in results)
    assert fake.order == [0, 50] and tiers.memory.get("same") is results[0]


def test_a_failing_encode_fails_each_waiter_and_the_queue_goes_on(tiers):
    fake, busy = busy_worker(tiers, fail=0)
    callers = [Caller(tiers, "busy-0", image(0)) for _ in range(3)]  # join the failing encode
    other = Caller(tiers, "other", image(60))
    wait_until(lambda: len(tiers.queue) == 1)
    time.sleep(0.2)
    fake.gate.set()
    for caller in [busy, *callers]:
        with pytest.raises(RuntimeError, match="encoder failure on image 0"):
            caller.get()
    assert other.get().frame.original_size == (90, 200)
    assert "busy-0" not in tiers.memory
    fake.fail = None
    assert tiers.embedding_for("busy-0", image(0)).frame.original_size == (90, 200)  # tried again
    assert tiers.engine.stats.in_flight._value.get() == 0


def test_a_stale_warm_up_is_dropped_when_a_click_comes(tiny_segmenter, caplog):
    engine = SamEngine(tiny_segmenter, preset="tiny")
    tiers = EmbeddingTiers(engine, encode_queue=EncodeQueue(engine, max_warmup_age=0.2))
    fake, busy = busy_worker(tiers)
    warm = Caller(tiers, "a", image(10), Priority.WARMUP)
    wait_until(lambda: len(tiers.queue) == 1)
    time.sleep(0.3)
    with caplog.at_level(logging.INFO):
        click = Caller(tiers, "c", image(30))
        with pytest.raises(EncodeSkipped, match="the first click encodes the image"):
            warm.get()
    fake.gate.set()
    click.get()
    busy.get()
    assert fake.order == [0, 30] and "a" not in tiers.memory
    assert "Dropped the warm-up encode of a" in caplog.text
    (_, skipped) = tiers.queue.collect()
    assert skipped.samples[0].value == 1
    tiers.queue.close()


def test_queued_images_go_to_the_gpu_in_one_call(tiny_segmenter, monkeypatch):
    monkeypatch.delenv("SAM_ENCODE_BATCH", raising=False)
    monkeypatch.setattr(SamEngine, "device_name", property(lambda self: "cuda:0"))
    tiers = EmbeddingTiers(SamEngine(tiny_segmenter, preset="tiny"))
    assert tiers.queue.batch_size == 4
    fake, busy = busy_worker(tiers)
    callers = []
    for n, value in enumerate((10, 20, 30, 40, 50)):
        callers.append(Caller(tiers, f"img-{value}", image(value)))
        wait_until(lambda: len(tiers.queue) == n + 1)
    warm = Caller(tiers, "warm", image(60), Priority.WARMUP)  # another priority: not in the clicks' call
    wait_until(lambda: len(tiers.queue) == 6)
    fake.gate.set()
    for caller in [busy, warm, *callers]:
        assert caller.get().frame.original_size == (90, 200)
    assert fake.calls == [[0], [10, 20, 30, 40], [50], [60]]
    alone = SamEngine(tiny_segmenter, preset="tiny").encode(image(30))
    np.testing.assert_allclose(callers[2].result.features.cpu().numpy(), alone.features.cpu().numpy(), atol=2e-2)
    tiers.queue.close()


def test_a_cpu_encodes_one_image_per_call_unless_told(tiny_segmenter, monkeypatch):
    monkeypatch.delenv("SAM_ENCODE_BATCH", raising=False)
    assert EncodeQueue(SamEngine(tiny_segmenter, preset="tiny")).batch_size == 1
    monkeypatch.setenv("SAM_ENCODE_BATCH", "3")
    assert EncodeQueue(SamEngine(tiny_segmenter, preset="tiny")).batch_size == 3
    monkeypatch.setenv("SAM_ENCODE_BATCH", "many")
    with pytest.raises(ValueError, match="SAM_ENCODE_BATCH"):
        EncodeQueue(SamEngine(tiny_segmenter, preset="tiny"))


def test_the_store_lock_is_not_held_while_queued(tiny_segmenter, tmp_path):
    # Worker 1 has "x" queued behind a held encode; worker 2 (another process, same
    # store) asked for "x" too encodes it at once instead of waiting for worker 1's
    # queue, and worker 1 then finds it in the store.
    first = EmbeddingTiers(SamEngine(tiny_segmenter, preset="tiny"), store=DiskStore(tmp_path, 1 << 30))
    second = EmbeddingTiers(SamEngine(tiny_segmenter, preset="tiny"), store=DiskStore(tmp_path, 1 << 30))
    fake, busy = busy_worker(first)
    queued = Caller(first, "x", image(70))
    wait_until(lambda: len(first.queue) == 1)
    started = time.monotonic()
    assert second.embedding_for("x", image(70)).frame.original_size == (90, 200)
    assert time.monotonic() - started < 10 and queued.is_alive()
    fake.gate.set()
    queued.get()
    busy.get()
    assert fake.order == [0] and second.engine.encoder_calls == 1  # "x" encoded once, by the second worker
    first.queue.close()
    second.queue.close()


# ------------------------------------------------------------- through the server


def test_an_opened_tasks_warm_up_waits_behind_a_click(engine, tmp_path, media):
    from PIL import Image

    from test_server import keypoint, make_backend, predict_body
    from sam_backend.server.app import create_app

    Image.fromarray(image(20)).save(media.root / "opened.png")
    Image.fromarray(image(30)).save(media.root / "clicked.png")
    backend = make_backend(engine, tmp_path)
    app = create_app(backend)
    tiers = backend.holder.embeddings()
    fake, busy = busy_worker(tiers)
    app.test_client().post("/predict", json=predict_body(media.url + "/opened.png", None))
    wait_until(lambda: len(tiers.queue) == 1)  # the warm-up of the opened task
    answers = []
    click = threading.Thread(target=lambda: answers.append(app.test_client().post(
        "/predict", json=predict_body(media.url + "/clicked.png", [keypoint(25, 50)]))))
    click.start()
    wait_until(lambda: len(tiers.queue) == 2)
    scraped = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'sam_encode_queue_length{priority="click"} 1.0' in scraped
    assert 'sam_encode_queue_length{priority="warmup"} 1.0' in scraped
    assert "sam_images_in_flight 1.0" in scraped
    fake.gate.set()
    click.join(30)
    backend._warmup.submit(lambda: None).result(timeout=30)  # the warm-up finished too
    busy.get()
    assert answers[0].status_code == 200 and answers[0].get_json()["results"][0]["result"]
    assert fake.order == [0, 30, 20] and len(tiers.memory) == 3


def test_a_warm_up_that_waited_too_long_for_its_turn_is_skipped(engine, tmp_path, media, caplog):
    from PIL import Image

    from test_server import make_backend, predict_body
    from sam_backend.server.app import create_app

    Image.fromarray(image(40)).save(media.root / "opened.png")
    backend = make_backend(engine, tmp_path)
    backend.holder.embeddings().queue.max_warmup_age = 0.0  # anything is too late
    with caplog.at_level(logging.INFO):
        create_app(backend).test_client().post("/predict", json=predict_body(media.url + "/opened.png", None))
        backend._warmup.submit(lambda: None).result(timeout=30)
    assert "Warm-up of task 7 skipped: it waited" in caplog.text
    assert engine.encoder_calls == 0 and len(backend.holder.embeddings().memory) == 0
