"""The served backend under faults: what breaks around it must cost time, never a click or a prediction.

Most tests start the real server (``python -m sam_backend serve``, gunicorn
with worker processes on loopback), break one thing it depends on while it
runs, and check that clicks are still answered, that the store stays
consistent, and that the log says what happened:

1. a worker killed (SIGKILL) in the middle of an encode;
2. the store's directory becoming unwritable (and, in process, a full disk);
3. Redis stopping (and, in process, Redis hanging);
4. Label Studio refusing or timing out while late predictions are posted
   (timeouts in process: the client's real timeout is a minute);
5. corrupt store entries found after a restart.

Bad inputs (media safety) are covered by their own tests.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import random_image
from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.labelstudio.media import Credentials
from sam_backend.server.app import create_app
from sam_backend.server.jobs import PredictionJobs
from test_gunicorn import free_port
from test_server import LABEL_CONFIG, keypoint, make_backend, predict_body

#: Entries of a disk store, whatever their preset.
ENTRIES = "v1/*/*.npz"


# ---------------------------------------------------------------- the server


class Served:
    """``sam-backend serve`` in its own process group, logging to a file.

    Args:
        preset: the preset directory.
        tmp_path: where its log (``<name>.log``) and ``MODEL_DIR`` go.
        env: extra environment (``SAM_CACHE_URL``, ``LABEL_STUDIO_URL``...).
    """

    def __init__(self, preset, tmp_path: Path, name: str = "server", workers: int = 2, cache_dir=None,
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers_count = workers
        self.log_path = tmp_path / f"{name}.log"
        environment = dict(os.environ, MODEL_DIR=str(tmp_path), LOG_LEVEL="INFO",
                           SAM_MEDIA_ALLOWED_HOSTS="127.0.0.1")
        for variable in ("SAM_CACHE_URL", "SAM_CACHE_DIR", "SAM_DISK_CACHE_MB", "BASIC_AUTH_USER", "BASIC_AUTH_PASS",
                         "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "SAM_PREDICT_BUDGET"):
            environment.pop(variable, None)
        environment.update(env or {})
        command = [sys.executable, "-m", "sam_backend", "serve", "--preset", str(preset), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", str(workers), "--threads", "4"]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment,
                                        start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def workers(self) -> set[int]:
        """The pids of gunicorn's workers (the master's children)."""
        pids = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                # "pid (comm) state ppid ...": the command may hold spaces, the fields after ")" do not.
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.add(int(entry))
        return pids

    def wait_workers(self, count: int, timeout: float = 120) -> set[int]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, self.log
            pids = self.workers()
            if len(pids) == count:
                return pids
            time.sleep(0.1)
        pytest.fail(f"gunicorn did not run {count} worker(s):\n{self.log}")

    def wait_ready(self, timeout: float = 180) -> None:
        """Until every worker has loaded its model (each logs "Warmed up" once)."""
        deadline = time.time() + timeout
        while len(re.findall(r": Warmed up in ", self.log)) < self.workers_count:
            assert self.process.poll() is None, self.log
            if time.time() > deadline:
                pytest.fail(f"the workers did not load in time:\n{self.log}")
            time.sleep(0.2)

    def post(self, body: dict, timeout: float = 120, path: str = "/predict") -> requests.Response:
        """POST, retrying while a worker loads (503) or the server starts (refused connection)."""
        deadline = time.time() + timeout
        while True:
            try:
                response = requests.post(self.url + path, json=body, timeout=timeout)
                if response.status_code != 503:
                    return response
            except requests.ConnectionError:
                pass
            if time.time() > deadline or self.process.poll() is not None:
                pytest.fail(f"the server did not answer {path} in time:\n{self.log}")
            time.sleep(0.2)

    def click(self, url: str, task_id: int = 7, timeout: float = 120) -> dict:
        """One smart keypoint on the task's image; its prediction, which must hold a mask."""
        response = self.post(predict_body(url, [keypoint(25, 50)], task_id=task_id), timeout=timeout)
        assert response.status_code == 200, (response.status_code, response.text[:500], self.log)
        prediction = response.json()["results"][0]
        assert prediction["result"] and prediction["result"][0]["type"] == "brushlabels"
        return prediction

    def stop(self) -> str:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self._log.close()
        return self.log


