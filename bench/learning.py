"""Learning from annotations: held-out IoU against the number of annotated images, training time, clicks meanwhile.

Usage: python bench/learning.py [--sizes 10 20 40 80] [--held-out 30] [--parts quality vit-b clicks]

The domain is :func:`sam_backend.sam.synthetic.generate_cell_scene`: cells
whose nucleus has another colour. The shipped ``demo`` preset, trained on
scenes where every colour region is an object, selects the nucleus when an
annotator clicks the middle of a cell; the project's objects are whole cells.

- ``quality``: for N annotated images (a prefix of one seeded sequence), a
  decoder is trained from the preset with the defaults the server uses
  (:class:`TuneSettings`), and scored on ``--held-out`` other images as the
  gate scores it: one click at each cell's most interior pixel, and its
  tight box, IoU at the image's size. Training time excludes encoding.
- ``vit-b``: the same training on the ``sam_base_sa1b`` architecture (random
  weights: the decoder's cost does not depend on them; embeddings random too,
  as "once the embeddings exist"), 40 annotated images, at the thread count
  a server gives its training on this machine (``SAM_TRAIN_THREADS``'s
  default) and at all cores (``sam-backend train`` alone on the box).
- ``clicks``: ``sam-backend serve --preset demo`` with a fake Label Studio
  project of annotated cell images; the latency of clicks (``/predict`` with a
  smart keypoint, embeddings cached) with no training, then while "Start
  Training" runs (the server's own child process, nice and threads as served).
"""

from __future__ import annotations

import argparse
import os
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

import sam_backend  # noqa: E402,F401
from sam_backend.learning.tuning import AnnotatedImage, DecoderTuner, TuneSettings, evaluate  # noqa: E402
from sam_backend.sam.engine import Embedding, SamEngine  # noqa: E402
from sam_backend.sam.synthetic import generate_cell_scene, interior_point  # noqa: E402
from sam_backend.sam.transforms import Frame  # noqa: E402


def cell_images(engine: SamEngine, count: int, seed: int) -> list[AnnotatedImage]:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        scene = generate_cell_scene(rng)
        images.append(AnnotatedImage(index, engine.encode(scene.image), list(scene.masks)))
    return images


