"""SAM 3 concept prompts: vision encode, per-phrase decode, peak memory, bfloat16, a pre-annotated task.

Usage: python bench/concepts.py [--model sam3|tiny] [--phrases 3] [--size 1280x960] [--parts f32 bf16 store task]

``--model sam3`` is the ``sam3_pcs`` architecture (Hugging Face's default
``Sam3Config``, which is facebook/sam3's; 849 M parameters) with random
weights, built with keras-hub's own classes and corrected as the server
corrects it: the checkpoint cannot be downloaded here, and the cost does not
depend on the weights. ``tiny`` is ``sam-backend tiny-preset sam3``.

- ``f32``: build time, one vision encode (after one warm-up encode), then each
  phrase's decode on the cached features (the first phrase also pays the text
  encoder's and decoder's first call), and the process's peak memory.
- ``bf16``: the vision encoder under bfloat16 autocast (one call, its first),
  and how far its masks agree with float32's: IoU of each query's mask
  (logit > 0) for one phrase.
- ``store``: a second phrase on an image whose features are only in the disk
  store (a restarted worker): read + decode.
- ``task``: what ``preannotate --mode concepts`` spends on one task of a
  project with ``--labels`` labels: encode, one decode per label, regions.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import sam_backend  # noqa: E402,F401
from sam_backend.sam3.engine import ConceptEngine  # noqa: E402

PHRASES = ["bottle", "a red car", "the cat on the left", "cell nucleus", "dog"]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def build(model: str, workdir: Path) -> ConceptEngine:
    if model == "tiny":
        from sam_backend.sam3.tiny import write_tiny_concept_preset

        return ConceptEngine.from_preset(str(write_tiny_concept_preset(workdir / "tiny")))
    from keras_hub.src.utils.transformers.convert_sam3 import convert_backbone_config
    from transformers import Sam3Config

    from sam_backend.sam.presets import import_keras_hub
    from sam_backend.sam3.tiny import tiny_vocabulary
    from sam_backend.sam3.tokenizer import EOS, ConceptTokenizer, clip_bpe

    keras_hub = import_keras_hub()
    cls = keras_hub.models.SAM3PromptableConceptBackbone
    backbone = cls(**convert_backbone_config({"detector_config": Sam3Config().to_dict()}, cls))
    vocabulary, merges = tiny_vocabulary()
    tokenizer = ConceptTokenizer(clip_bpe(vocabulary, merges), int(backbone.text_encoder.max_sequence_length),
                                 vocabulary[EOS])
    return ConceptEngine(backbone, tokenizer, preset="sam3_pcs-random")


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sam3", "tiny"), default="sam3")
    parser.add_argument("--phrases", type=int, default=3)
    parser.add_argument("--labels", type=int, default=2, help="labels of the pre-annotated project (task part)")
    parser.add_argument("--size", default="1280x960", help="image WIDTHxHEIGHT")
    parser.add_argument("--parts", nargs="+", default=["f32", "store", "task", "bf16"])
    args = parser.parse_args()
    import torch

    width, height = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    figures: dict[str, object] = {"model": args.model, "threads": torch.get_num_threads(), "image": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        engine, seconds = timed(build, args.model, Path(tmp))
        figures["parameters_m"] = round(engine.model.count_params() / 1e6, 1)
        figures["build_s"] = round(seconds, 1)
        engine.encode(image)  # first call: allocations, kernel choices
        embedding, seconds = timed(engine.encode, image)
        figures["vision_encode_s"] = round(seconds, 2)
        decodes = [timed(engine.find, embedding, phrase=phrase)[1] for phrase in PHRASES[: args.phrases]]
        figures["first_phrase_s"] = round(decodes[0], 2)
        figures["further_phrase_s"] = round(statistics.median(decodes[1:] or decodes), 2)
        figures["peak_memory_gb_f32"] = round(peak_gb(), 2)
        print(json.dumps(figures), flush=True)

        if "store" in args.parts:
            from sam_backend.embeddings.disk_store import DiskStore
            from sam_backend.embeddings.tiers import EmbeddingTiers

            store = DiskStore(Path(tmp) / "store", budget_bytes=8 << 30)
            EmbeddingTiers(engine, store=store, fingerprint="be0c4be0c4").embedding_for("img", image)
            restarted = EmbeddingTiers(engine, store=store, fingerprint="be0c4be0c4")  # an empty memory tier
            calls = engine.encoder_calls
            started = time.perf_counter()
            stored = restarted.embedding_for("img", image)
            engine.find(stored, phrase=PHRASES[1])
            figures["second_phrase_from_store_s"] = round(time.perf_counter() - started, 2)
            figures["store_entry_mb"] = round(store.stats().bytes / 1e6, 1)
            assert engine.encoder_calls == calls, "the store served the features"
            print(json.dumps(figures), flush=True)

        if "task" in args.parts:
            from sam_backend.labelstudio.labelconfig import parse_label_config
            from sam_backend.labelstudio.output import OutputSettings
            from sam_backend.server.concepts import ConceptRegions, instances_to_regions

            labels = [f"Label{i}" for i in range(args.labels)]
            config = parse_label_config('<View><Image name="image" value="$image"/><BrushLabels name="brush" '
                                        'toName="image">' + "".join(f'<Label value="{label}"/>' for label in labels)
                                        + "</BrushLabels></View>")
            started = time.perf_counter()
            task_embedding = engine.encode(image)
            regions = ConceptRegions()
            for label, phrase in zip(labels, PHRASES):
                instances_to_regions(engine.find(task_embedding, phrase=phrase), label, config, OutputSettings(),
                                     regions=regions)
            figures["preannotate_task_s"] = round(time.perf_counter() - started, 2)
            figures["preannotate_task_labels"] = args.labels
            print(json.dumps(figures), flush=True)
        if "bf16" in args.parts:
            from sam_backend.sam.engine import Embedding

            f32 = engine.raw_outputs(embedding, phrase=PHRASES[0])["pred_masks"] > 0
            engine.precision = "bfloat16"
            bf16_embedding, seconds = timed(engine.encode, image)  # one call: on CPUs without bf16 units it is slow
            engine.precision = "float32"
            figures["vision_encode_s_bf16"] = round(seconds, 2)
            bf16 = engine.raw_outputs(Embedding(bf16_embedding.features, embedding.frame),
                                      phrase=PHRASES[0])["pred_masks"] > 0
            union = np.logical_or(f32, bf16).sum(axis=(1, 2))
            ious = np.where(union > 0, np.logical_and(f32, bf16).sum(axis=(1, 2)) / np.maximum(union, 1), 1.0)
            figures["bf16_mask_iou_mean"] = round(float(ious.mean()), 4)
            figures["bf16_mask_iou_min"] = round(float(ious.min()), 4)
            print(json.dumps(figures), flush=True)

        figures["peak_memory_gb"] = round(peak_gb(), 2)
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
