"""The embedding store under gunicorn: two workers share it, and it outlives the server."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from conftest import random_image
from test_gunicorn import free_port
from test_server import keypoint, predict_body


def start_server(preset_dir, tmp_path, cache_dir, name):
    port = free_port()
    log = open(tmp_path / f"{name}.log", "w+")
    env = dict(os.environ, MODEL_DIR=str(tmp_path), LOG_LEVEL="INFO")
    for variable in ("SAM_CACHE_URL", "SAM_CACHE_DIR", "SAM_DISK_CACHE_MB", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(variable, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "sam_backend", "serve", "--preset", str(preset_dir), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2", "--threads", "4", "--cache-dir", str(cache_dir)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    return f"http://127.0.0.1:{port}", process, log


def stop_server(process, log):
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)
    log.flush()
    return open(log.name).read()


def click(url, body, deadline):
    """POST /predict, retrying while a worker is still loading (503) or the server starts."""
    while True:
        try:
            response = requests.post(url + "/predict", json=body, timeout=60)
            if response.status_code != 503:
                return response
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            pytest.fail("the server did not answer /predict in time")
        time.sleep(0.3)


def test_workers_share_the_store_and_it_outlives_the_server(tiny_preset_dir, tmp_path, media, rng):
    Image.fromarray(random_image(rng, 90, 200)).save(media.root / "img.png")
    body = predict_body(media.url + "/img.png", [keypoint(25, 50)])
    cache_dir = tmp_path / "embeddings"

    url, process, log = start_server(tiny_preset_dir, tmp_path, cache_dir, "first")
    try:
        deadline = time.time() + 240
        with ThreadPoolExecutor(8) as pool:  # clicks at once, spread over both workers
            responses = list(pool.map(lambda _: click(url, body, deadline), range(8)))
        assert all(r.status_code == 200 and r.json()["results"][0]["result"] for r in responses), [
            (r.status_code, r.text[:300]) for r in responses]
        # The worker that encoded and the one that read the store give the same mask.
        assert len({r.json()["results"][0]["score"] for r in responses}) == 1
    finally:
        first_log = stop_server(process, log)
    assert first_log.count("Encoded ") == 1, first_log  # one encode for both workers
    assert len(list((cache_dir / "v1").rglob("*.npz"))) == 1

    url, process, log = start_server(tiny_preset_dir, tmp_path, cache_dir, "second")
    try:
        deadline = time.time() + 240
        for _ in range(3):
            response = click(url, body, deadline)
            assert response.status_code == 200 and response.json()["results"][0]["result"]
    finally:
        second_log = stop_server(process, log)
    assert "Encoded " not in second_log and "Loaded the embedding" in second_log, second_log
