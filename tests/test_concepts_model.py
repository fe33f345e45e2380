"""SAM 3 concept prompts, model side: keras-hub's SAM 3 as corrected here equals Hugging Face's Sam3Model.

The parity checks load one tiny random checkpoint with both libraries
(tests/sam3_reference.py); each keras-hub defect (sam_backend/sam3/fixes.py)
has a test that fails without its fix.
"""

import importlib.util

import numpy as np
import pytest
import torch

from sam_backend.errors import PresetLoadError, PromptError
from sam_backend.sam3 import ConceptEngine, ConceptSettings, PhraseError
from sam_backend.sam3.engine import exemplar_boxes, preprocess_concept_image
from sam_backend.sam3.instances import concept_scores, select_instances
from sam_backend.sam3.roi_align import roi_align
from sam_backend.sam3.tiny import write_tiny_concept_preset
from sam3_reference import hf_outputs, reference_roi_align, without_torchvision_stand_in, write_hf_tiny_checkpoint

#: Every instance as Hugging Face's post-processing gives it: no NMS, no cleanup.
UNFILTERED = ConceptSettings(threshold=0.5, nms_iou=1.0, max_instances=100, min_region_area=0)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_sam3")
    return directory, write_hf_tiny_checkpoint(directory)


@pytest.fixture(scope="module")
def concept_engine(hf_checkpoint):
    return ConceptEngine.from_preset(str(hf_checkpoint[0]))


@pytest.fixture(scope="module")
def scene():
    """A non-square image with some structure (SAM 3 squashes it to its square input)."""
    rng = np.random.default_rng(3)
    image = (rng.random((90, 160, 3)) * 60).astype(np.uint8)
    image[20:60, 30:80] = (200, 40, 40)
    image[50:85, 110:150] = (40, 40, 220)
    return image


def hf_instances(raw: dict, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face's post_process_instance_segmentation (its image processor imports torchvision)."""
    scores = torch.from_numpy(raw["pred_logits"]).sigmoid() * torch.sigmoid(torch.tensor(raw["presence_logits"]))
    keep = scores > UNFILTERED.threshold
    probs = torch.from_numpy(raw["pred_masks"]).sigmoid()[keep]
    masks = torch.nn.functional.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0] > 0.5
    return scores[keep].numpy(), masks.numpy()


def assert_same_instances(ours, theirs_scores, theirs_masks):
    order = np.argsort(-theirs_scores, kind="stable")
    assert len(ours) == len(order) > 0
    for instance, index in zip(ours, order):
        assert abs(instance.score - theirs_scores[index]) < 1e-3
        union = np.logical_or(instance.mask, theirs_masks[index]).sum()
        assert np.logical_and(instance.mask, theirs_masks[index]).sum() / union >= 0.97


@pytest.mark.parametrize("phrase", ["cell", "a bottle", "Nucleus of a cell!"])
def test_text_prompts_match_hugging_face(concept_engine, hf_checkpoint, scene, phrase):
    model = hf_checkpoint[1]
    embedding = concept_engine.encode(scene)
    ours = concept_engine.raw_outputs(embedding, phrase)
    pixels = preprocess_concept_image(scene, concept_engine.input_size).transpose(2, 0, 1)[None]
    theirs = hf_outputs(model, np.ascontiguousarray(pixels), concept_engine.tokenizer(phrase))
    np.testing.assert_allclose(concept_scores(ours["pred_logits"], ours["presence_logits"]),
                               concept_scores(theirs["pred_logits"], theirs["presence_logits"]), atol=1e-3)
    np.testing.assert_allclose(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-4)
    found = concept_engine.find(embedding, phrase=phrase, settings=UNFILTERED)
    assert_same_instances(found.instances, *hf_instances(theirs, scene.shape[:2]))


@pytest.mark.parametrize("labels", [[True], [True, False]], ids=["exemplar", "exemplar-and-counter-example"])
def test_exemplar_boxes_match_hugging_face(concept_engine, hf_checkpoint, scene, labels):
    model = hf_checkpoint[1]
    boxes = [[30, 20, 80, 60], [110, 50, 150, 85]][: len(labels)]
    embedding = concept_engine.encode(scene)
    ours = concept_engine.raw_outputs(embedding, boxes=boxes, box_labels=labels)
    pixels = preprocess_concept_image(scene, concept_engine.input_size).transpose(2, 0, 1)[None]
    theirs = hf_outputs(model, np.ascontiguousarray(pixels), concept_engine.tokenizer("visual"),
                        boxes=exemplar_boxes(boxes, scene.shape[:2]), box_labels=[int(v) for v in labels])
    np.testing.assert_allclose(concept_scores(ours["pred_logits"], ours["presence_logits"]),
                               concept_scores(theirs["pred_logits"], theirs["presence_logits"]), atol=1e-3)
    found = concept_engine.find(embedding, boxes=boxes, box_labels=labels, settings=UNFILTERED)
    assert_same_instances(found.instances, *hf_instances(theirs, scene.shape[:2]))


