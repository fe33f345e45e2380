"""Look-ahead: an annotator's first click on each task, with and without it, in one run.

Usage: python bench/lookahead.py [--tasks 5] [--dwell 0.5 1 1.5 2] [--preset-dir DIR]

A simulated annotator works through a project as Label Studio drives the
backend: for each of ``--tasks`` tasks in order, the ``/predict`` of the task
being opened (no context), at once a first click (a smart keypoint), two more
clicks spread over the dwell time D, then the next task. The backend is
``sam-backend serve`` (one worker) on the ``sam_base_sa1b`` architecture
(random weights; 1280x720 images, a different one per task), with a fake
Label Studio on loopback for the task list and the images
(``tests/fake_labelstudio.py``). For D = 0.5, 1, 1.5 and 2 times one encode (the
first click on the first task, measured), with ``SAM_LOOKAHEAD=4`` and
``0``, it prints the first click's latency on the tasks after the first
(median and max), the later clicks' (median and max: a click that waited for a
look-ahead's encode would show there), and the look-ahead encodes done
and wasted (from ``/metrics``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from embedding_store import Server, vit_b_preset  # noqa: E402
from fake_labelstudio import FakeLabelStudio  # noqa: E402

PROJECT = 1
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="keypoint" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
</View>"""


def body(task: dict, click: bool) -> dict:
    region = {"id": f"k{time.monotonic_ns()}", "from_name": "keypoint", "to_name": "image", "type": "keypointlabels",
              "origin": "manual", "original_width": 1280, "original_height": 720, "image_rotation": 0,
              "value": {"x": 48.0, "y": 52.0, "width": 0.6, "keypointlabels": ["Object"]}, "is_positive": True}
    return {"tasks": [task], "project": f"{PROJECT}.1795260000", "label_config": LABEL_CONFIG,
            "params": {"context": {"result": [region]} if click else None}}


def post(url: str, payload: dict) -> float:
    started = time.perf_counter()
    response = requests.post(url + "/predict", json=payload, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def annotate(preset: Path, fake: FakeLabelStudio, work: Path, lookahead: int, dwell: float | None, run: str) -> dict:
    """One pass over the project; ``dwell`` None measures one encode (the first click) instead."""
    os.environ.update(LABEL_STUDIO_URL=fake.url, LABEL_STUDIO_API_KEY=fake.token, SAM_LOOKAHEAD=str(lookahead))
    server = Server(preset, 1, work / run / "embeddings", work / f"{run}.log", None)
    try:
        server.wait_loaded()
        tasks = [{**task, "project": PROJECT} for task in fake.tasks[PROJECT]]
        first, cached = [], []
        for task in tasks if dwell is not None else tasks[:1]:
            opened = time.perf_counter()
            post(server.url, body(task, click=False))  # the task is opened
            first.append(post(server.url, body(task, click=True)))
            if dwell is None:
                break
            for _ in range(2):
                time.sleep(max(0.0, dwell / 3 - 0.1))
                cached.append(post(server.url, body(task, click=True)))
            time.sleep(max(0.0, dwell - (time.perf_counter() - opened)))
        return {"first": first, "cached": cached,
                "encodes": metric(server.url, "sam_lookahead_encodes_total"),
                "waste": metric(server.url, "sam_lookahead_waste_total"),
                "hits": metric(server.url, "sam_lookahead_hits_total")}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--dwell", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0],
                        help="dwell times, in encodes")
    parser.add_argument("--preset-dir", default=os.path.join(tempfile.gettempdir(), "sam-bench-vit-b"))
    args = parser.parse_args()
    preset = vit_b_preset(Path(args.preset_dir))
    work = Path(tempfile.mkdtemp(prefix="sam-bench-lookahead-"))
    (work / "files" / str(PROJECT)).mkdir(parents=True)
    fake = FakeLabelStudio(work / "files", label_config=LABEL_CONFIG)
    rng = np.random.default_rng(0)
    for i in range(args.tasks):
        small = rng.integers(0, 256, (18, 32, 3), dtype=np.uint8)  # smooth content, as photos are
        Image.fromarray(small).resize((1280, 720), Image.BILINEAR).save(work / "files" / str(PROJECT) / f"{i}.png")
        fake.add_task(PROJECT, f"{PROJECT}/{i}.png")

    encode = annotate(preset, fake, work, 0, None, "measure")["first"][0]
    print(f"{os.cpu_count()} CPU core(s); one first click (fetch + encode + decode) {encode:.2f} s; "
          f"{args.tasks} tasks, 3 clicks each", flush=True)
    rows = []
    for factor in args.dwell:
        for lookahead in (4, 0):
            result = annotate(preset, fake, work, lookahead, factor * encode, f"d{factor}-l{lookahead}")
            later = result["first"][1:]
            rows.append((factor, lookahead, statistics.median(later), max(later), statistics.median(result["cached"]),
                         max(result["cached"]), result["encodes"], result["waste"], result["hits"]))
            print(f"  D = {factor}x, SAM_LOOKAHEAD={lookahead}: first clicks " +
                  " ".join(f"{t * 1000:.0f}" for t in result["first"]) + " ms", flush=True)
    fake.close()
    print(f"\n{'dwell':>6} {'lookahead':>9} {'first click p50':>16} {'max':>9} {'cached p50':>11} {'max':>9} "
          f"{'p50 / cached':>13} {'encoded':>8} {'wasted':>7} {'hits':>5}")
    for factor, lookahead, p50, worst, cached, cached_worst, encodes, waste, hits in rows:
        print(f"{factor:5.1f}x {lookahead:9d} {p50 * 1000:14.0f}ms {worst * 1000:7.0f}ms {cached * 1000:9.0f}ms "
              f"{cached_worst * 1000:7.0f}ms {p50 / cached:12.1f}x {encodes:8.0f} {waste:7.0f} {hits:5.0f}")


if __name__ == "__main__":
    main()
