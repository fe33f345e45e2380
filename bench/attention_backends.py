"""The whole float32 ViT-B image encode with each attention backend, in one run.

Usage: python bench/attention_backends.py [--runs 3] [--preset-dir DIR]

Issue 23 asked whether torch's FlexAttention (``torch.nn.attention.flex_attention``,
compiled by ``torch.compile`` for the CPU, with the decomposed
relative-position bias as its ``score_mod``) could replace the hand-written
AVX-512 kernel (``sam_backend/accel/rel_attention.c``): the kernel stays only
if it is at least 15 % faster. This times the same encoder (the
``sam_base_sa1b`` architecture, random weights, fused blocks of
:mod:`sam_backend.accel.attention`) on one 1024x1024 input with:

- ``sdpa``: torch's ``scaled_dot_product_attention`` with the bias as its mask
  (``SAM_ATTENTION_KERNEL=0``);
- ``flex``: FlexAttention, compiled once per shape (the compile time is printed apart);
- ``kernel``: the C kernel, where the CPU has AVX-512 and a compiler is found.

The backends take turns run by run, so that a slow moment of the machine
falls on all of them; medians are printed, with each backend's largest
difference from ``sdpa``'s embedding.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402


def flex_attend(layer, qkv, height: int, width: int):
    """``sam_backend.accel.attention._attend`` with FlexAttention: the bias added in ``score_mod``."""
    import torch

    from sam_backend.accel import attention

    queries, keys, values = qkv.unbind(0)
    batch, heads, tokens, key_dim = queries.shape
    rel = layer.add_decomposed_relative_pe
    table_h = attention._relative_table(rel.rel_pos_h.value, height, queries.dtype, torch)
    table_w = attention._relative_table(rel.rel_pos_w.value, width, queries.dtype, torch)
    grid = queries.reshape(batch, heads, height, width, key_dim)
    # keras-hub's bias terms, from the unscaled queries: (B, heads, HW, H) and (B, heads, HW, W).
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).reshape(batch, heads, tokens, width)

    def score_mod(score, b, h, query, key):
        return score + rel_h[b, h, query, key // width] + rel_w[b, h, query, key % width]

    return _compiled_flex()(queries.contiguous(), keys.contiguous(), values.contiguous(), score_mod=score_mod,
                            scale=layer.scale)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sam-bench-vit-b"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    from sam_backend.accel import attention, attention_kernel
    from sam_backend.sam.engine import SamEngine
    from sam_backend.sam.transforms import preprocess

    if not os.path.isdir(args.preset_dir):
        from architectures import build_segmenter

        print(f"Saving a random-weight sam_base_sa1b preset to {args.preset_dir} (once)...", flush=True)
        build_segmenter("sam_base_sa1b").save_to_preset(args.preset_dir)
    engine = SamEngine.from_preset(args.preset_dir)
    attention.fuse_vitdet_attention(engine.model)
    rng = np.random.default_rng(0)
    batch = preprocess(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8), engine.input_size)[None]

    sdpa_attend = attention._attend
    kernel_here = attention_kernel.kernel() is not None
    backends = ["sdpa", "flex"] + (["kernel"] if kernel_here else [])

    def use(backend: str) -> None:
        os.environ[attention_kernel.ENV_VAR] = "1" if backend == "kernel" else "0"
        attention._attend = flex_attend if backend == "flex" else sdpa_attend

    features, times = {}, {name: [] for name in backends}
    print(f"{torch.get_num_threads()} torch thread(s); attention kernel: {attention_kernel.kernel_status()}", flush=True)
    for name in backends:  # one-time costs (flex: its compiles), not counted
        use(name)
        started = time.perf_counter()
        features[name] = engine.encode_features(batch)
        print(f"{name}: first encode {time.perf_counter() - started:.1f} s (compiles, allocations)", flush=True)
    for _ in range(args.runs):
        for name in backends:
            use(name)
            started = time.perf_counter()
            engine.encode_features(batch)
            times[name].append(time.perf_counter() - started)
    use("sdpa")

    base = statistics.median(times["sdpa"])
    print(f"\nwhole float32 ViT-B encode, 1024x1024, median of {args.runs}:")
    print(f"{'backend':8} {'median':>9} {'vs sdpa':>8} {'max |diff|':>11}  runs (s)")
    for name in backends:
        median = statistics.median(times[name])
        diff = float((features[name] - features["sdpa"]).abs().max())
        print(f"{name:8} {median * 1000:7.0f}ms {median / base:7.2f}x {diff:11.2e}  "
              + " ".join(f"{t:.2f}" for t in times[name]))
    if not kernel_here:
        print("\nThe AVX-512 kernel cannot run on this CPU; compare it with sdpa on one that has AVX-512.")


if __name__ == "__main__":
    main()
