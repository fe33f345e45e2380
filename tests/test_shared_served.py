"""Every gunicorn worker answers alike: /setup, refinement and /metrics are shared by the workers.

A real ``sam-backend serve --workers 2`` on loopback, with its shared state on
disk (next to the embedding store) or in a real redis-server. The server's
log says which worker (pid) answered each task, so the tests know that both
workers served and that a click was refined by the other worker's logits.
"""

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import random_image
from sam_backend.embeddings.disk_store import DiskStore
from sam_backend.sam.engine import SamEngine
from sam_backend.server.app import create_app
from test_gunicorn import free_port
from test_server import LABEL_CONFIG, decode_brush, keypoint, make_backend, predict_body

#: A brush and polygons on one image: the project's extra params choose polygons.
BOTH_CONFIG = LABEL_CONFIG.replace(
    "</View>", '<PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels></View>')
TASK_LINE = re.compile(r"\[(\d+)\] \[INFO\] sam_backend\.server\.backend: Task (\d+): (.*)")


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log_path: str
    cache_dir: object
    tmp_dir: object
    kind: str
    predicts: int = 0  # every POST /predict sent, answered or not

    def log(self) -> str:
        with open(self.log_path) as fp:
            return fp.read()

    def task_lines(self) -> dict[int, tuple[int, str]]:
        """Task id -> (pid of the worker that answered it, the rest of the log line)."""
        return {int(task): (int(pid), rest) for pid, task, rest in TASK_LINE.findall(self.log())}

    def post(self, path, body, deadline):
        """POST, retrying while the server starts (refused connection) or a worker loads (503)."""
        while True:
            try:
                if path == "/predict":
                    self.predicts += 1
                response = requests.post(self.url + path, json=body, timeout=60)
                if response.status_code != 503:
                    return response
            except requests.ConnectionError:
                if path == "/predict":
                    self.predicts -= 1  # never reached a worker
            assert self.process.poll() is None, self.log()
            if time.time() > deadline:
                pytest.fail(f"the server did not answer {path} in time:\n{self.log()}")
            time.sleep(0.3)


