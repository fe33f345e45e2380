"""The engine: split encode/decode path, multimask policy, caching, prompts, presets."""

import os
import re
import time

import numpy as np
import pytest

from conftest import TINY_INPUT, random_image
from sam_backend.embeddings.tiers import EmbeddingTiers
from sam_backend.sam.engine import SamEngine, validate_prompt
from sam_backend.errors import PresetLoadError, PromptError
from sam_backend.sam.transforms import postprocess_logits, preprocess

PROMPTS = {
    "points": dict(points=[[40.0, 30.0], [120.0, 60.0]], labels=[1, 1]),
    "negative_points": dict(points=[[40.0, 30.0], [150.0, 70.0]], labels=[1, 0]),
    "box": dict(box=[20.0, 10.0, 140.0, 80.0]),
    "box_and_points": dict(points=[[60.0, 40.0], [25.0, 15.0]], labels=[1, 0], box=[20.0, 10.0, 140.0, 80.0]),
    "single_point": dict(points=[[100.0, 50.0]], labels=[1]),
}


def full_model_outputs(segmenter, engine, image, points=None, labels=None, box=None):
    """One call of keras-hub's own SAMImageSegmenter on the same preprocessed input."""
    frame = engine.encode(image).frame
    inputs = {"images": preprocess(image, engine.input_size)[None]}
    pts = np.zeros((0, 2), np.float32) if points is None else frame.to_model(np.array(points, np.float32))
    lbl = np.zeros((0,), np.float32) if labels is None else np.array(labels, np.float32)
    if box is None:  # keras-hub's documented padding point
        pts = np.concatenate([pts, np.zeros((1, 2), np.float32)])
        lbl = np.concatenate([lbl, [-1.0]]).astype(np.float32)
    else:
        inputs["boxes"] = frame.to_model(np.array(box, np.float32).reshape(2, 2))[None, None]
    inputs["points"], inputs["labels"] = pts[None], lbl[None]
    # What predict() fills in (it needs grain or TensorFlow to batch, which the install leaves out).
    inputs.setdefault("boxes", np.zeros((1, 0, 2, 2), np.float32))
    inputs["masks"] = np.zeros((1, 0, *engine.mask_input_size, 1), np.float32)
    import torch

    with torch.no_grad():
        out = segmenter(inputs)
    return out["masks"][0].cpu().numpy(), out["iou_pred"][0].cpu().numpy(), frame


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_split_path_matches_one_call_of_the_full_segmenter(name, engine, tiny_segmenter, rng):
    image = random_image(rng, 90, 200)
    prompt = PROMPTS[name]
    ref_logits, ref_iou, frame = full_model_outputs(tiny_segmenter, engine, image, **prompt)

    embedding = engine.encode(image)
    prediction = engine.decode(embedding, **prompt)

    multimask = name == "single_point"
    candidates = [1, 2, 3] if multimask else [0]
    order = sorted(candidates, key=lambda i: -ref_iou[i])
    np.testing.assert_allclose(prediction.scores, ref_iou[order], atol=1e-5)
    np.testing.assert_allclose(prediction.low_res_logits, ref_logits[order], atol=1e-4)
    import torch

    expected = postprocess_logits(torch.from_numpy(ref_logits[order]), frame).numpy() > 0
    np.testing.assert_array_equal(prediction.masks, expected)
    assert prediction.mask.shape == (90, 200)


def test_decode_many_prompts_on_one_embedding_encodes_once(engine, rng):
    image = random_image(rng, 120, 80)
    calls = []
    real_encoder = engine._encoder
    engine._encoder = lambda x: calls.append(1) or real_encoder(x)
    tiers = EmbeddingTiers(engine)
    for prompt in PROMPTS.values():
        tiers.predict(image, key="task-1/image.png", **prompt)
    tiers.embedding_for("task-1/image.png", lambda: pytest.fail("a cached image must not be loaded"))
    assert len(calls) == 1
    tiers.predict(image, key="task-2/other.png", **PROMPTS["box"])
    assert len(calls) == 2


def test_memory_cache_is_bounded_by_bytes(tiny_segmenter, rng):
    image = random_image(rng, 64, 64)
    one = SamEngine(tiny_segmenter).encode(image).nbytes
    tiers = EmbeddingTiers(SamEngine(tiny_segmenter), cache_bytes=int(2.5 * one))
    for key in "abc":
        tiers.embedding_for(key, image)
    assert "a" not in tiers.memory and "b" in tiers.memory and "c" in tiers.memory
    assert tiers.memory.nbytes <= 2.5 * one


def test_multimask_policy(engine, rng):
    embedding = engine.encode(random_image(rng, 100, 100))
    single = engine.decode(embedding, points=[[50, 50]], labels=[1])
    assert len(single.scores) == 3 and list(single.scores) == sorted(single.scores, reverse=True)
    assert single.masks.shape == (3, 100, 100)
    np.testing.assert_array_equal(single.mask, single.masks[0])
    assert len(engine.decode(embedding, points=[[50, 50], [10, 10]], labels=[1, 0]).scores) == 1
    assert len(engine.decode(embedding, points=[[50, 50]], labels=[1], box=[5, 5, 60, 60]).scores) == 1
    assert len(engine.decode(embedding, points=[[50, 50]], labels=[1], multimask=False).scores) == 1
    assert len(engine.decode(embedding, box=[5, 5, 60, 60], multimask=True).scores) == 3