@pytest.fixture()
def serve(tmp_path):
    """``serve(preset, ...)`` starts a :class:`Served`; every one is stopped at the end."""
    started = []

    def start(preset, **kwargs) -> Served:
        server = Served(preset, tmp_path, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def encodes_by_worker(log: str, url: str) -> dict[int, int]:
    """``{pid: encodes of url}`` from the log's "Encoded <image key>" lines (the key starts with the URL)."""
    counts: dict[int, int] = {}
    for pid in re.findall(r"\[(\d+)\] \[INFO\] [\w.]+: Encoded " + re.escape(url) + r"\b", log):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def save_images(media, rng, *names: str) -> list[str]:
    """Random images on the media server; their URLs."""
    for name in names:
        Image.fromarray(random_image(rng, 90, 200)).save(media.root / name)
    return [f"{media.url}/{name}" for name in names]


# ------------------------------------------------ 1. a worker killed mid-encode


@pytest.fixture(scope="module")
def slow_preset_dir(tmp_path_factory):
    """A random SAM whose encoder takes a second or more on two CPU cores (1024 px input, global attention)."""
    from sam_backend.sam.architectures import SamArchitecture, build_sam

    slow = SamArchitecture(
        input_size=1024, encoder_width=256, encoder_depth=4, encoder_heads=4, encoder_mlp=256,
        window_size=8, global_layers=(0, 1, 2, 3), embed_dim=8, decoder_heads=2, decoder_mlp=16,
    )
    path = tmp_path_factory.mktemp("presets") / "slow_sam"
    build_sam(slow).save_to_preset(str(path))
    return path


def lock_holders(lock_dir: Path) -> set[int]:
    """Pids holding an ``flock`` on a file of ``lock_dir`` (from ``/proc/locks``)."""
    inodes = set()
    for file in lock_dir.glob("*.lock"):
        try:
            inodes.add(file.stat().st_ino)
        except FileNotFoundError:
            pass
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters are marked "->" and have one more field.
        if "FLOCK" in fields and "->" not in fields:
            at = fields.index("FLOCK")
            pid, device_inode = int(fields[at + 3]), fields[at + 4]
            if int(device_inode.rsplit(":", 1)[1]) in inodes:
                holders.add(pid)
    return holders


def test_a_worker_killed_mid_encode_is_replaced_and_the_image_encoded_once(
        serve, slow_preset_dir, tmp_path, media, rng):
    (url,) = save_images(media, rng, "big.png")
    cache_dir = tmp_path / "embeddings"
    server = serve(slow_preset_dir, cache_dir=cache_dir)
    workers = server.wait_workers(2)
    server.wait_ready()  # so that the clicks below meet no 503 and really overlap
    for index, warm in enumerate(save_images(media, rng, "warm1.png", "warm2.png", "warm3.png")):
        server.click(warm, task_id=100 + index)  # the workers' first clicks, out of the way

    # Clicks at once on a new image: one worker takes the image's lock and
    # encodes; the other's clicks (if any reach it) wait for that lock.
    with ThreadPoolExecutor(4) as pool:
        clicks = [pool.submit(requests.post, server.url + "/predict",
                              json=predict_body(url, [keypoint(25, 50)]), timeout=120) for _ in range(4)]
        deadline = time.time() + 60
        while not (holders := lock_holders(cache_dir / "locks") & workers):
            assert time.time() < deadline, server.log
            time.sleep(0.02)
        (victim,) = holders
        # The lock is taken right before the encode (a second or more) and
        # released after the entry is written: the kill lands inside.
        time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        outcomes = []
        for future in clicks:
            try:
                outcomes.append(future.result().status_code)
            except requests.ConnectionError:  # the click was on the killed worker
                outcomes.append("dropped")
    assert encodes_by_worker(server.log, url).get(victim, 0) == 0, "the kill came after the encode"
    assert "dropped" in outcomes and set(outcomes) <= {200, "dropped"}, outcomes

    # Gunicorn replaces the worker; the kernel released its lock with it.
    replaced = server.wait_workers(2, timeout=60)
    assert victim not in replaced and len(replaced - workers) == 1
    assert victim not in lock_holders(cache_dir / "locks")

    server.click(url)
    assert time.time() - killed_at < 60  # nobody waited for the dead worker's lock (it times out after 600 s)
    log = server.stop()
    assert sum(encodes_by_worker(log, url).values()) == 1, log  # the image was encoded once after the kill
    store = DiskStore(cache_dir, 1 << 30)
    assert store.stats().entries == 1 + 3  # the image and the three warm-ups, each complete
    assert not list(cache_dir.rglob("*.tmp")), "a partial entry was left"
    assert "Booting worker" in log


# ------------------------------------------- 2. the store becomes unwritable


def test_an_unwritable_store_mid_run_costs_the_store_not_the_clicks(serve, tiny_preset_dir, tmp_path, media, rng):
    before, after, later = save_images(media, rng, "before.png", "after.png", "later.png")
    cache_dir = tmp_path / "embeddings"
    server = serve(tiny_preset_dir, cache_dir=cache_dir)
    server.click(before)
    (entry,) = cache_dir.glob(ENTRIES)

    # Root ignores permissions: the preset's directory becomes a file, which no write can go into.
    preset_dir = entry.parent
    shutil.rmtree(preset_dir)
    preset_dir.write_text("not a directory")
    for _ in range(4):
        server.click(after)
    server.click(before)  # lost with the store: memory, or an encode, never an error
    log = server.log
    assert "Cannot write to the embedding store" in log and "serving from memory" in log, log
    # Each worker encoded the new image at most once: repeated clicks came from its memory.
    assert set(encodes_by_worker(log, after).values()) == {1}, log

    preset_dir.unlink()  # the disk is fixed: entries are written again
    server.click(later)
    assert [p.parent == preset_dir for p in cache_dir.glob(ENTRIES)] == [True]
    assert server.process.poll() is None


def test_a_full_disk_costs_the_store_not_the_clicks(engine, tmp_path, media, rng, monkeypatch, caplog):
    before, after, later = save_images(media, rng, "before.png", "after.png", "later.png")
    store = DiskStore(tmp_path / "embeddings", 1 << 30)
    client = create_app(make_backend(engine, tmp_path, store=store)).test_client()

    def post(url):
        response = client.post("/predict", json=predict_body(url, [keypoint(25, 50)]))
        assert response.status_code == 200 and response.get_json()["results"][0]["result"], response.get_json()

    post(before)
    real_fdopen = os.fdopen

    class FullDisk:
        """A file on a full disk: the write fails with ENOSPC."""

        def __init__(self, fp):
            self.fp = fp

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fp.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *args, **kwargs):
        fp = real_fdopen(fd, *args, **kwargs)
        in_store = os.readlink(f"/proc/self/fd/{fd}").startswith(str(store.root))
        return FullDisk(fp) if in_store else fp

    monkeypatch.setattr(os, "fdopen", fdopen)
    for _ in range(3):
        post(after)
    post(before)
    assert engine.encoder_calls == 2  # one encode per image; the rest came from memory
    assert "disk full?" in caplog.text and "serving from memory" in caplog.text
    assert not list(store.root.rglob("*.tmp")), "the failed write left its temp file"
    assert store.stats().entries == 1

    monkeypatch.setattr(os, "fdopen", real_fdopen)  # space is freed
    post(later)
    assert store.stats().entries == 2


