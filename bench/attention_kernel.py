"""The encoder's attention alone: the AVX-512 kernel against torch's SDPA with the bias, ViT-B shapes.

Usage: python bench/attention_kernel.py [--repeats 5]

For a ViT-B global block (12 heads over 64x64 tokens) and a windowed block
(25 windows of 14x14 tokens, 12 heads), both at 1024 px, it times the
attention after the qkv projection (scores, relative-position bias, softmax,
values) in float32 two ways, best of ``--repeats``, in one process:

- ``sdpa``: what the fused layers run without the kernel (``attention._attend``:
  the bias built from ``rel_h``/``rel_w`` in cache-sized chunks, torch's
  ``scaled_dot_product_attention`` per chunk);
- ``kernel``: ``attention_kernel.rel_attention`` (the bias from the tables,
  inside the kernel);

and prints their largest difference and the rate in GFLOP/s (the two
products' multiply-adds, as the encoder's 930 GFLOP counts them). Run it under
the allocator the server uses (``LD_PRELOAD`` tcmalloc) for comparable figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

logger = logging.getLogger("bench.attention_kernel")

SHAPES = {
    "global (1 x 12 heads x 64x64 tokens)": (1, 1, 12, 64, 64),
    "windowed (25 windows x 12 heads x 14x14 tokens)": (5, 5, 12, 14, 14),
}
HEAD = 64


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from sam_backend.accel.allocator import allocator_in_use
    from sam_backend.accel import attention, attention_kernel

    if attention_kernel.kernel() is None:
        raise SystemExit(f"the kernel does not run here ({attention_kernel.kernel_status()}); nothing to compare")
    logger.info("%d threads, allocator %s", torch.get_num_threads(), allocator_in_use())
    generator = torch.Generator().manual_seed(0)
    for name, (outer, inner, heads, height, width) in SHAPES.items():
        # (outer, H, inner, W, 3, heads, d): a windowed block's padded qkv grid, or a global block's (inner = 1).
        qkv = torch.randn(outer, height, inner, width, 3, heads, HEAD, generator=generator)
        grid = qkv.permute(4, 0, 2, 5, 1, 3, 6)  # 3 x (outer, inner, heads, H, W, d)
        layer = SimpleNamespace(
            use_rel_pos=True, scale=HEAD ** -0.5,
            add_decomposed_relative_pe=SimpleNamespace(
                rel_pos_h=SimpleNamespace(value=torch.randn(2 * height - 1, HEAD, generator=generator) * 0.1),
                rel_pos_w=SimpleNamespace(value=torch.randn(2 * width - 1, HEAD, generator=generator) * 0.1)),
        )
        items, tokens = outer * inner, height * width
        # The SDPA path wants (3, items, heads, tokens, d).
        flat = grid.reshape(3, items, heads, tokens, HEAD)

        def sdpa():
            return attention._attend(layer, flat, height, width)

        def kernel():
            rel = layer.add_decomposed_relative_pe
            return attention_kernel.rel_attention(*grid.unbind(0), rel.rel_pos_h.value, rel.rel_pos_w.value,
                                                  layer.scale)

        with torch.inference_mode():
            difference = float((sdpa() - kernel().reshape(items, heads, tokens, HEAD)).abs().max())
            sdpa_s, kernel_s = best(sdpa, args.repeats), best(kernel, args.repeats)
        gflop = 2 * 2 * items * heads * tokens * tokens * HEAD / 1e9
        logger.info("%s: SDPA %.1f ms (%.0f GFLOP/s), kernel %.1f ms (%.0f GFLOP/s): %.2fx; largest difference %.1e",
                    name, sdpa_s * 1e3, gflop / sdpa_s, kernel_s * 1e3, gflop / kernel_s, sdpa_s / kernel_s,
                    difference)


if __name__ == "__main__":
    main()
