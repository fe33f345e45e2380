"""The click path: decoder time per click, keras-hub's layers against the torch click decoder and Meta's.

Usage: python bench/click_path.py [--arch sam_base_sa1b] [--clicks 20] [--no-encoder]

With the architecture of ``--arch`` (random weights: the time does not depend
on the values) and a 1920x1080 image, it prints:

- the image encoder's first call in this process (``SamEngine.warm_up``'s,
  on a blank image) against the next three, on the image: the one-time
  costs that warm-up pays at load instead of the first annotator;
- per click (one foreground point, multimask, the best mask upsampled to the
  image as the backend sends it), median of ``--clicks`` rounds that take
  turns between the paths, so that a busy machine slows all of them alike:
  keras-hub's ``SAMPromptEncoder`` + ``SAMMaskDecoder`` (the engine before the
  click decoder), the torch click decoder, and Meta's
  ``SamPredictor.predict`` with the same prompt-encoder and mask-decoder
  weights copied into ``segment_anything``'s modules (it upsamples all three
  masks, as its users get them);
- the click decoder with all four masks, and with an image-cache miss;
- how far the three paths' logits are apart.

``--no-encoder`` builds the image encoder small (same decoder sizes), for a
quick run without the first-encode figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import sam_backend  # noqa: E402,F401  (environment before keras)
from architectures import VIT_CONFIGS  # noqa: E402
from sam_backend.sam.architectures import build_sam  # noqa: E402
from sam_backend.accel.attention import fuse_vitdet_attention  # noqa: E402
from sam_backend.sam.engine import Embedding, SamEngine  # noqa: E402


def import_segment_anything():
    """``segment_anything``, with a stand-in for torchvision where it is missing (predict does not use it)."""
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.to_pil_image = functional.resize = None  # set_image only, not used here
        boxes = types.ModuleType("torchvision.ops.boxes")
        boxes.batched_nms = boxes.box_area = None  # automatic mask generator only
        for name, module in {
            "torchvision": types.ModuleType("torchvision"),
            "torchvision.transforms": types.ModuleType("torchvision.transforms"),
            "torchvision.transforms.functional": functional,
            "torchvision.ops": types.ModuleType("torchvision.ops"),
            "torchvision.ops.boxes": boxes,
        }.items():
            sys.modules[name] = module
    import segment_anything

    return segment_anything


def meta_predictor(engine: SamEngine, embedding: Embedding):
    """A ``SamPredictor`` whose prompt encoder and mask decoder carry ``engine``'s keras-hub weights, image set."""
    import torch

    sa = import_segment_anything()
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    pe, md = engine._prompt_encoder, engine._mask_decoder
    channels, grid = engine.embedding_channels, engine.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=channels, image_embedding_size=grid, input_image_size=(engine.input_size,) * 2,
        mask_in_chans=pe.mask_in_channels,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=channels,
        transformer=TwoWayTransformer(
            depth=md.num_layers, embedding_dim=channels, mlp_dim=md.intermediate_dim, num_heads=md.num_heads
        ),
        num_multimask_outputs=md.num_multimask_outputs, iou_head_depth=md.iou_head_depth,
        iou_head_hidden_dim=md.iou_head_hidden_dim,
    )
    encoder = torch.nn.Module()
    encoder.img_size = engine.input_size
    sam = Sam(encoder, prompt_encoder, mask_decoder).eval()

    def value(variable):
        return torch.as_tensor(variable.value.detach().cpu())

    def dense(linear, layer):
        linear.weight.copy_(value(layer.kernel).t())
        linear.bias.copy_(value(layer.bias))

    def norm(target, layer):
        target.weight.copy_(value(layer.gamma))
        target.bias.copy_(value(layer.beta))

    def conv(target, layer):
        # keras (kh, kw, in, out) -> torch (out, in, kh, kw); transposed: (kh, kw, out, in) -> (in, out, kh, kw)
        target.weight.copy_(value(layer.kernel).permute(3, 2, 0, 1))
        target.bias.copy_(value(layer.bias))

    def denses(sequential):
        import keras

        return [layer for layer in sequential.layers if isinstance(layer, keras.layers.Dense)]

    def attention(target, layer):
        for name in ("q", "k", "v", "out"):
            keras_name = {"q": "query", "k": "key", "v": "value", "out": "out"}[name]
            dense(getattr(target, f"{name}_proj"), getattr(layer, f"{keras_name}_proj"))

    with torch.no_grad():
        prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(
            value(pe.positional_embedding_layer.positional_encoding_gaussian_matrix)
        )
        for i, name in enumerate(("background_point", "foreground_point", "top_left_corner", "bottom_right_corner")):
            prompt_encoder.point_embeddings[i].weight.copy_(value(getattr(pe, f"{name}_embed").embeddings))
        prompt_encoder.not_a_point_embed.weight.copy_(value(pe.not_a_point_embed.embeddings))
        prompt_encoder.no_mask_embed.weight.copy_(value(pe.no_mask_embed.embeddings))
        down = pe.mask_downscaler.layers
        for target, layer in zip(prompt_encoder.mask_downscaling, down):
            if hasattr(layer, "kernel"):
                conv(target, layer)
            elif hasattr(layer, "gamma"):
                norm(target, layer)

        mask_decoder.iou_token.weight.copy_(value(md.iou_token.embeddings))
        mask_decoder.mask_tokens.weight.copy_(value(md.mask_tokens.embeddings))
        for target, layer in zip(mask_decoder.output_upscaling, md.output_upscaling.layers):
            if hasattr(layer, "kernel"):
                conv(target, layer)
            elif hasattr(layer, "gamma"):
                norm(target, layer)
        for target, mlp in zip(mask_decoder.output_hypernetworks_mlps, md.output_hypernetworks_mlps):
            for linear, layer in zip(target.layers, denses(mlp.mlp_block)):
                dense(linear, layer)
        for linear, layer in zip(mask_decoder.iou_prediction_head.layers, denses(md.iou_prediction_head.mlp_block)):
            dense(linear, layer)
        transformer = md.transformer
        for block, layer in zip(mask_decoder.transformer.layers, transformer.layers):
            attention(block.self_attn, layer.self_attention)
            attention(block.cross_attn_token_to_image, layer.cross_attention_token_to_image)
            attention(block.cross_attn_image_to_token, layer.cross_attention_image_to_token)
            for i in range(1, 5):
                norm(getattr(block, f"norm{i}"), getattr(layer, f"layer_norm{i}"))
            lin1, lin2 = denses(layer.mlp_block.mlp_block)
            dense(block.mlp.lin1, lin1)
            dense(block.mlp.lin2, lin2)
        attention(mask_decoder.transformer.final_attn_token_to_image, transformer.final_attention_token_to_image)
        norm(mask_decoder.transformer.norm_final_attn, transformer.final_layer_norm)

    predictor = sa.SamPredictor(sam)
    predictor.features = embedding.features.permute(0, 3, 1, 2).contiguous()
    predictor.original_size = embedding.frame.original_size
    predictor.input_size = embedding.frame.resized_size
    predictor.is_image_set = True
    return predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sam_base_sa1b", choices=sorted(VIT_CONFIGS))
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--no-encoder", action="store_true", help="a small image encoder: decoder figures only")
    args = parser.parse_args()

    import dataclasses

    import torch

    arch = VIT_CONFIGS[args.arch]
    if args.no_encoder:
        arch = dataclasses.replace(arch, encoder_width=16, encoder_depth=1, encoder_heads=2, encoder_mlp=32,
                                   window_size=16, global_layers=(0,))
    started = time.perf_counter()
    segmenter = build_sam(arch, seed=0)
    fuse_vitdet_attention(segmenter)  # the encoder as served (both engines share it)
    fast = SamEngine(segmenter, preset=args.arch)
    keras_path = SamEngine(segmenter, preset=args.arch)
    keras_path._click_decoder = False
    print(f"{args.arch} decoder sizes{' (small image encoder)' if args.no_encoder else ''}, random weights, "
          f"built in {time.perf_counter() - started:.1f}s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}")

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    encoder_calls = []
    encoder = fast._encoder

    def timed_encoder(x):
        t = time.perf_counter()
        out = encoder(x)
        encoder_calls.append(time.perf_counter() - t)
        return out

    fast._encoder = timed_encoder
    t = time.perf_counter()
    fast.warm_up()  # the encoder's first call in this process, on a blank image
    warm_up = time.perf_counter() - t
    for _ in range(3):
        embedding = fast.encode(image)
    first, later = encoder_calls[0], encoder_calls[1:]
    if not args.no_encoder:
        print(f"\nimage encoder: first call (in SamEngine.warm_up) {first:.2f}s; then the 1920x1080 image "
              f"{', '.join(f'{x:.2f}s' for x in later)}: one-time cost {first - statistics.median(later):.2f}s, "
              f"first/steady {first / statistics.median(later):.2f}x; whole warm-up {warm_up:.2f}s")
    # A realistic scale for the embedding (a random encoder's output is not).
    embedding.features = torch.randn(embedding.features.shape, generator=torch.Generator().manual_seed(1))

    click = dict(points=[[760.0, 430.0]], labels=[1])
    predictor = meta_predictor(fast, embedding)
    meta_args = dict(point_coords=np.array(click["points"]), point_labels=np.array(click["labels"]),
                     multimask_output=True)
    model_points = embedding.frame.to_model(np.array([click["points"]], np.float32))
    ones = np.ones((1, 1), np.float32)
    miss = Embedding(embedding.features.clone(), embedding.frame)

    def cache_miss():
        miss.features = miss.features.clone()  # a new tensor: a new image to the click decoder
        return fast.decode(miss, **click).mask

    paths = {
        "keras-hub layers (before)": lambda: keras_path.decode(embedding, **click).mask,
        "click decoder (after)": lambda: fast.decode(embedding, **click).mask,
        "Meta SamPredictor.predict": lambda: predictor.predict(**meta_args),
        "click decoder, all 4 masks, no upsampling": lambda: fast.decode_batch(embedding.features, model_points, ones),
        "click decoder, 3 masks, no upsampling": lambda: fast._decode_outputs(
            embedding.features, model_points, ones, None, None, [1, 2, 3]),
        "click decoder, image-cache miss": cache_miss,
    }
    times = {name: [] for name in paths}
    for fn in paths.values():  # first calls
        fn()
        fn()
    for _ in range(args.clicks):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    before = statistics.median(times["keras-hub layers (before)"])
    print(f"\nper click (point, multimask, 1920x1080), median of {args.clicks}:")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:45s} {1000 * median:7.1f} ms  {median / before:5.2f}x before")

    ours = fast.decode(embedding, **click)
    theirs = keras_path.decode(embedding, **click)
    _, meta_scores, meta_logits = predictor.predict(**meta_args)
    order = np.argsort(-meta_scores, kind="stable")
    print("\nmax |logit difference| of the three candidates:")
    print(f"  click decoder vs keras-hub layers: {np.abs(ours.low_res_logits - theirs.low_res_logits).max():.2e}")
    print(f"  click decoder vs Meta:             {np.abs(ours.low_res_logits - meta_logits[order]).max():.2e}")
    print(f"  keras-hub layers vs Meta:          {np.abs(theirs.low_res_logits - meta_logits[order]).max():.2e}")


if __name__ == "__main__":
    main()
