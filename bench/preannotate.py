"""Pre-annotation throughput: what a task costs beyond the image encoder.

Random weights give noise-like masks, whose brush RLE (label-studio-sdk, pure
Python) is far slower than a real mask's, so the whole pipeline is timed
with the trained ``demo`` preset on 1280x960 scenes of shapes (realistic
masks): ``sam-backend preannotate``'s own code (:class:`Preannotator`) against
the loopback Label Studio API of the tests, each task with boxes around its
shapes. Everything but the encoder (fetch, image load, decoding the boxes,
upsampling, RLE, JSON, upload) is that time minus demo's encoder time. For a
full model the decoder is bigger: the ``sam_base_sa1b`` architecture's encoder
and its decoder on the same boxes are timed separately, and the overhead over
its encoder is (everything else - demo decode + ViT-B decode) / ViT-B encode.
Automatic masks are timed separately: their grid of prompts is decoder work
that grows with the grid, not a fixed overhead.

Usage: python bench/preannotate.py [--arch sam_base_sa1b] [--tasks 6] [--auto-grid 16]
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
from sam_backend.sam.automask import AutoMaskGenerator, AutoMaskSettings  # noqa: E402
from sam_backend.server.backend import ModelHolder, SamBackend  # noqa: E402
from sam_backend.sam.engine import SamEngine  # noqa: E402
from sam_backend.labelstudio.api import LabelStudioProject  # noqa: E402
from sam_backend.labelstudio.media import Credentials, MediaFetcher  # noqa: E402
from sam_backend.commands.preannotate import Preannotator  # noqa: E402
from sam_backend.server.prelabel import PrelabelSettings  # noqa: E402
from sam_backend.sam.synthetic import bounding_box, generate_scene  # noqa: E402

logger = logging.getLogger("bench")

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>'
    '<RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels></View>'
)
SIZE = (960, 1280)


def box_region(mask) -> dict:
    x0, y0, x1, y1 = (float(v) for v in bounding_box(mask))
    h, w = SIZE
    return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": w,
            "original_height": h, "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                                            "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": ["Object"]}}


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sam_base_sa1b")
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--auto-grid", type=int, default=16, help="points per side for the automatic-mask timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("SAM_CACHE_DIR", None)

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="sam-bench-"))
    (work / "files" / "1").mkdir(parents=True)
    fake = FakeLabelStudio(work / "files", label_config=LABEL_CONFIG)
    scenes = []
    for i in range(args.tasks):
        scene = generate_scene(rng, SIZE)
        Image.fromarray(scene.image).save(work / "files" / "1" / f"{i}.jpg", quality=90)
        fake.add_task(1, f"1/{i}.jpg", predictions=[
            {"id": 10_000 + i, "model_version": "detector", "result": [box_region(m) for m in scene.masks]}])
        scenes.append(scene)
    boxes_per_task = statistics.mean(len(s.masks) for s in scenes)

    demo = SamEngine.from_preset("demo")
    demo.encode(scenes[0].image)
    demo_encode = statistics.median(timed(lambda s=s: demo.encode(s.image), 1) for s in scenes)
    embedding = demo.encode(scenes[0].image)
    demo_boxes = [bounding_box(m) for m in scenes[0].masks]
    demo_decode = timed(lambda: demo.decode_boxes(embedding, demo_boxes))

    holder = ModelHolder("demo", loader=lambda preset: demo).start()
    holder.wait()
    holder.embeddings().memory.clear()
    backend = SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(work / "media")),
                         credentials=Credentials(fake.url, fake.token))
    project = LabelStudioProject(fake.url, fake.token, 1)
    started = time.perf_counter()
    summary = Preannotator(backend, project, PrelabelSettings(mode="boxes"), batch_size=4, progress=False).run()
    per_task = (time.perf_counter() - started) / args.tasks
    assert summary.done == args.tasks and not summary.failed, summary
    fake.close()
    everything_else = per_task - demo_encode

    full = SamEngine(build_segmenter(args.arch), preset=args.arch)
    full.encode(scenes[0].image)  # first-call costs out of the way
    full_encode = timed(lambda: full.encode(scenes[1].image), 2)
    full_embedding = full.encode(scenes[0].image)
    full_decode = timed(lambda: full.decode_boxes(full_embedding, demo_boxes))
    settings = AutoMaskSettings(points_per_side=args.auto_grid)
    auto = timed(lambda: AutoMaskGenerator(full, settings).generate(full_embedding), 1)
    overhead = everything_else - demo_decode + full_decode

    print(f"{os.cpu_count()} CPU core(s); {args.tasks} tasks of {SIZE[1]}x{SIZE[0]}, {boxes_per_task:.1f} boxes each")
    print(f"  demo: preannotate          {1000 * per_task:8.0f} ms/task (fetch, encode, decode, RLE, upload)")
    print(f"  demo: encoder              {1000 * demo_encode:8.0f} ms/image")
    print(f"  demo: decoding the boxes   {1000 * demo_decode:8.0f} ms/task")
    print(f"  everything but the encoder {1000 * everything_else:8.0f} ms/task")
    print(f"  {args.arch}: encoder      {1000 * full_encode:8.0f} ms/image")
    print(f"  {args.arch}: decoding the boxes {1000 * full_decode:8.0f} ms/task")
    print(f"  overhead over the {args.arch} encoder: {100 * overhead / full_encode:.1f} %")
    print(f"  automatic masks, {args.auto_grid}x{args.auto_grid} grid, {args.arch} decoder: "
          f"{1000 * auto:.0f} ms/image beyond the encoder ({100 * auto / full_encode:.0f} % of it)")


if __name__ == "__main__":
    main()
