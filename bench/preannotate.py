"""Pre-annotation throughput: what a task costs beyond the image encoder.

Runs ``sam-backend preannotate``'s own code (:class:`Preannotator`) over a
project served by the loopback Label Studio API of the tests, with images of
1280x960 pixels, and compares the time per task with the encoder alone on the
same images: the difference is fetching, decoding the task's boxes, RLE,
JSON and uploading. Automatic masks are timed separately: their grid of
prompts is decoder work that grows with the grid, not a fixed overhead.

Usage: python bench/preannotate.py [--arch sam_base_sa1b] [--tasks 6] [--boxes 3] [--auto-grid 16]

Random weights (times do not depend on them); no embedding store, so every
image is encoded.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from architectures import build_segmenter  # noqa: E402
from fake_labelstudio import FakeLabelStudio  # noqa: E402
from sam_backend.automask import AutoMaskGenerator, AutoMaskSettings  # noqa: E402
from sam_backend.backend import ModelHolder, SamBackend  # noqa: E402
from sam_backend.engine import SamEngine  # noqa: E402
from sam_backend.labelstudio import LabelStudioProject  # noqa: E402
from sam_backend.media import Credentials, MediaFetcher  # noqa: E402
from sam_backend.preannotate import Preannotator  # noqa: E402
from sam_backend.prelabel import PrelabelSettings  # noqa: E402

logger = logging.getLogger("bench")

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>'
    '<RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels></View>'
)


def box(i: int) -> dict:
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 1280,
            "original_height": 960, "value": {"x": 5 + 30 * i, "y": 10 + 20 * i, "width": 25, "height": 30,
                                              "rotation": 0, "rectanglelabels": ["Object"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sam_base_sa1b")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--boxes", type=int, default=3, help="boxes per task")
    parser.add_argument("--auto-grid", type=int, default=16, help="points per side for the automatic-mask timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("SAM_CACHE_DIR", None)

    engine = SamEngine(build_segmenter(args.arch), preset=args.arch)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="sam-bench-"))
    (work / "files" / "1").mkdir(parents=True)
    images = []
    for i in range(args.tasks + 1):
        pixels = rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(work / "files" / "1" / f"{i}.jpg", quality=90)
        images.append(pixels)
    fake = FakeLabelStudio(work / "files", label_config=LABEL_CONFIG)
    for i in range(1, args.tasks + 1):
        fake.add_task(1, f"1/{i}.jpg", predictions=[
            {"id": 10_000 + i, "model_version": "detector", "result": [box(b) for b in range(args.boxes)]}])

    engine.encode(images[0])  # first-call costs out of the way
    encode = []
    for pixels in images[1:]:
        started = time.perf_counter()
        engine.encode(pixels)
        encode.append(time.perf_counter() - started)

    holder = ModelHolder(args.arch, loader=lambda preset: engine).start()
    holder.wait()
    engine.embeddings.clear()
    backend = SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(work / "media")),
                         credentials=Credentials(fake.url, fake.token))
    project = LabelStudioProject(fake.url, fake.token, 1)
    started = time.perf_counter()
    summary = Preannotator(backend, project, PrelabelSettings(mode="boxes"), batch_size=4, progress=False).run()
    per_task = (time.perf_counter() - started) / args.tasks
    assert summary.done == args.tasks and not summary.failed, summary

    embedding = engine.encode(images[0])
    settings = AutoMaskSettings(points_per_side=args.auto_grid, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    started = time.perf_counter()
    masks = AutoMaskGenerator(engine, settings).generate(embedding)
    auto = time.perf_counter() - started
    fake.close()

    encoder = statistics.median(encode)
    print(f"{args.arch}, {os.cpu_count()} CPU core(s), {args.tasks} tasks of 1280x960, {args.boxes} boxes each")
    print(f"  encoder alone            {encoder:7.2f} s/image (median)")
    print(f"  preannotate, boxes mode  {per_task:7.2f} s/task (fetch, encode, decode, RLE, upload)")
    print(f"  overhead over encoder    {100 * (per_task - encoder) / encoder:7.1f} %")
    print(f"  automatic masks, {args.auto_grid}x{args.auto_grid} grid  {auto:7.2f} s/image beyond the encoder "
          f"({len(masks)} masks kept with no thresholds)")


if __name__ == "__main__":
    main()
