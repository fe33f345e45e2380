"""Many annotators at once against ``sam-backend serve``: errors, click latency, and memory over time.

Usage: python bench/load.py [--seconds 60] [--annotators 20] [--images 200] [--workers 2]
                            [--preset demo] [--memory-mb 8] [--images-dir DIR]

It starts ``sam-backend serve`` (the ``demo`` preset, 2 gunicorn workers, an
empty embedding store, ``SAM_MEMORY_CACHE_MB`` small so that the memory LRU
has to evict) and a loopback HTTP server with generated images of shapes
(:mod:`sam_backend.sam.synthetic`, 480x640 to 720x1280). Then, for a fixed
time, simulated annotators each take the next task of the project (the 200
tasks in turn, again from the start once all were opened) and do what Label
Studio sends for them, with Label Studio's request bodies:

- opening the task: a ``/predict`` without context for that one task (a
  warm-up: the backend starts encoding its image), for 70% of the tasks;
- 1 to 4 smart keypoints on one shape, each click sending every keypoint so
  far (positive inside the shape, negative outside), with a pause to think;
- and a project manager's "Retrieve predictions" every few seconds: a batch
  ``/predict`` of 6 tasks that carry a detector's box among their predictions.

A click is *cold* when it is the first on an image that nobody opened before
and no warm-up was sent, *after warm-up* when a warm-up was, and *cached*
afterwards (the embedding comes from a worker's memory or from the store).

It prints requests served, errors (there must be none), latency percentiles by
kind, and the server's resident memory (the sum of VmRSS over gunicorn's
master and workers, sampled every 0.5 s): the baseline after the models
loaded, a primed baseline after every server thread served a few clicks at
once on other images (``--no-prime`` skips it), the peak under load, the
mean of the first and last quarter of the run, and the growth over the
second half per new image. Peak minus baseline is the memory caches
(``--memory-mb`` per worker) plus the requests' working memory that the
allocator keeps (each thread's buffers, kernels of each prompt shape...),
which levels off after the first couple of hundred requests; growth per new
image after that is a leak (run with more ``--images`` than the run can open,
so that every second brings new ones). The exit status is 1 when a request
failed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

#: The shared examples' label config (../shared/examples): brush output, smart keypoints and rectangles.
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image"><Label value="Object"/>'
    '</BrushLabels><KeyPointLabels name="keypoint" toName="image" smart="true"><Label value="Object" smart="true"/>'
    '</KeyPointLabels><RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/>'
    "</RectangleLabels></View>"
)
PROJECT = "1.1795260000"
SIZES = ((480, 640), (640, 960), (720, 1280))
BATCH_TASKS = 6
BATCH_EVERY_SECONDS = 5.0


# ------------------------------------------------------------------ images


@dataclass
class TaskImage:
    """A generated image: its URL, size, and for a few shapes a point inside, a point outside and the box."""

    url: str
    width: int
    height: int
    shapes: list[dict]


def generate_images(directory: Path, count: int, seed: int = 11) -> list[dict]:
    """``count`` scenes of shapes as JPEG files in ``directory`` (kept: a second run reuses them)."""
    from sam_backend.sam.synthetic import bounding_box, generate_scene, interior_point

    index = directory / f"index-{seed}-{count}.json"
    if index.is_file():
        return json.loads(index.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        height, width = SIZES[i % len(SIZES)]
        scene = generate_scene(rng, (height, width))
        name = f"scene-{seed}-{i:04d}.jpg"
        Image.fromarray(scene.image).save(directory / name, quality=90)
        shapes = []
        for mask in scene.masks[-3:]:  # the top ones: the most visible
            outside = np.argwhere(~mask)
            y, x = outside[int(rng.integers(len(outside)))]
            shapes.append({"inside": list(interior_point(mask)), "outside": [int(x), int(y)],
                           "box": [float(v) for v in bounding_box(mask)]})
        items.append({"name": name, "width": width, "height": height, "shapes": shapes})
    index.write_text(json.dumps(items))
    return items


def serve_files(root: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_port}", httpd


# ------------------------------------------------------- Label Studio bodies


def task(task_id: int, image: TaskImage, with_box: bool = False) -> dict:
    """A task as Label Studio sends it (annotations, predictions and drafts expanded)."""
    predictions = []
    if with_box and image.shapes:
        x0, y0, x1, y1 = image.shapes[0]["box"]
        w, h = image.width, image.height
        predictions.append({"model_version": "detector-v3", "score": 0.8, "result": [{
            "id": f"d{task_id}", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                      "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": ["Object"]}}]})
    return {"id": task_id, "project": 1, "data": {"image": image.url}, "annotations": [],
            "predictions": predictions, "drafts": []}


def keypoint(image: TaskImage, x: float, y: float, positive: bool, number: int) -> dict:
    return {"id": f"kp{number}", "from_name": "keypoint", "to_name": "image", "type": "keypointlabels",
            "origin": "manual", "original_width": image.width, "original_height": image.height,
            "image_rotation": 0, "is_positive": positive,
            "value": {"x": 100 * (x + 0.5) / image.width, "y": 100 * (y + 0.5) / image.height, "width": 0.6,
                      "keypointlabels": ["Object"], "labels": ["Object"]}}


def predict_body(tasks: list[dict], context: dict | None) -> dict:
    return {"tasks": tasks, "project": PROJECT, "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": context}}


# ------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss_bytes(pgid: int) -> int:
    """The sum of VmRSS over the processes of a process group (gunicorn's master and workers)."""
    return sum(group_rss(pgid).values())


def group_rss(pgid: int) -> dict[int, int]:
    """``{pid: VmRSS bytes}`` of the processes of a process group."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match:
            found[int(entry)] = int(match.group(1)) * 1024
    return found


class Server:
    """``sam-backend serve`` in its own process group, with its log in a file."""

    def __init__(self, preset: str, workers: int, threads: int, memory_mb: float, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = workdir / "server.log"
        self.cache_dir = workdir / "embeddings"
        env = dict(os.environ, LOG_LEVEL="INFO", MODEL_DIR=str(workdir), SAM_MEMORY_CACHE_MB=str(memory_mb),
                   SAM_MEDIA_ALLOWED_HOSTS="127.0.0.1")
        for variable in ("SAM_CACHE_URL", "SAM_CACHE_DIR", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
                         "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
            env.pop(variable, None)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sam_backend", "serve", "--preset", preset, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", str(workers), "--threads", str(threads),
             "--cache-dir", str(self.cache_dir)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_loaded(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + self.log)
            if len(re.findall(r"Warmed up in [0-9.]+s", self.log)) >= self.workers:  # one per ready worker
                return
            time.sleep(0.5)
        raise RuntimeError("the workers did not load in time:\n" + self.log)

    def rss(self) -> int:
        return group_rss_bytes(self.process.pid)

    def rss_by_process(self) -> str:
        """The master's and each worker's RSS, for the report."""
        by_pid = group_rss(self.process.pid)
        master = by_pid.pop(self.process.pid, 0)
        return f"master {mb(master)}, workers " + ", ".join(mb(v) for _, v in sorted(by_pid.items()))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


# --------------------------------------------------------------- the load


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    batch_tasks: int = 0
    batch_masks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1


class Project:
    """The tasks, handed out in turn to whoever asks for the next one."""

    def __init__(self, images: list[TaskImage]):
        self.images = images
        self._order = itertools.cycle(range(len(images)))
        self._lock = threading.Lock()
        self.opened: set[int] = set()

    def next_task(self) -> tuple[int, bool]:
        """``(index, first time opened)``."""
        with self._lock:
            index = next(self._order)
            first = index not in self.opened
            self.opened.add(index)
            return index, first


def post(session: requests.Session, url: str, body: dict, results: Results, kind: str) -> dict | None:
    started = time.perf_counter()
    try:
        response = session.post(url + "/predict", json=body, timeout=100)  # Label Studio's timeout
    except requests.RequestException as exc:
        results.error(f"{kind}: {type(exc).__name__}")
        return None
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        results.error(f"{kind}: HTTP {response.status_code} {response.text[:120]}")
        return None
    answer = response.json()
    if len(answer.get("results", [])) != len(body["tasks"]):
        results.error(f"{kind}: {len(answer.get('results', []))} results for {len(body['tasks'])} tasks")
        return None
    results.add(kind, seconds)
    return answer


def prime(url: str, images: list[TaskImage], concurrency: int) -> None:
    """Every server thread serves a few clicks (1 to 4 points) on images the run does not use, all at once.

    So the one-time costs (each thread's buffers, the allocator's caches, the
    kernels of each prompt shape) are paid before the primed baseline.
    """
    results = Results()

    def clicks(index: int) -> None:
        image = images[index % len(images)]
        task_ = task(900_000 + index, image)
        post(session, url, predict_body([task_], None), results, "warm-up")
        shape = image.shapes[0]
        points = []
        for number in range(1 + index % 4):
            points.append(keypoint(image, *shape["inside"], True, number) if number % 2 == 0
                          else keypoint(image, *shape["outside"], False, number))
            post(session, url, predict_body([task_], {"result": list(points)}), results, "click")

    session = requests.Session()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(clicks, range(3 * concurrency)))
    if results.errors:
        raise RuntimeError(f"priming failed: {results.errors}")


def annotator(number: int, url: str, project: Project, results: Results, stop: threading.Event) -> None:
    rng = random.Random(number)
    session = requests.Session()
    while not stop.is_set():
        index, first = project.next_task()
        image = project.images[index]
        task_ = task(1000 + index, image)
        warmed = rng.random() < 0.7
        if warmed:  # the task opens with "Use predictions to prelabel tasks" on
            post(session, url, predict_body([task_], None), results, "warm-up")
        stop.wait(rng.uniform(0.3, 1.5))  # looking at the image
        shape = rng.choice(image.shapes) if image.shapes else None
        if shape is None:
            continue
        points = []
        for click in range(rng.randint(1, 4)):
            if stop.is_set():
                return
            if click == 0 or rng.random() < 0.6:
                x, y = shape["inside"]
                x, y = x + rng.uniform(-2, 2), y + rng.uniform(-2, 2)
                points.append(keypoint(image, x, y, True, click))
            else:
                points.append(keypoint(image, *shape["outside"], False, click))
            kind = "click cached"
            if first and click == 0:
                kind = "click after warm-up" if warmed else "click cold"
            answer = post(session, url, predict_body([task_], {"result": list(points)}), results, kind)
            if answer is not None and not answer["results"][0].get("result"):
                results.error(f"{kind}: no mask")
            stop.wait(rng.uniform(0.2, 1.0))  # looking at the mask


def manager(url: str, project: Project, results: Results, stop: threading.Event) -> None:
    """"Retrieve predictions" on a few tasks now and then: a batch /predict without context."""
    rng = random.Random(-1)
    session = requests.Session()
    while not stop.wait(BATCH_EVERY_SECONDS):
        chosen = rng.sample(range(len(project.images)), BATCH_TASKS)
        tasks = [task(1000 + i, project.images[i], with_box=True) for i in chosen]
        answer = post(session, url, predict_body(tasks, None), results, "batch")
        if answer is not None:
            with results.lock:
                results.batch_tasks += len(tasks)
                results.batch_masks += sum(bool(r) and bool(r.get("result")) for r in answer["results"])


# ---------------------------------------------------------------- report


def percentiles(values: list[float]) -> str:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return f"{len(values):6d} {p50:7.3f} {p95:7.3f} {p99:7.3f} {max(values):7.3f}"


def mb(value: float) -> str:
    return f"{value / 2**20:.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (serve's default)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--memory-mb", type=float, default=8,
                        help="SAM_MEMORY_CACHE_MB per worker (demo embeddings are 128 KiB: 8 MB holds about 60)")
    parser.add_argument("--images-dir", type=Path, default=Path(tempfile.gettempdir()) / "sam-backend-load-images")
    parser.add_argument("--no-prime", dest="prime", action="store_false",
                        help="no priming burst (on other images) between the baseline and the run")
    args = parser.parse_args()

    print(f"Generating {args.images} images in {args.images_dir}...", flush=True)
    items = generate_images(args.images_dir, args.images)
    media_url, httpd = serve_files(args.images_dir)
    images = [TaskImage(f"{media_url}/{i['name']}", i["width"], i["height"], i["shapes"]) for i in items]
    priming = [TaskImage(f"{media_url}/{i['name']}", i["width"], i["height"], i["shapes"])
               for i in generate_images(args.images_dir, 12, seed=12) if i["shapes"]]

    workdir = Path(tempfile.mkdtemp(prefix="sam-backend-load-"))
    server = Server(args.preset, args.workers, args.threads, args.memory_mb, workdir)
    samples: list[tuple[float, int, int]] = []  # (seconds since traffic began, RSS bytes, images opened)
    try:
        print(f"Starting sam-backend serve --preset {args.preset} --workers {args.workers} "
              f"(SAM_MEMORY_CACHE_MB={args.memory_mb:g}); log in {server.log_path}", flush=True)
        server.wait_loaded()
        setup = {"project": PROJECT, "schema": LABEL_CONFIG, "hostname": media_url, "access_token": "none",
                 "extra_params": None}
        requests.post(server.url + "/setup", json=setup, timeout=10).raise_for_status()
        time.sleep(2)
        before = []
        for _ in range(6):  # after the load and the warm-up, before any traffic
            before.append(server.rss())
            time.sleep(0.5)
        baseline = float(np.median(before))
        baseline_by_process = server.rss_by_process()
        if args.prime:
            prime(server.url, priming, args.workers * args.threads)
            time.sleep(2)
            primed = float(np.median([server.rss() for _ in range(4)]))

        project, results, stop = Project(images), Results(), threading.Event()
        began = time.monotonic()

        def sample():
            while not stop.wait(0.5):
                samples.append((time.monotonic() - began, server.rss(), len(project.opened)))

        threads = [threading.Thread(target=sample, daemon=True),
                   threading.Thread(target=manager, args=(server.url, project, results, stop), daemon=True)]
        threads += [threading.Thread(target=annotator, args=(n, server.url, project, results, stop), daemon=True)
                    for n in range(args.annotators)]
        print(f"{args.annotators} annotators for {args.seconds:.0f}s over {args.images} images...", flush=True)
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join(110)  # a request in flight ends within Label Studio's timeout
        elapsed = time.monotonic() - began
        samples.append((elapsed, server.rss(), len(project.opened)))
        end_by_process = server.rss_by_process()
        log = server.log
    finally:
        server.stop()
        httpd.shutdown()
        for kept in workdir.iterdir():  # the store and the downloaded media; the log stays
            if kept.is_dir():
                shutil.rmtree(kept, ignore_errors=True)

    served = sum(len(v) for v in results.latencies.values())
    errors = sum(results.errors.values())
    clicks = sum(len(v) for k, v in results.latencies.items() if k.startswith("click"))
    print()
    print(f"Load: {args.annotators} annotators, {elapsed:.0f}s, {args.images} images, preset {args.preset}, "
          f"{args.workers} workers x {args.threads} threads, SAM_MEMORY_CACHE_MB={args.memory_mb:g}")
    print(f"requests served: {served} ({served / elapsed:.1f}/s; {clicks} clicks), errors: {errors}")
    for what, count in sorted(results.errors.items()):
        print(f"  error x{count}: {what}")
    print(f"batches: {results.batch_tasks} tasks, {results.batch_masks} with masks")
    print(f"\n{'latency (s)':22s} {'n':>6s} {'p50':>7s} {'p95':>7s} {'p99':>7s} {'max':>7s}")
    for kind in ("click cold", "click after warm-up", "click cached", "warm-up", "batch"):
        if results.latencies.get(kind):
            print(f"{kind:22s} {percentiles(results.latencies[kind])}")
    encodes = len(re.findall(r"\] sam_backend\.embeddings\.encode_queue: Encoded ", log))
    print(f"\nimages opened: {len(project.opened)} of {args.images}; encodes (server log): {encodes}")

    rss = np.array([s[1] for s in samples], dtype=np.float64)
    peak = rss.max()
    budget = args.workers * args.memory_mb * 2**20
    quarter = max(1, len(samples) // 4)
    first, last = rss[:quarter].mean(), rss[-quarter:].mean()
    seen_first, seen_last = samples[quarter - 1][2], samples[-1][2]
    print(f"\nserver RSS (master + {args.workers} workers): baseline {mb(baseline)}, peak {mb(peak)}, "
          f"peak - baseline {mb(peak - baseline)} vs memory cache budgets {args.workers} x {args.memory_mb:g} MB "
          f"= {mb(budget)}: {'within' if peak - baseline <= budget else 'OVER'}")
    print(f"  at the baseline: {baseline_by_process}; at the end: {end_by_process}")
    if args.prime:
        print(f"primed baseline (after {3 * args.workers * args.threads} clicks at once on {len(priming)} other "
              f"images): {mb(primed)}; peak - primed baseline {mb(peak - primed)} vs {mb(budget)}: "
              f"{'within' if peak - primed <= budget else 'OVER'}")
    print(f"RSS over time: first quarter mean {mb(first)} ({seen_first} images opened by then), "
          f"last quarter mean {mb(last)} ({seen_last} images opened): {mb(last - first)} apart")
    # The first seconds fill the caches and each thread's working memory; a
    # leak shows as growth after that, per image first seen.
    half = len(samples) // 2
    new_images = samples[-1][2] - samples[half][2]
    growth = rss[-1] - rss[half]
    per_image = f", {growth / new_images / 2**10:.0f} KB per new image" if new_images else " (no new images: revisits only)"
    print(f"second half ({samples[half][0]:.0f}s to {samples[-1][0]:.0f}s): {mb(growth)} while "
          f"{new_images} more images were opened{per_image}")
    step = max(1, len(samples) // 12)
    print("  " + ", ".join(f"{t:.0f}s {v / 2**20:.0f}MB/{n}img" for t, v, n in samples[::step]))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
