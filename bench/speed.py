"""Issue 13's speed targets, in one run: our served backend against Meta's reference on the same machine.

Usage: python bench/speed.py [--clicks 10] [--encodes 3] [--preset-dir DIR]

With the ``sam_base_sa1b`` architecture (ViT-B; random weights on both sides,
saved once as a local preset: the time does not depend on the values) and a
1920x1080 image, each side warmed up on another image first, it prints:

- first click over HTTP through ``sam-backend serve`` (fetch, encode, decode,
  RLE), against the reference's ``SamPredictor.set_image`` + ``predict`` run as
  its users run it (a plain ``python``, glibc's malloc): target at most 0.6x;
- a cached click over HTTP, median of ``--clicks``, against the reference's
  ``predict``: target at most 1.2x;
- the encoder alone (our engine, in a process under the allocator ``serve``
  uses), in float32, against this machine's fp32 limit: 930 GFLOP per ViT-B
  encode divided by a measured GEMM rate: target within 1.4x; where the
  AVX-512 attention kernel runs, also with torch's SDPA attention instead;
- on a CPU with AMX, the encoder also in the precision ``serve`` picks there
  (bfloat16, when its masks pass the parity check on these weights), with the
  check's figures.

The reference and our encoder run in child processes, so that each gets the
allocator its users get. ``bench/concurrent_clicks.py`` measures clicks during
encodes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

#: Multiply-adds x 2 of one ViT-B image encode at 1024x1024 (12 blocks, 4 of
#: them global attention over 4096 tokens, the rest 14x14 windows; neck included).
VIT_B_GFLOP = 930.0
SIZE = (1080, 1920)
#: A click near the middle of the image, in percent (Label Studio's keypoint).
CLICK = (48.0, 52.0)


def images(work: Path) -> tuple[Path, Path]:
    """A warm-up image and the measured one, both 1920x1080 and different."""
    rng = np.random.default_rng(0)
    paths = []
    for name in ("warm-up.png", "measured.png"):
        # Smooth content (blurred blobs), as photos are; noise would only make the RLE larger.
        small = rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)
        Image.fromarray(small).resize((SIZE[1], SIZE[0]), Image.Resampling.BICUBIC).save(work / name)
        paths.append(work / name)
    return paths[0], paths[1]


def gemm_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """The best matrix-multiply rate of this machine in ``dtype``, in GFLOP/s (all cores, torch's BLAS)."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------ children


def reference_child(warm_up: str, measured: str, clicks: int) -> dict:
    """Meta's ``SamPredictor`` as its users run it: set_image + predict, then predict alone."""
    import torch
    from meta_reference import install_torchvision_stand_in

    install_torchvision_stand_in()
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    predictor = SamPredictor(sam_model_registry["vit_b"]().eval())
    point = np.array([[CLICK[0] / 100 * SIZE[1], CLICK[1] / 100 * SIZE[0]]])

    def click(path: str) -> float:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        started = time.perf_counter()
        predictor.set_image(rgb)
        predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
        return time.perf_counter() - started

    click(warm_up)
    first = click(measured)
    cached = []
    for _ in range(clicks):
        started = time.perf_counter()
        predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
        cached.append(time.perf_counter() - started)
    return {"first": first, "cached": statistics.median(cached)}


def encoder_child(preset: str, warm_up: str, measured: str, encodes: int) -> dict:
    """Our engine's encoder alone, under the allocator ``sam-backend serve`` runs with, at ``SAM_PRECISION``."""
    from sam_backend.accel.allocator import allocator_in_use, ensure_allocator

    ensure_allocator()  # re-executes this child under tcmalloc when it is installed
    from sam_backend.sam.images import load_image
    from sam_backend.sam.transforms import preprocess
    from sam_backend.server.loading import load_engine

    engine = load_engine(preset, warm_up=False)  # the accelerations and the precision serve picks
    engine.encode(load_image(warm_up))
    batch = preprocess(load_image(measured), engine.input_size)[None]
    times = []
    for _ in range(encodes):
        started = time.perf_counter()
        engine.encode_batch(batch)
        times.append(time.perf_counter() - started)
    from sam_backend.accel.attention_kernel import kernel_status

    return {"encode": statistics.median(times), "all": times, "allocator": allocator_in_use(),
            "precision": engine.precision, "parity": str(engine.parity) if engine.parity else "",
            "attention": kernel_status() if engine.precision == "float32" else "sdpa"}


def run_child(kind: str, args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--{kind}-child", *args], env=env, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------- served


def served(preset: Path, work: Path, warm_up: Path, measured: Path, clicks: int) -> dict:
    """First and cached clicks through ``sam-backend serve`` (1 worker), timed by the client."""
    from embedding_store import Server, click_body, serve_files, timed_click

    media_url, httpd = serve_files(work)

    def body(path: Path) -> dict:
        b = click_body(f"{media_url}/{path.name}")
        region = b["params"]["context"]["result"][0]
        region.update(original_width=SIZE[1], original_height=SIZE[0])
        region["value"].update(x=CLICK[0], y=CLICK[1])
        return b

    server = Server(preset, 1, work / "store" / "embeddings", work / "serve.log", device=None)
    try:
        load = server.wait_loaded()
        timed_click(server.url, body(warm_up))
        first = timed_click(server.url, body(measured))
        cached = [timed_click(server.url, body(measured)) for _ in range(clicks)]
    finally:
        server.stop()
        httpd.shutdown()
    log = (work / "serve.log").read_text()
    allocator = next((line.split("Memory allocator: ")[1] for line in log.splitlines() if "Memory allocator: " in line),
                     "not logged")
    precision = next((line.split("Image encoder in ")[1].split(" ")[0] for line in log.splitlines()
                      if "Image encoder in " in line), "float32")
    return {"load": load, "first": first, "cached": statistics.median(cached), "allocator": allocator,
            "precision": precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=10, help="cached clicks (median)")
    parser.add_argument("--encodes", type=int, default=3, help="encoder runs (median)")
    parser.add_argument("--preset-dir", type=Path, default=Path(tempfile.gettempdir()) / "sam-bench-vit-b")
    parser.add_argument("--reference-child", nargs=3, metavar=("WARM_UP", "MEASURED", "CLICKS"), help=argparse.SUPPRESS)
    parser.add_argument("--encoder-child", nargs=4, metavar=("PRESET", "WARM_UP", "MEASURED", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        warm, measured, clicks = args.reference_child
        print(json.dumps(reference_child(warm, measured, int(clicks))))
        return
    if args.encoder_child:
        preset, warm, measured, n = args.encoder_child
        print(json.dumps(encoder_child(preset, warm, measured, int(n))))
        return

    from embedding_store import vit_b_preset
    from sam_backend.accel.precision import cpu_has_amx_bf16

    preset = vit_b_preset(args.preset_dir)
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("_SAM_ALLOCATOR")}
    with tempfile.TemporaryDirectory(prefix="sam-speed-") as tmp:
        work = Path(tmp)
        warm_up, measured = images(work)
        rate = gemm_gflops()
        print(f"{os.cpu_count()} CPU core(s); fp32 GEMM {rate:.0f} GFLOP/s -> ViT-B limit "
              f"{VIT_B_GFLOP / rate:.2f} s; image {SIZE[1]}x{SIZE[0]}", flush=True)
        reference = run_child("reference", [str(warm_up), str(measured), str(args.clicks)], plain)
        print(f"reference: first click {reference['first']:.2f} s, predict {reference['cached'] * 1000:.0f} ms", flush=True)
        child = [str(preset), str(warm_up), str(measured), str(args.encodes)]
        encoder = run_child("encoder", child, {**plain, "SAM_PRECISION": "float32"})
        print(f"encoder: {encoder['encode']:.2f} s float32 ({encoder['allocator']}; attention kernel: "
              f"{encoder['attention']})", flush=True)
        sdpa = None
        if encoder["attention"] == "avx512":
            sdpa = run_child("encoder", child, {**plain, "SAM_PRECISION": "float32", "SAM_ATTENTION_KERNEL": "0"})
            print(f"encoder: {sdpa['encode']:.2f} s float32 with torch's SDPA attention instead", flush=True)
        reduced = None
        if cpu_has_amx_bf16():
            print(f"AMX: bfloat16 GEMM {gemm_gflops(dtype='bfloat16'):.0f} GFLOP/s", flush=True)
            reduced = run_child("encoder", child, {**plain, "SAM_PRECISION": "auto"})
            print(f"encoder as served on this CPU (AMX): {reduced['encode']:.2f} s {reduced['precision']}; "
                  f"{reduced['parity'] or 'no reduced precision tried'}", flush=True)
        ours = served(preset, work, warm_up, measured, args.clicks)

    limit = VIT_B_GFLOP / rate
    rows = [
        ("first click (HTTP) / reference set_image+predict", ours["first"], reference["first"], "<= 0.6x"),
        (f"cached click (HTTP, median of {args.clicks}) / reference predict", ours["cached"], reference["cached"],
         "<= 1.2x"),
        ("encoder alone, float32 / fp32 limit (930 GFLOP / GEMM rate)", encoder["encode"], limit, "<= 1.4x"),
    ]
    if sdpa is not None:
        rows.append(("encoder alone, float32, torch's SDPA attention / fp32 limit", sdpa["encode"], limit, ""))
    if reduced is not None:
        rows.append((f"encoder alone, as served ({reduced['precision']}) / fp32 limit", reduced["encode"], limit, ""))
    print(f"\nsam_base_sa1b architecture, {SIZE[1]}x{SIZE[0]}; served: 1 worker, allocator {ours['allocator']}, "
          f"encoder {ours['precision']}; model load + warm-up {ours['load']:.1f} s")
    print(f"{'what':<66} {'ours':>9} {'against':>9} {'ratio':>7} {'target':>8}")
    for what, a, b, target in rows:
        print(f"{what:<66} {a * 1000:>7.0f}ms {b * 1000:>7.0f}ms {a / b:>6.2f}x {target:>8}")
    print("encoder runs, float32 (s): " + " ".join(f"{t:.2f}" for t in encoder["all"]))
    if sdpa is not None:
        print("encoder runs, float32 with SDPA (s): " + " ".join(f"{t:.2f}" for t in sdpa["all"]))
    if reduced is not None:
        print(f"encoder runs, {reduced['precision']} (s): " + " ".join(f"{t:.2f}" for t in reduced["all"]))


if __name__ == "__main__":
    main()