def test_the_text_encoder_is_causal(concept_engine):
    """Defect 1: a token's features must not depend on the tokens after it (CLIP's causal mask)."""
    from keras import ops

    first, second = concept_engine.tokenizer("cell"), concept_engine.tokenizer("cell nucleus")
    encoder = concept_engine.model.text_encoder
    a = ops.convert_to_numpy(encoder(first.ids[None], first.mask[None].astype(bool)))
    b = ops.convert_to_numpy(encoder(second.ids[None], second.mask[None].astype(bool)))
    shared = 2  # the start token and "cell" come before anything that differs
    np.testing.assert_allclose(a[0, :shared], b[0, :shared], atol=1e-6)


def test_layer_norms_outside_the_encoders_use_the_reference_epsilon(concept_engine):
    """Defect 2: torch's nn.LayerNorm default (1e-5) in the DETR, geometry, scoring and mask parts."""
    import keras

    backbone = concept_engine.model
    parts = (backbone.geometry_encoder, backbone.detr_encoder, backbone.detr_decoder, backbone.mask_decoder,
             backbone.dot_product_scoring)
    norms = [layer for part in parts for layer in part._flatten_layers(include_self=True, recursive=True)
             if isinstance(layer, keras.layers.LayerNormalization)]
    assert norms and all(norm.epsilon == 1e-5 for norm in norms)


def test_a_batch_of_two_box_prompts_equals_each_alone(concept_engine, scene):
    """Defect 3: the geometry encoder's padding mask broke batches of more than one."""
    from keras import ops

    embedding = concept_engine.encode(scene)
    backbone = concept_engine.model
    with torch.inference_mode():
        hidden, positions = backbone.vision_encoder.vision_neck(embedding.features)

        def encode(rows, labels):
            rows, labels = ops.convert_to_tensor(np.asarray(rows, np.float32)), ops.convert_to_tensor(labels)
            batch = rows.shape[0]
            features = ops.repeat(hidden[-2], batch, axis=0)
            encodings = ops.repeat(positions[-2], batch, axis=0)
            out, _ = backbone.geometry_encoder(rows, ops.not_equal(labels, -10), labels,
                                               fpn_hidden_states=features, fpn_position_encodings=encodings)
            return ops.convert_to_numpy(out)

        one = [[[0, 0.3, 0.4, 0.2, 0.3]], [[0, 0.7, 0.6, 0.3, 0.2]]]
        alone = [encode([rows], np.array([[1]], np.int32)) for rows in one]
        batch_rows = [[[0, 0.3, 0.4, 0.2, 0.3]], [[1, 0.7, 0.6, 0.3, 0.2]]]
        together = encode(batch_rows, np.array([[1], [1]], np.int32))
    np.testing.assert_allclose(together[0], alone[0][0], atol=1e-5)
    np.testing.assert_allclose(together[1], alone[1][0], atol=1e-5)


def test_box_prompts_need_no_torchvision(concept_engine, scene):
    """Defect 4: keras-hub's torch path imports torchvision, which this torch has no build of."""
    with without_torchvision_stand_in():  # the stand-in of tests/meta_reference.py is not torchvision
        assert importlib.util.find_spec("torchvision") is None, "this test checks the path without torchvision"
    found = concept_engine.find(concept_engine.encode(scene), boxes=[[30, 20, 80, 60]])
    assert isinstance(found.instances, list)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_equals_torchvision_kernel(aligned):
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.standard_normal((2, 9, 11, 3)).astype(np.float32))
    rois = torch.tensor([[0, 1.2, 0.5, 7.7, 6.1], [1, 0, 0, 11, 9], [1, 3.3, 2.2, 3.6, 2.4],
                         [0, -2.0, -1.5, 4.0, 12.0], [1, 9.5, 7.5, 14.0, 10.0]])
    ours = roi_align(features, rois, (7, 7), spatial_scale=1.0, aligned=aligned)
    theirs = reference_roi_align(features.permute(0, 3, 1, 2), rois, 7, aligned=aligned).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


