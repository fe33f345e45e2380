"""The backend as users run it: ``python -m sam_backend serve`` (gunicorn) on loopback."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from conftest import random_image
from test_server import decode_brush, keypoint, predict_body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served(tiny_preset_dir, tmp_path):
    port = free_port()
    # The media fixture's loopback server, which this server starts before, must be allowed.
    env = dict(os.environ, MODEL_DIR=str(tmp_path), BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p", LOG_LEVEL="INFO",
               SAM_MEDIA_ALLOWED_HOSTS="127.0.0.1")
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "sam_backend", "serve", "--preset", str(tiny_preset_dir),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--threads", "4"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, process, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()


def wait_ready(url, process, log, timeout=180):
    deadline = time.time() + timeout
    states = set()
    while time.time() < deadline:
        assert process.poll() is None, open(log.name).read()
        try:
            body = requests.get(url + "/health", auth=("u", "p"), timeout=1).json()
            states.add(body["model_state"])
            if body["model_state"] == "ready":
                return states
        except (requests.ConnectionError, requests.Timeout):  # starting, or a loaded machine
            pass
        time.sleep(0.2)
    pytest.fail("the server did not become ready:\n" + open(log.name).read())


def test_gunicorn_serves_masks_with_auth(served, media, rng):
    url, process, log = served
    pixels = random_image(rng, 90, 200)
    Image.fromarray(pixels).save(media.root / "img.png")
    wait_ready(url, process, log)

    assert requests.get(url + "/health", timeout=1).status_code == 401
    started = time.time()
    health = requests.get(url + "/health", auth=("u", "p"), timeout=1)
    assert health.status_code == 200 and time.time() - started < 1.0

    body = predict_body(media.url + "/img.png", [keypoint(25, 50)])
    for _ in range(4):  # both workers (each loaded its own model) answer
        deadline = time.time() + 180
        response = requests.post(url + "/predict", json=body, auth=("u", "p"), timeout=100)
        while response.status_code == 503 and time.time() < deadline:
            # /health answered from one worker; the other may still be loading.
            assert response.headers["Retry-After"]
            time.sleep(0.5)
            response = requests.post(url + "/predict", json=body, auth=("u", "p"), timeout=100)
        assert response.status_code == 200, response.text
        (region,) = response.json()["results"][0]["result"]
        assert decode_brush(region).shape == (90, 200)
    bad = requests.post(url + "/predict", data=b"{", auth=("u", "p"), timeout=10,
                        headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    assert requests.post(url + "/predict", json=body, auth=("u", "p"), timeout=100).status_code == 200
    assert process.poll() is None

    env = dict(os.environ, BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    check = [sys.executable, "-m", "sam_backend", "healthcheck", "--url", url]
    assert subprocess.run(check, env=env, timeout=60).returncode == 0
    assert subprocess.run(check[:-1] + ["http://127.0.0.1:9"], env=env, timeout=60).returncode == 1


def test_unloadable_preset_is_reported_by_a_live_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "sam_backend", "serve", "--preset", str(tmp_path / "missing"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        body = {}
        while time.time() < deadline and body.get("model_state") != "failed":
            try:
                body = requests.get(url + "/health", timeout=1).json()
            except (requests.ConnectionError, requests.Timeout):
                # Not up yet, or a 2-core machine busy importing torch in the loader: ask again.
                time.sleep(0.2)
        assert body.get("model_state") == "failed" and "does not exist" in body["error"]
        response = requests.post(url + "/predict", json=predict_body("http://x/y.png", [keypoint(1, 1)]), timeout=10)
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert "local preset directory" in response.json()["error"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