def test_low_res_logits_refine_as_mask_input(engine, rng):
    embedding = engine.encode(random_image(rng, 100, 150))
    first = engine.decode(embedding, points=[[50, 50]], labels=[1])
    assert first.low_res_logits.shape[1:] == engine.mask_input_size
    refined = engine.decode(
        embedding, points=[[50, 50], [90, 20]], labels=[1, 0], mask_input=first.low_res_logits[0]
    )
    plain = engine.decode(embedding, points=[[50, 50], [90, 20]], labels=[1, 0])
    assert not np.allclose(refined.low_res_logits, plain.low_res_logits)


def test_sizes_are_read_from_the_model(engine):
    assert engine.input_size == TINY_INPUT
    assert engine.embedding_size == (TINY_INPUT // 16,) * 2
    assert engine.mask_input_size == (TINY_INPUT // 4,) * 2


def test_points_outside_the_image_are_clipped(engine, rng):
    embedding = engine.encode(random_image(rng, 90, 200))
    outside = engine.decode(embedding, points=[[-30, 500]], labels=[1])
    clipped = engine.decode(embedding, points=[[0, 90]], labels=[1])
    np.testing.assert_array_equal(outside.low_res_logits, clipped.low_res_logits)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(), "No prompt"),
        (dict(points=[[1, 2]], labels=[1, 0]), "1 points but 2 labels"),
        (dict(points=[[1, 2]], labels=[2]), "must be 1 (foreground) or 0"),
        (dict(points=[1, 2, 3], labels=[1]), "[x, y] pairs"),
        (dict(points=[[float("nan"), 2]], labels=[1]), "finite"),
        (dict(box=[10, 10, 10, 50]), "zero width or height"),
        (dict(box=[10, 30, 60, 30]), "zero width or height"),
        (dict(box=[250, 10, 300, 50]), "zero width or height"),  # entirely right of the image
        (dict(box=[1, 2, 3]), "four finite numbers"),
    ],
)
def test_bad_prompts_are_refused_clearly(prompt, message):
    with pytest.raises(PromptError, match=re.escape(message)):
        validate_prompt(prompt.get("points"), prompt.get("labels"), prompt.get("box"), (90, 200))


def test_box_corners_are_ordered(engine):
    _, _, box = validate_prompt(None, None, [60, 50, 10, 5], (90, 200))
    np.testing.assert_array_equal(box, [10, 5, 60, 50])


def test_wrong_mask_input_size_is_refused(engine, rng):
    embedding = engine.encode(random_image(rng, 50, 50))
    with pytest.raises(PromptError, match="low-resolution logits"):
        engine.decode(embedding, points=[[5, 5]], labels=[1], mask_input=np.zeros((10, 10)))


def test_loads_a_local_preset_directory(tiny_preset_dir, rng):
    engine = SamEngine.from_preset(str(tiny_preset_dir), device="cpu")
    assert engine.input_size == TINY_INPUT and engine.device_name == "cpu"
    prediction = engine.predict(random_image(rng, 70, 90), box=[5, 5, 50, 40])
    assert prediction.mask.shape == (70, 90)


def test_missing_preset_directory_fails_fast_with_guidance(tmp_path):
    with pytest.raises(PresetLoadError) as info:
        SamEngine.from_preset(str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "nowhere" in message and "does not exist" in message and "local preset directory made with save_to_preset" in message


def test_a_preset_that_is_not_sam_is_refused(tmp_path):
    from sam_backend.sam.presets import import_keras_hub

    keras_hub = import_keras_hub()
    vit = keras_hub.models.ViTDetBackbone(
        hidden_size=8, num_layers=1, intermediate_dim=8, num_heads=1,
        global_attention_layer_indices=[0], patch_size=16, num_output_channels=4,
        window_size=2, image_shape=(32, 32, 3),
    )
    vit.save_to_preset(str(tmp_path / "vitdet"))
    with pytest.raises(PresetLoadError, match="Could not load the SAM preset"):
        SamEngine.from_preset(str(tmp_path / "vitdet"))


def test_a_corrupt_preset_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PresetLoadError, match="local directory"):
        SamEngine.from_preset(str(tmp_path))


def test_shipped_preset_names_resolve_to_the_package_directory(tmp_path, monkeypatch, tiny_preset_dir):
    import shutil

    from sam_backend.sam import presets

    monkeypatch.setattr(presets, "SHIPPED_PRESETS_DIR", tmp_path)
    shutil.copytree(tiny_preset_dir, tmp_path / "mini")
    assert presets.resolve_preset("mini") == str(tmp_path / "mini")
    assert presets.resolve_preset("sam_base_sa1b") == "sam_base_sa1b"
    assert presets.shipped_presets() == ["mini"]
    with pytest.raises(PresetLoadError, match="shipped with sam-backend: mini"):
        SamEngine.from_preset(str(tmp_path / "absent"))


def test_overlapping_stderr_silencing_leaves_file_descriptor_2_as_it_was():
    """SAM and SAM 3 load in two threads: a worker once lost every later log line to /dev/null."""
    import threading

    from sam_backend.sam.presets import quiet_native_stderr

    before = os.fstat(2)
    second_waiting, first_done = threading.Event(), threading.Event()

    def first():
        with quiet_native_stderr():
            second_waiting.wait(5)
            time.sleep(0.2)  # the second one tries to silence while this one still does
        first_done.set()

    def second():
        second_waiting.set()
        with quiet_native_stderr():
            first_done.wait(1)  # and finishes after it: the order that left /dev/null behind

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for thread in threads:
        thread.join(10)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), "fd 2 left on /dev/null"