# ------------------------------------------------------------- 3. Redis stops


def test_redis_stopping_mid_run_costs_encodes_not_clicks(serve, tiny_preset_dir, tmp_path, media, rng):
    redis = pytest.importorskip("redis", reason="the redis client is installed with sam-backend[test]")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    from test_redis_store import RedisServer

    first, second = save_images(media, rng, "first.png", "second.png")
    redis_server = RedisServer(tmp_path)
    try:
        server = serve(tiny_preset_dir, env={"SAM_CACHE_URL": redis_server.url})
        server.click(first)
        client = redis.Redis(port=redis_server.port)
        assert [k for k in client.keys("sam:v1:*") if b":lock:" not in k], "the embedding did not reach Redis"
    finally:
        redis_server.stop()

    for url in (second, second, first):
        started = time.time()
        server.click(url)
        assert time.time() - started < 15  # a refused connection fails fast
    log = server.log
    assert re.search(r"Redis at \S+ failed to (read|lock|write)", log) and "encoding instead" in log, log
    assert server.process.poll() is None


def test_a_hung_redis_costs_one_timeout_then_is_left_alone(tmp_path, monkeypatch, caplog):
    """A Redis that accepts connections but never answers (SIGSTOP: a frozen host, a full network buffer)."""
    pytest.importorskip("redis", reason="the redis client is installed with sam-backend[test]")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    from sam_backend.embeddings import redis_store
    from sam_backend.embeddings.store import StoredEmbedding
    from test_redis_store import RedisServer

    monkeypatch.setattr(redis_store, "SOCKET_TIMEOUT", 0.5)
    monkeypatch.setattr(redis_store, "RETRY_SECONDS", 2.0)
    server = RedisServer(tmp_path)
    try:
        store = redis_store.RedisStore.from_url(server.url)
        key = "ab12cd34ef56ab78/" + "0" * 40
        entry = StoredEmbedding(np.zeros((4, 4, 8), np.float16), (90, 200), (58, 128), 128)
        assert store.put(key, entry)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert store.get(key) is None  # one timeout: a miss, the caller encodes
            assert time.monotonic() - started < 2
            started = time.monotonic()
            store.touch(key)
            assert store.get(key) is None and not store.put(key, entry)
            with store.lock(key):
                pass
            assert time.monotonic() - started < 0.2, "Redis was asked again while it hangs"
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        time.sleep(2.0)
        assert store.get(key) is not None  # asked again after the pause, and back
        assert caplog.text.count("failed to read") == 1 and "trying Redis again in 2s" in caplog.text
    finally:
        server.stop()


