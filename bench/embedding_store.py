"""Cold and warm clicks through the served backend, with the persistent embedding store.

Usage: python bench/embedding_store.py [--workers 1 4] [--clicks 8] [--preset-dir DIR] [--device cpu]

For each number of gunicorn workers it starts ``sam-backend serve`` on a
ViT-B SAM (the ``sam_base_sa1b`` architecture with random weights, saved once
as a local preset; the time does not depend on the weights) with an empty
store, and times, from the client, /predict for one click on a 1280x720 image:

- cold: the first click on the image (fetch, encode, decode);
- warm: the clicks after it (from memory in the worker that encoded, from
  the store in a worker that did not);
- restart: the server is stopped and started again on the same store; the
  first click after it reads the embedding from disk, then from memory.

It prints a table and the store's size per image.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>'
)


def click_body(url: str) -> dict:
    region = {"from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": 1280,
              "original_height": 720, "is_positive": True, "value": {"x": 40.0, "y": 55.0, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": LABEL_CONFIG,
            "params": {"context": {"result": [region]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_files(root: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_port}", httpd


def vit_b_preset(path: Path) -> Path:
    """The ViT-B architecture with random weights as a local preset (built once, ~375 MB)."""
    if (path / "config.json").is_file():
        return path
    from architectures import build_segmenter

    print(f"Saving a random-weight sam_base_sa1b preset to {path} (once)...", flush=True)
    build_segmenter("sam_base_sa1b").save_to_preset(str(path))
    return path


class Server:
    """``sam-backend serve`` in a subprocess, with its log in a file."""

    def __init__(self, preset: Path, workers: int, cache_dir: Path, log: Path, device: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = log
        # The benchmark's media server is on loopback, which the backend refuses unless allowed.
        env = dict(os.environ, LOG_LEVEL="INFO", MODEL_DIR=str(cache_dir.parent), SAM_MEDIA_ALLOWED_HOSTS="127.0.0.1")
        if device:
            env["SAM_DEVICE"] = device
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sam_backend", "serve", "--preset", str(preset), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", str(workers), "--threads", "4", "--cache-dir", str(cache_dir)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_loaded(self, timeout: float = 900) -> float:
        """Seconds until every worker logged its model as loaded."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + self.log_path.read_text())
            loaded = len(re.findall(r"Warmed up in [0-9.]+s", self.log_path.read_text()))  # one per ready worker
            if loaded >= self.workers:
                return time.perf_counter() - started
            time.sleep(0.5)
        raise RuntimeError("the workers did not load in time:\n" + self.log_path.read_text())

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(60)
        self.log.close()


def timed_click(url: str, body: dict) -> float:
    started = time.perf_counter()
    response = requests.post(url + "/predict", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or not response.json()["results"][0]["result"]:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:300]}")
    return elapsed


def run(preset: Path, workers: int, clicks: int, work: Path, media_url: str, device: str | None) -> dict:
    cache_dir = work / f"store-{workers}w" / "embeddings"
    body = click_body(f"{media_url}/image-{workers}w.png")
    server = Server(preset, workers, cache_dir, work / f"serve-{workers}w-a.log", device)
    try:
        load = server.wait_loaded()
        cold = timed_click(server.url, body)
        warm = [timed_click(server.url, body) for _ in range(clicks)]
    finally:
        server.stop()
    server = Server(preset, workers, cache_dir, work / f"serve-{workers}w-b.log", device)
    try:
        server.wait_loaded()
        restart = [timed_click(server.url, body) for _ in range(clicks)]
    finally:
        server.stop()
    encodes = server.log_path.read_text().count("Encoded ")
    if encodes:
        raise RuntimeError(f"the restarted server encoded {encodes} time(s); the store did not serve it")
    entries = list(cache_dir.rglob("*.npz"))
    return {"load": load, "cold": cold, "warm": warm, "restart": restart,
            "entry_bytes": sum(p.stat().st_size for p in entries) / max(len(entries), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--clicks", type=int, default=8, help="warm clicks per phase")
    parser.add_argument("--preset-dir", type=Path, default=Path(tempfile.gettempdir()) / "sam-bench-vit-b")
    parser.add_argument("--device", default=None, help="SAM_DEVICE for the server (default: CUDA if present)")
    args = parser.parse_args()

    preset = vit_b_preset(args.preset_dir)
    with tempfile.TemporaryDirectory(prefix="sam-bench-") as tmp:
        work = Path(tmp)
        (work / "media").mkdir()
        rng = np.random.default_rng(0)
        for workers in args.workers:
            pixels = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(work / "media" / f"image-{workers}w.png")
        media_url, httpd = serve_files(work / "media")
        results = {w: run(preset, w, args.clicks, work, media_url, args.device) for w in args.workers}
        httpd.shutdown()

    med = statistics.median
    print(f"\nsam_base_sa1b architecture (ViT-B, random weights), 1280x720 image, one positive point; "
          f"{os.cpu_count()} CPU cores; client-side /predict times")
    print(f"{'workers':>7} {'model load':>11} {'cold click':>11} {'warm median':>12} {'warm max':>9} "
          f"{'1st after restart':>18} {'after restart median':>21} {'cold / warm':>12}")
    for workers, r in results.items():
        warm = med(r["warm"])
        print(f"{workers:>7} {r['load']:>10.1f}s {r['cold'] * 1000:>9.0f}ms {warm * 1000:>10.0f}ms "
              f"{max(r['warm']) * 1000:>7.0f}ms {r['restart'][0] * 1000:>16.0f}ms {med(r['restart'][1:]) * 1000:>19.0f}ms "
              f"{r['cold'] / warm:>11.0f}x")
    print("\nevery click, in order (ms):")
    for workers, r in results.items():
        print(f"  {workers} worker(s): cold {r['cold'] * 1000:.0f} | warm " + " ".join(f"{t * 1000:.0f}" for t in r["warm"])
              + " | after restart " + " ".join(f"{t * 1000:.0f}" for t in r["restart"]))
    sizes = {round(r["entry_bytes"]) for r in results.values()}
    print(f"\nstore size per image: {', '.join(f'{s:,} bytes ({s / 2**20:.2f} MiB)' for s in sizes)}")


if __name__ == "__main__":
    main()