@pytest.fixture(params=["disk", "redis"])
def served(request, tiny_preset_dir, tmp_path):
    env = dict(os.environ, MODEL_DIR=str(tmp_path), LOG_LEVEL="INFO", SAM_MEDIA_ALLOWED_HOSTS="127.0.0.1",
               TMPDIR=str(tmp_path / "tmp"))
    for variable in ("SAM_CACHE_URL", "SAM_CACHE_DIR", "SAM_DISK_CACHE_MB", "SAM_REFINE_SECONDS", "BASIC_AUTH_USER",
                     "BASIC_AUTH_PASS", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        env.pop(variable, None)
    (tmp_path / "tmp").mkdir()
    if request.param == "redis":
        env["SAM_CACHE_URL"] = request.getfixturevalue("redis_url")
    port = free_port()
    log_path = tmp_path / "server.log"
    cache_dir = tmp_path / "embeddings"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sam_backend", "serve", "--preset", str(tiny_preset_dir), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "2", "--threads", "4", "--cache-dir", str(cache_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    server = Served(f"http://127.0.0.1:{port}", process, str(log_path), cache_dir, tmp_path / "tmp", request.param)
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # the test may have stopped it already
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def metric(text, name):
    (row,) = [row for row in text.splitlines() if row.startswith(name + " ")]
    return float(row.split()[-1])


def reference_clicks(tiny_segmenter, tmp_path, media_url, clicks):
    """What one process answers to the click sequence: (refined answers, answers without refinement)."""
    def backend():
        engine = SamEngine(tiny_segmenter, preset="tiny")
        # A store, as the server has: embeddings are rounded to float16 alike.
        return make_backend(engine, tmp_path, store=DiskStore(tmp_path / "reference-store", 1 << 30))

    client = create_app(backend()).test_client()
    refined = [client.post("/predict", json=predict_body(media_url, regions)).get_json()["results"][0]
               for regions in clicks]
    plain = [create_app(backend()).test_client().post("/predict", json=predict_body(media_url, regions))
             .get_json()["results"][0] for regions in clicks]
    return refined, plain


def test_every_worker_answers_alike(served, media, rng, tiny_segmenter, tmp_path):
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    image_url = media.url + "/img.png"
    deadline = time.time() + 300

    # /setup reaches one worker; Label Studio sends the extra params only there.
    setup = {"project": "5.1795260000", "schema": BOTH_CONFIG, "hostname": "http://127.0.0.1:8080",
             "access_token": "token-of-project-5", "extra_params": '{"output": "polygon"}'}
    assert served.post("/setup", setup, deadline).status_code == 200

    # Clicks without a label config, spread over both workers: all use the setup's config and output.
    next_task = iter(range(500, 10_000))

    def click_project_5(_):
        body = predict_body(image_url, [keypoint(25, 50)], label_config=None, task_id=next(next_task))
        body["project"] = "5.1795260000"
        return served.post("/predict", body, deadline)

    answered = []
    with ThreadPoolExecutor(6) as pool:
        for _ in range(20):  # until both workers have answered some
            responses = list(pool.map(click_project_5, range(6)))
            assert all(r.status_code == 200 for r in responses), [(r.status_code, r.text[:300]) for r in responses]
            for response in responses:
                regions = response.json()["results"][0]["result"]
                assert regions and {region["type"] for region in regions} == {"polygonlabels"}, regions
            answered += responses
            if len({pid for task, (pid, _) in served.task_lines().items() if task >= 500}) == 2:
                break
        else:
            pytest.fail("one worker answered every click:\n" + served.log())

    # A click sequence, each click extending the previous one, answered by whichever worker.
    clicks = [[keypoint(25, 50)], [keypoint(25, 50), keypoint(60, 20, positive=False)],
              [keypoint(25, 50), keypoint(60, 20, positive=False), keypoint(80, 70)],
              [keypoint(25, 50), keypoint(60, 20, positive=False), keypoint(80, 70), keypoint(10, 30)]]
    refined, plain = reference_clicks(tiny_segmenter, tmp_path, image_url, clicks)
    across = 0
    for round_ in range(12):
        # The same pixels under a new URL: a new image to the workers, so no worker remembers an earlier round.
        shutil.copy(media.root / "img.png", media.root / f"img-{round_}.png")
        tasks = []
        for regions in clicks:
            task = 100 * (round_ + 1) + len(tasks) + 10_000
            body = predict_body(f"{media.url}/img-{round_}.png", regions, task_id=task)
            response = served.post("/predict", body, deadline)
            assert response.status_code == 200, response.text
            answer = response.json()["results"][0]
            tasks.append((task, answer))
        lines = served.task_lines()
        pids = [lines[task][0] for task, _ in tasks]
        for n, ((task, answer), expected, unrefined) in enumerate(zip(tasks, refined, plain)):
            assert (", refined" in lines[task][1]) == (n > 0), lines[task]
            assert answer["score"] == pytest.approx(expected["score"], abs=1e-4)
            if n > 0:  # the reference would not tell a missed refinement from a found one otherwise
                assert abs(expected["score"] - unrefined["score"]) > 1e-3
            served_mask, expected_mask = decode_brush(answer["result"][0]), decode_brush(expected["result"][0])
            assert np.mean(served_mask != expected_mask) < 0.005
        across += sum(a != b for a, b in zip(pids, pids[1:]))
        if across >= 2:
            break
    else:
        pytest.fail("no click was refined by the other worker's logits:\n" + served.log())

    # Any worker's /metrics counts every worker's requests.
    clicks_answered = len(answered) + 4 * (round_ + 1)
    for _ in range(6):
        # Gauges are each worker's last refresh (every second); on a loaded machine give them a few.
        for _ in range(20):
            text = requests.get(served.url + "/metrics", timeout=10).text
            if metric(text, "sam_model_loaded") == 1 and metric(text, "sam_images_in_flight") == 0:
                break
            time.sleep(0.5)
        assert metric(text, 'sam_requests_total{endpoint="predict"}') == served.predicts, text
        assert metric(text, "sam_decode_seconds_count") == clicks_answered
        assert metric(text, 'sam_requests_total{endpoint="setup"}') == 1
        assert metric(text, "sam_model_loaded") == 1, served.log()
        assert metric(text, "sam_images_in_flight") == 0
        assert metric(text, 'sam_encode_queue_length{priority="click"}') == 0

    # Tokens on disk are for the backend's user only.
    if served.kind == "disk":
        shared = served.cache_dir / "shared"
        (entry,) = (shared / "projects").iterdir()
        assert b"token-of-project-5" in entry.read_bytes()
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
        assert stat.S_IMODE(shared.stat().st_mode) == stat.S_IMODE((shared / "projects").stat().st_mode) == 0o700
    else:
        assert not (served.cache_dir / "shared").exists()

    # The workers' metric files live in a temp dir of this server start, removed when it stops.
    assert [p.name for p in served.tmp_dir.iterdir() if p.name.startswith("sam-backend-metrics-")]
    os.killpg(served.process.pid, signal.SIGTERM)
    served.process.wait(30)
    assert not [p.name for p in served.tmp_dir.iterdir() if p.name.startswith("sam-backend-metrics-")]


def test_each_server_start_gets_empty_metric_files(tmp_path, monkeypatch):
    from sam_backend import gunicorn_conf

    chosen = tmp_path / "metrics"
    chosen.mkdir()
    (chosen / "counter_123.db").write_bytes(b"a previous server's counts")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(chosen))
    gunicorn_conf.on_starting(None)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(chosen) and not list(chosen.iterdir())
    gunicorn_conf.on_exit(None)
    assert chosen.is_dir()  # the user's directory stays

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    gunicorn_conf.on_starting(None)
    fresh = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert os.path.dirname(fresh) == str(tmp_path) and os.path.isdir(fresh)
    gunicorn_conf.on_exit(None)
    assert not os.path.exists(fresh)