# ------------------------------------ 4. Label Studio refuses late predictions


@pytest.fixture()
def labelstudio(tmp_path):
    from fake_labelstudio import FakeLabelStudio
    from test_prelabel_server import SIZE, scene_with, disc_at, box_at, RED, BLUE

    scene = scene_with(SIZE, [disc_at(SIZE, 0.3, 0.4, color=RED), box_at(SIZE, 0.72, 0.6, color=BLUE)])
    files = tmp_path / "files"
    (files / "1").mkdir(parents=True)
    Image.fromarray(scene.image).save(files / "1" / "shapes.png")
    fake = FakeLabelStudio(files, label_config=LABEL_CONFIG)
    fake.scene = scene
    yield fake
    fake.close()


def boxed_task(fake) -> dict:
    """A task with a detector's box among its predictions, as Label Studio sends it to ``/predict``."""
    from test_prelabel_server import detector_task

    return detector_task(fake, fake.scene, 0)


def batch_body(tasks) -> dict:
    return {"tasks": tasks, "project": "1.1795260000", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": None}}


def wait_for(condition, timeout: float, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what or condition}")


def ours(fake) -> list[dict]:
    return [p for p in fake.predictions(1) if p.get("model_version", "").startswith("tiny_sam@")]


def late_server(serve, preset, fake) -> Served:
    # One worker: a kept prediction lives in the memory of the worker that computed it.
    return serve(preset, workers=1, env={"LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": fake.token,
                                         "SAM_PREDICT_BUDGET": "0"})


def test_late_predictions_are_retried_with_backoff_while_label_studio_refuses(serve, tiny_preset_dir, labelstudio):
    server = late_server(serve, tiny_preset_dir, labelstudio)
    tasks = [boxed_task(labelstudio) for _ in range(2)]
    labelstudio.fail_imports = 3  # 503 three times, then Label Studio is back
    assert server.post(batch_body(tasks)).json()["results"] == [[], []]  # a budget of 0 s: both go on later
    wait_for(lambda: len(ours(labelstudio)) == 2, 60, "both predictions posted")
    assert sorted(p["task"] for p in ours(labelstudio)) == sorted(t["id"] for t in tasks)
    imports = [at for (method, path), at in zip(labelstudio.requests, labelstudio.times)
               if method == "POST" and path.endswith("/import/predictions")]
    assert len(imports) == 3 + 2
    gaps = np.diff(imports[:4])
    assert gaps[0] > 0.5 and gaps[1] > 1.5 * gaps[0] and gaps[2] > 1.5 * gaps[1], gaps  # exponential backoff
    assert "could not be delivered" not in server.log


def test_late_predictions_are_kept_and_logged_while_label_studio_is_down(serve, tiny_preset_dir, labelstudio):
    server = late_server(serve, tiny_preset_dir, labelstudio)
    first, second = boxed_task(labelstudio), boxed_task(labelstudio)
    labelstudio.fail_imports = 10**6  # Label Studio answers 503 to every import
    assert server.post(batch_body([first])).json()["results"] == [[]]
    wait_for(lambda: f"Task {first['id']}: 1 mask(s)" in server.log, 30, "the first task computed")
    # While the first one's delivery backs off, a second batch is still computed at once,
    assert server.post(batch_body([second])).json()["results"] == [[]]
    wait_for(lambda: f"Task {second['id']}: 1 mask(s)" in server.log, 10, "the second task computed")
    # and, waiting for its turn to be posted, it answers the next request for it.
    (answered,) = server.post(batch_body([second])).json()["results"]
    assert len(answered["result"]) == 1, answered
    assert "could not be delivered" not in server.log, "the first delivery gave up too soon"

    wait_for(lambda: "could not be delivered" in server.log, 90, "the first delivery to give up")
    (line,) = [line for line in server.log.splitlines() if "could not be delivered" in line]
    assert "[ERROR]" in line and f"task(s) {first['id']})" in line, line
    imports = lambda: [r for r in labelstudio.requests if r[0] == "POST" and r[1].endswith("/import/predictions")]
    attempts = len(imports())
    assert attempts >= 6  # the first and five retries

    # The first is answered by the next request for it, without computing it again.
    (kept,) = server.post(batch_body([first])).json()["results"]
    assert len(kept["result"]) == 1, kept
    time.sleep(1)
    assert len(imports()) == attempts, "the second one, answered already, was posted too"
    log = server.log
    assert log.count(f"Task {first['id']}: 1 mask(s)") == log.count(f"Task {second['id']}: 1 mask(s)") == 1, log
    assert not ours(labelstudio)


def test_late_predictions_are_kept_when_label_studio_times_out(engine, tmp_path, labelstudio, monkeypatch, caplog):
    from sam_backend.labelstudio.api import LabelStudioProject

    monkeypatch.setattr("sam_backend.server.backend.LabelStudioProject",
                        functools.partial(LabelStudioProject, retries=2, timeout=0.5))
    backend = make_backend(engine, tmp_path, credentials=Credentials(labelstudio.url, labelstudio.token))
    backend.predict_budget = 0.0
    client = create_app(backend).test_client()
    task = boxed_task(labelstudio)
    labelstudio.hang_imports = 3.0  # longer than the client waits
    assert client.post("/predict", json=batch_body([task])).get_json()["results"] == [[]]
    wait_for(lambda: "could not be delivered" in caplog.text, 60, "the delivery to give up")
    assert f"task(s) {task['id']})" in caplog.text and "did not answer in time" in caplog.text, caplog.text
    attempts = [r for r in labelstudio.requests if r[0] == "POST" and r[1].endswith("/import/predictions")]
    assert len(attempts) == 3  # the first and two retries
    labelstudio.hang_imports = 0
    (prediction,) = client.post("/predict", json=batch_body([task])).get_json()["results"]
    assert len(prediction["result"]) == 1


def test_a_delivery_that_backs_off_does_not_hold_up_computing():
    jobs = PredictionJobs()
    released = threading.Event()
    delivered = []

    def slow_delivery(prediction):  # Label Studio refusing, the client backing off
        released.wait(30)
        delivered.append(prediction)

    [late] = jobs.run([("t1", lambda: time.sleep(0.2) or {"result": ["t1"]}, slow_delivery)], budget=0)
    assert late.pending
    time.sleep(0.5)  # t1 is computed and its delivery started
    started = time.monotonic()
    [next_one] = jobs.run([("t2", lambda: {"result": ["t2"]}, slow_delivery)], budget=5)
    assert next_one.prediction == {"result": ["t2"]} and time.monotonic() - started < 2
    assert jobs.pending == 1  # t1's delivery
    released.set()
    wait_for(lambda: jobs.pending == 0, 10, "the delivery")
    assert delivered == [{"result": ["t1"]}]


# -------------------------------------------- 5. a corrupt entry after a restart


def test_corrupt_entries_are_encoded_again_and_rewritten(serve, tiny_preset_dir, tmp_path, media, rng):
    from sam_backend.embeddings.store import decode_entry

    # Damage found after a restart: a write cut short, a file emptied by a full
    # disk or a crash before fsync, bytes changed by a bad copy.
    damages = {
        "truncated": lambda good: good[: len(good) // 2],
        "empty": lambda good: b"",
        "garbage": lambda good: good[:100] + bytes(len(good) - 100),
    }
    urls = save_images(media, rng, *(f"{name}.png" for name in damages))
    cache_dir = tmp_path / "embeddings"
    server = serve(tiny_preset_dir, cache_dir=cache_dir, name="first")
    scores, entries = [], []
    for url in urls:
        before = set(cache_dir.glob(ENTRIES))
        scores.append(server.click(url)["score"])
        (entry,) = set(cache_dir.glob(ENTRIES)) - before
        entries.append(entry)
    server.stop()
    good = [entry.read_bytes() for entry in entries]
    for entry, damage, data in zip(entries, damages.values(), good):
        entry.write_bytes(damage(data))

    server = serve(tiny_preset_dir, cache_dir=cache_dir, name="second")
    for url, score in zip(urls, scores):
        assert server.click(url)["score"] == pytest.approx(score, abs=1e-6)
    log = server.stop()
    assert log.count("Dropping the stored embedding") == len(damages), log
    for url, entry, data in zip(urls, entries, good):
        assert sum(encodes_by_worker(log, url).values()) == 1, log
        # Rewritten whole: the same embedding as the first run's.
        rewritten, original = decode_entry(entry.read_bytes()), decode_entry(data)
        assert rewritten.original_size == original.original_size == (90, 200)
        np.testing.assert_array_equal(rewritten.features, original.features)
    assert DiskStore(cache_dir, 1 << 30).stats().entries == len(damages)
    assert not list(cache_dir.rglob("*.tmp"))
