"""Ten annotators clicking on encoded images while new images are encoded: do their clicks wait?

Usage: python bench/concurrent_clicks.py [--arch sam_base_sa1b | --demo] [--annotators 10]
       [--new-images 2] [--clicks 5] [--think 0.05] [--device cpu]

One process, as one gunicorn worker with its threads: ``--annotators`` threads
click (embedding lookup, then prompt encoder and mask decoder, then the mask at
full size) on images whose embeddings are in memory, while ``--new-images``
threads ask for images that are not, which the encode queue encodes one at a
time on a CPU (in one batch on a GPU). Each annotator clicks ``--clicks`` times,
and on until the new images are encoded, ``--think`` seconds apart.

It prints the decode time alone, the cached clicks' latency (median, p95, max),
the encodes' times, and how the cached clicks that began during an encode
ended: before the encode did (they did not wait for it) or after (they waited,
or the shared CPU made them that slow: compare their latency with the decode
time). ``--arch`` takes an architecture of ``bench/architectures.py`` (random
weights: the time does not depend on them); ``--demo`` runs the small shipped
preset for a quick check.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from sam_backend.embeddings.tiers import EmbeddingTiers  # noqa: E402
from sam_backend.sam.engine import SamEngine  # noqa: E402

SIZE = (720, 1280)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class EncodeLog:
    """Wraps the engine's encode calls to record when each one ran."""

    def __init__(self, engine: SamEngine):
        self.spans: list[tuple[float, float, int]] = []  # (start, end, images)
        self._lock = threading.Lock()
        for name in ("encode", "encode_many"):
            real = getattr(engine, name)
            setattr(engine, name, self._wrap(real, name == "encode_many"))

    def _wrap(self, real, many: bool):
        def call(images):
            started = time.perf_counter()
            try:
                return real(images)
            finally:
                with self._lock:
                    self.spans.append((started, time.perf_counter(), len(images) if many else 1))

        return call


def main() -> None:
    from sam_backend.accel.allocator import ensure_allocator

    ensure_allocator()  # re-executes under tcmalloc, as serve's workers run
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sam_base_sa1b")
    parser.add_argument("--demo", action="store_true", help="the shipped demo preset instead of --arch (quick)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--annotators", type=int, default=10)
    parser.add_argument("--new-images", type=int, default=2)
    parser.add_argument("--cached-images", type=int, default=2, help="distinct encoded images the annotators share")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per annotator, at least")
    parser.add_argument("--think", type=float, default=0.05, help="seconds between an annotator's clicks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    started = time.perf_counter()
    from sam_backend.accel import accelerate

    if args.demo:
        engine, name = SamEngine.from_preset("demo", device=args.device), "demo"
    else:
        from architectures import build_segmenter

        engine, name = SamEngine(build_segmenter(args.arch), preset=args.arch, device=args.device), args.arch
    accelerate(engine)  # as serve does: fused attention, and the encoder's precision (bfloat16 on AMX)
    engine.warm_up()
    tiers = EmbeddingTiers(engine)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(args.cached_images + args.new_images)]
    cached, new = images[: args.cached_images], images[args.cached_images:]
    for index, image in enumerate(cached):
        tiers.embedding_for(f"cached-{index}", image)
    print(f"{name} on {engine.device_name} ({engine.precision} encoder), {torch.get_num_threads()} torch threads; "
          f"model and {len(cached)} cached image(s) ready in {time.perf_counter() - started:.1f}s")

    embedding = tiers.embedding_for("cached-0", cached[0])
    decodes = []
    for _ in range(10):
        begun = time.perf_counter()
        engine.decode(embedding, points=[[600.0, 400.0]], labels=[1]).mask  # noqa: B018 (the mask is part of a click)
        decodes.append(time.perf_counter() - begun)
    decode = statistics.median(decodes[2:])

    log = EncodeLog(engine)
    clicks: list[tuple[float, float]] = []  # (start, end) of each cached click
    clicks_lock = threading.Lock()
    encoding = threading.Event()
    encoding.set()
    barrier = threading.Barrier(args.annotators + args.new_images)

    def annotator(index: int) -> None:
        local = np.random.default_rng(index)
        key = f"cached-{index % len(cached)}"
        barrier.wait()
        done = 0
        while done < args.clicks or encoding.is_set():
            point = [[float(local.uniform(0, SIZE[1])), float(local.uniform(0, SIZE[0]))]]
            begun = time.perf_counter()
            emb = tiers.embedding_for(key, cached[index % len(cached)])  # a memory hit
            engine.decode(emb, points=point, labels=[1]).mask  # noqa: B018
            with clicks_lock:
                clicks.append((begun, time.perf_counter()))
            done += 1
            time.sleep(args.think)

    def newcomer(index: int) -> None:
        barrier.wait()
        tiers.embedding_for(f"new-{index}", new[index])

    annotators = [threading.Thread(target=annotator, args=(i,)) for i in range(args.annotators)]
    newcomers = [threading.Thread(target=newcomer, args=(i,)) for i in range(args.new_images)]
    for thread in annotators + newcomers:
        thread.start()
    for thread in newcomers:
        thread.join()
    encoding.clear()
    for thread in annotators:
        thread.join()

    latencies = [end - begun for begun, end in clicks]
    before, waited = 0, []  # clicks that began during an encode and ended before it / after it
    for begun, end in clicks:
        span = next(((s, e) for s, e, _ in log.spans if s <= begun < e), None)
        if span is not None and end <= span[1]:
            before += 1
        elif span is not None:
            waited.append(end - begun)
    after = len(waited)
    encodes = ", ".join(f"{e - s:.2f}s ({n} image{'s' if n > 1 else ''})" for s, e, n in sorted(log.spans))
    overlap = max((min(e1, e2) - max(s1, s2) for i, (s1, e1, _) in enumerate(log.spans)
                   for (s2, e2, _) in log.spans[i + 1:]), default=0.0)
    print(f"decode alone (median of 8): {decode * 1000:.0f} ms")
    print(f"encodes: {encodes}; longest overlap of two encodes: {max(0.0, overlap):.2f}s")
    print(f"cached clicks: {len(clicks)} by {args.annotators} annotators; latency median "
          f"{statistics.median(latencies) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    print(f"clicks that began during an encode: {before + after}; ended before it: {before}; after it: {after}"
          + (f" (latency of those: max {max(waited) * 1000:.0f} ms, against an encode of "
             f"{max(e - s for s, e, _ in log.spans):.2f}s)" if waited else ""))
    tiers.queue.close()


if __name__ == "__main__":
    main()