def quality(sizes: list[int], held_out: int) -> None:
    engine = SamEngine.from_preset("demo")
    judge = cell_images(engine, held_out, seed=2)
    learn = cell_images(engine, max(sizes), seed=1)
    base = evaluate(engine, judge)
    settings = TuneSettings()
    print(f"\n## Held-out IoU, demo preset on cells ({held_out} held-out images, {base.objects} cells; "
          f"{settings.steps} steps of {settings.batch}, lr {settings.learning_rate:g}, {os.cpu_count()} CPUs)\n")
    print("| annotated images | cells | click IoU before -> after | box IoU before -> after | mean gain | training |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        tuned, report = DecoderTuner(engine, settings).fit(learn[:size])
        after = evaluate(tuned, judge)
        cells = sum(len(i.masks) for i in learn[:size])
        print(f"| {size} | {cells} | {base.click:.3f} -> {after.click:.3f} ({after.click - base.click:+.3f}) | "
              f"{base.box:.3f} -> {after.box:.3f} ({after.box - base.box:+.3f}) | {after.mean - base.mean:+.3f} | "
              f"{report.seconds:.0f} s |", flush=True)


def vit_b_training(count: int = 40) -> None:
    import torch

    from architectures import build_segmenter
    from sam_backend.server.training import default_threads

    engine = SamEngine(build_segmenter("sam_base_sa1b"), preset="sam_base_sa1b (random weights)")
    rng = np.random.default_rng(1)
    images = []
    for index in range(count):
        scene = generate_cell_scene(rng, (768, 1024))
        features = torch.randn((1, *engine.embedding_size, engine.embedding_channels))
        images.append(AnnotatedImage(index, Embedding(features, Frame.for_image(scene.image.shape[:2], 1024)),
                                     list(scene.masks)))
    settings = TuneSettings()
    print(f"\n## Training time, sam_base_sa1b architecture, {count} annotated images "
          f"({sum(len(i.masks) for i in images)} objects), {settings.steps} steps of {settings.batch}\n")
    print("| torch threads | per step | whole training |")
    print("|---|---|---|")
    for threads in sorted({default_threads(), os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        _, report = DecoderTuner(engine, settings).fit(images)
        print(f"| {threads} | {1000 * report.seconds / report.steps:.0f} ms | {report.seconds:.0f} s |", flush=True)


def clicks_during_training(tasks: int = 12, clicks: int = 20) -> None:
    from embedding_store import Server
    from fake_labelstudio import FakeLabelStudio
    from sam_backend.labelstudio.rle import mask_to_rle

    work = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    files = work / "files"
    (files / "1").mkdir(parents=True)
    config = (ROOT / "label_config.xml").read_text()
    fake = FakeLabelStudio(files, label_config=config)
    rng = np.random.default_rng(3)
    bodies = []
    for index in range(tasks):
        scene = generate_cell_scene(rng)
        name = f"1/cells-{index}.png"
        Image.fromarray(scene.image).save(files / name)
        height, width = scene.image.shape[:2]
        result = [{"id": f"r{i}", "from_name": "brush", "to_name": "image", "type": "brushlabels",
                   "original_width": width, "original_height": height,
                   "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": ["Object"]}}
                  for i, m in enumerate(scene.masks)]
        task = fake.add_task(1, name, annotations=[{"id": 100 + index, "result": result}])
        x, y = interior_point(scene.masks[0])
        bodies.append({"tasks": [{"id": task["id"], "data": {"image": fake.url + task["data"]["image"]}}],
                       "project": "1.1700000000", "label_config": config,
                       "params": {"context": {"result": [{
                           "type": "keypointlabels", "from_name": "keypoint", "to_name": "image",
                           "original_width": width, "original_height": height, "is_positive": True,
                           "value": {"x": 100 * (x + 0.5) / width, "y": 100 * (y + 0.5) / height, "width": 0.6,
                                     "keypointlabels": ["Object"]}}]}}})
    os.environ.update(LABEL_STUDIO_URL=fake.url, LABEL_STUDIO_API_KEY=fake.token)
    server = Server(Path("demo"), 1, work / "store", work / "server.log", None)
    try:
        server.wait_loaded()
        for body in bodies:  # every image encoded: clicks are decodes
            requests.post(server.url + "/predict", json=body, timeout=600).raise_for_status()

        def click(i: int) -> float:
            started = time.perf_counter()
            requests.post(server.url + "/predict", json=bodies[i % len(bodies)], timeout=600).raise_for_status()
            return 1000 * (time.perf_counter() - started)

        idle = [click(i) for i in range(clicks)]
        answer = requests.post(server.url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 1}},
                               timeout=10).json()
        assert answer["status"] == "started", answer
        busy, started = [], time.perf_counter()
        time.sleep(5)  # past the child's start (imports, model load): clicks meet the training itself
        while "Project 1: training " not in server.log_path.read_text().split("training started", 1)[-1]:
            busy.append(click(len(busy)))
            time.sleep(0.25)
        trained = time.perf_counter() - started
        log = server.log_path.read_text()
        outcome = next(line for line in log.splitlines() if "Project 1: training " in line
                       and "training started" not in line)
    finally:
        server.stop()
        fake.close()
    from sam_backend.server.training import default_threads

    print(f"\n## Clicks while a training runs (sam-backend serve --preset demo, 1 worker, training child at nice 10, "
          f"{default_threads()} of {os.cpu_count()} CPU threads)\n")
    print("| clicks | p50 | p90 | max |")
    print("|---|---|---|---|")
    for name, values in (("no training", idle), (f"during training ({len(busy)} clicks over {trained:.0f} s)", busy)):
        print(f"| {name} | {statistics.median(values):.0f} ms | {np.percentile(values, 90):.0f} ms | "
              f"{max(values):.0f} ms |")
    print(f"\np50 during / without: {statistics.median(busy) / statistics.median(idle):.2f}x")
    print(f"Training: {outcome.split('training ', 1)[-1][:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--held-out", type=int, default=30)
    parser.add_argument("--parts", nargs="+", default=["quality", "vit-b", "clicks"],
                        choices=["quality", "vit-b", "clicks"])
    args = parser.parse_args()
    if "quality" in args.parts:
        quality(args.sizes, args.held_out)
    if "vit-b" in args.parts:
        vit_b_training()
    if "clicks" in args.parts:
        clicks_during_training()


if __name__ == "__main__":
    main()
