"""``preannotate --ray`` against the single-machine run: tasks per second, same tasks, same preset.

The trained ``demo`` preset on 1280x960 scenes of shapes, each task with a
detector's boxes around its shapes (as ``bench/preannotate.py``), against the
loopback Label Studio API of the tests. Three runs over the same tasks, each
on an empty embedding store and media cache:

- the single-machine run (:class:`Preannotator`, ``sam-backend preannotate``'s
  own code): the model loaded in this process;
- ``--ray`` with 1 actor of 2 CPUs, and with 2 actors of 1 CPU each
  (:class:`Preannotator` with a :class:`RayExecutor`), on a local Ray instance of 2 CPUs started once
  beforehand (its start is not counted; each run starts its actors, which
  load the preset).

For each: the end-to-end rate (model loading included), the start (until
the first prediction is uploaded: the model load, and for Ray its pipeline
and actors), and the rate after the start (one upload per task; Ray hands on
results a block of 4 tasks at a time, so this needs a few dozen tasks to mean
much), and Ray's overhead over the single-machine run on both rates.

Usage: python bench/ray_preannotate.py [--tasks 24]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fake_labelstudio import FakeLabelStudio  # noqa: E402
from preannotate import LABEL_CONFIG, SIZE, box_region  # noqa: E402
from sam_backend.commands.preannotate import Preannotator  # noqa: E402
from sam_backend.commands.ray_executor import RayExecutor, RayOptions  # noqa: E402
from sam_backend.labelstudio.api import LabelStudioProject  # noqa: E402
from sam_backend.labelstudio.media import Credentials  # noqa: E402
from sam_backend.sam.synthetic import generate_scene  # noqa: E402
from sam_backend.server.backend import ModelHolder, SamBackend  # noqa: E402
from sam_backend.server.prelabel import PrelabelSettings  # noqa: E402

PRESET = "demo"


class TimedProject(LabelStudioProject):
    """The project, noting when each upload lands."""

    uploads: list[float]

    def create_predictions(self, predictions: list[dict]) -> int:
        done = super().create_predictions(predictions)
        self.uploads += [time.perf_counter()] * len(predictions)
        return done


def fresh_dirs(work: Path, name: str) -> None:
    """An empty store and media cache for the next run (here and, through the environment, in the actors)."""
    os.environ["SAM_CACHE_DIR"] = str(work / name / "store")
    os.environ["MODEL_DIR"] = str(work / name / "model-dir")


def project_for(fake: FakeLabelStudio) -> TimedProject:
    for task in fake.tasks[1]:  # each run starts from the detector's boxes only
        task["predictions"] = [p for p in task["predictions"] if p["model_version"] == "detector"]
    project = TimedProject(fake.url, fake.token, 1)
    project.uploads = []
    return project


def rates(tasks: int, started: float, ended: float, uploads: list[float]) -> tuple[float, float, float, float]:
    """``(seconds, end-to-end tasks/s, seconds to the first upload, tasks/s after it)``."""
    first = uploads[0]
    # Tasks uploaded with the first one (the rest of its block) came with the start.
    with_first = sum(1 for t in uploads if t - first < 0.05)
    after = (tasks - with_first) / (ended - first) if tasks > with_first else float("nan")
    return ended - started, tasks / (ended - started), first - started, after


def single_machine(fake: FakeLabelStudio, work: Path, tasks: int) -> tuple[float, float, float, float]:
    fresh_dirs(work, "single")
    project = project_for(fake)
    started = time.perf_counter()
    holder = ModelHolder(PRESET).start()
    holder.wait()
    backend = SamBackend(holder=holder, credentials=Credentials(fake.url, fake.token))
    summary = Preannotator(backend, project, PrelabelSettings(mode="boxes"), batch_size=1, progress=False).run()
    ended = time.perf_counter()
    assert summary.done == tasks and not summary.failed, summary
    return rates(tasks, started, ended, project.uploads)


def on_ray(fake: FakeLabelStudio, work: Path, tasks: int, actors: int, cpus: float) -> tuple[float, float, float, float]:
    fresh_dirs(work, f"ray-{actors}")
    project = project_for(fake)
    backend = SamBackend(preset=PRESET, credentials=Credentials(fake.url, fake.token))
    options = RayOptions(actors=actors, cpus_per_actor=cpus)
    started = time.perf_counter()
    summary = Preannotator(backend, project, PrelabelSettings(mode="boxes"), executor=RayExecutor(options),
                           batch_size=1, progress=False).run()
    ended = time.perf_counter()
    assert summary.done == tasks and not summary.failed, summary
    return rates(tasks, started, ended, project.uploads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="sam-bench-ray-"))
    (work / "files" / "1").mkdir(parents=True)
    fake = FakeLabelStudio(work / "files", label_config=LABEL_CONFIG)
    for i in range(args.tasks):
        scene = generate_scene(rng, SIZE)
        Image.fromarray(scene.image).save(work / "files" / "1" / f"{i}.jpg", quality=90)
        fake.add_task(1, f"1/{i}.jpg", predictions=[
            {"id": 10_000 + i, "model_version": "detector", "result": [box_region(m) for m in scene.masks]}])

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024, logging_level=logging.WARNING)
    try:
        results = {"single machine": single_machine(fake, work, args.tasks),
                   "ray, 1 actor x 2 CPUs": on_ray(fake, work, args.tasks, 1, 2),
                   "ray, 2 actors x 1 CPU": on_ray(fake, work, args.tasks, 2, 1)}
    finally:
        ray.shutdown()
        fake.close()

    _, base_total, _, base_after = results["single machine"]
    print(f"{os.cpu_count()} CPU core(s); {args.tasks} tasks of {SIZE[1]}x{SIZE[0]}, preset {PRESET}, mode boxes")
    print(f"  {'run':24} {'seconds':>8} {'tasks/s':>8} {'overhead':>9} {'start s':>8} "
          f"{'tasks/s after start':>20} {'overhead':>9}")
    for name, (seconds, total, start, after) in results.items():
        ray_run = name != "single machine"
        overhead = f"{100 * (base_total / total - 1):+.0f} %" if ray_run else ""
        after_overhead = f"{100 * (base_after / after - 1):+.0f} %" if ray_run else ""
        print(f"  {name:24} {seconds:8.1f} {total:8.2f} {overhead:>9} {start:8.1f} {after:20.2f} {after_overhead:>9}")
    print("  overhead: extra time per task against the single-machine run (end to end; after the start)")


if __name__ == "__main__":
    main()