def test_the_tokenizer_reads_both_preset_kinds_as_clip_does(concept_engine, tmp_path):
    with without_torchvision_stand_in():
        from transformers import CLIPTokenizer

        hf = CLIPTokenizer.from_pretrained(concept_engine.preset)
    keras_preset = ConceptEngine.from_preset(str(write_tiny_concept_preset(tmp_path / "tiny")))
    for phrase in ["cell", "Cells,  a BOTTLE", "the dog's nucleus", "café 42", "x"]:
        with without_torchvision_stand_in():
            expected = hf(phrase)["input_ids"]
        for tokenizer in (concept_engine.tokenizer, keras_preset.tokenizer):
            tokens = tokenizer(phrase)
            assert tokens.ids[: len(expected)].tolist() == expected
            assert tokens.mask.sum() == len(expected)


def test_bad_phrases_and_boxes_say_what_is_wrong(concept_engine, scene):
    embedding = concept_engine.encode(scene)
    with pytest.raises(PhraseError, match="empty"):
        concept_engine.find(embedding, phrase="   ")
    with pytest.raises(PhraseError, match="at most 30"):
        concept_engine.find(embedding, phrase=" ".join(["nucleus"] * 40))
    with pytest.raises(PromptError, match="no area"):
        concept_engine.find(embedding, boxes=[[10, 10, 10, 40]])
    with pytest.raises(PromptError, match="no area"):
        concept_engine.find(embedding, boxes=[[500, 500, 600, 600]])
    with pytest.raises(PromptError, match="phrase or an exemplar box"):
        concept_engine.find(embedding)


def test_the_tiny_preset_finds_instances_at_the_image_size(tmp_path, scene):
    engine = ConceptEngine.from_preset(str(write_tiny_concept_preset(tmp_path / "tiny")))
    found = engine.find(engine.encode(scene), phrase="cell")
    assert found.instances, "the tiny preset's decisive weights make some detections pass"
    scores = [instance.score for instance in found.instances]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.5
    assert all(instance.mask.shape == scene.shape[:2] and instance.mask.any() for instance in found.instances)
    assert 0.0 <= found.presence <= 1.0


def test_a_missing_preset_says_how_to_make_one(tmp_path):
    with pytest.raises(PresetLoadError, match="tiny-preset sam3"):
        ConceptEngine.from_preset(str(tmp_path / "nowhere"))


def test_post_processing_thresholds_suppresses_caps_and_cleans():
    logits = np.full((4, 16, 16), -8.0, np.float32)
    logits[0, 2:10, 2:10] = 8.0          # best
    logits[1, 2:10, 2:11] = 8.0          # a near-duplicate of 0
    logits[2, 12:15, 12:15] = 8.0        # another object
    logits[2, 0, 15] = 8.0               # with a one-pixel island
    logits[3, 5:9, 5:9] = 8.0            # below the threshold
    query = np.array([4.0, 3.0, 2.0, -4.0])
    boxes = np.tile([[0.1, 0.1, 0.5, 0.5]], (4, 1))
    found = select_instances(logits, query, 5.0, boxes, (32, 32), ConceptSettings(min_region_area=5))
    assert [round(f.score, 3) for f in found] == [round(float(1 / (1 + np.exp(-q)) / (1 + np.exp(-5.0))), 3)
                                                  for q in (4.0, 2.0)]
    assert not found[1].mask[0:2, 30:32].any(), "the island is removed"
    np.testing.assert_allclose(found[0].box, [3.2, 3.2, 16, 16], atol=1e-4)
    capped = select_instances(logits, query, 5.0, boxes, (32, 32), ConceptSettings(max_instances=1))
    assert len(capped) == 1
    assert select_instances(logits, query, -10.0, boxes, (32, 32)) == [], "absent concept: nothing"
    with pytest.raises(ValueError, match="threshold"):
        ConceptSettings.from_mapping({"threshold": "1.5"})


def test_further_phrases_on_an_image_reuse_its_vision_neck(concept_engine, scene, monkeypatch):
    embedding = concept_engine.encode(scene)
    first = concept_engine.raw_outputs(embedding, "cell")
    neck_class = type(concept_engine.model.vision_encoder.vision_neck)
    stock, calls = neck_class.call, []
    monkeypatch.setattr(neck_class, "call", lambda self, *a, **k: calls.append(1) or stock(self, *a, **k))
    again = concept_engine.raw_outputs(embedding, "cell")
    concept_engine.raw_outputs(embedding, "a bottle")
    assert calls == [], "the neck's outputs of the image are kept"
    np.testing.assert_array_equal(first["pred_logits"], again["pred_logits"])
    for _ in range(3):  # other images push it out: only the last few are kept
        concept_engine.raw_outputs(concept_engine.encode(scene), "cell")
    concept_engine.raw_outputs(embedding, "cell")
    assert len(calls) == 4
