"""Masks without a click: prompts already on a task, and automatic mask generation."""

from __future__ import annotations

import numpy as np
import pytest

from sam_backend.sam.automask import (
    AutoMaskGenerator,
    AutoMaskSettings,
    box_nms,
    masks_to_boxes,
    point_grid,
    remove_small_regions,
    stability_scores,
)
from sam_backend.errors import BadRequestError
from sam_backend.labelstudio.labelconfig import parse_label_config
from sam_backend.server.prelabel import PrelabelSettings, predict_task_masks
from sam_backend.labelstudio.regions import prompts_from_task
from sam_backend.sam.synthetic import bounding_box, iou

from test_demo_preset import BLUE, GREEN, RED, YELLOW, box_at, disc_at, scene_with
from test_server import LABEL_CONFIG, decode_brush

CONFIG = parse_label_config(LABEL_CONFIG)


def rectangle(x, y, w, h, label="Object", name="box", **extra):
    return {"from_name": name, "to_name": "image", "type": "rectanglelabels", "original_width": 200,
            "original_height": 100, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                              "rectanglelabels": [label]}, **extra}


def point(x, y, label="Object", positive=None):
    region = {"from_name": "keypoint", "to_name": "image", "type": "keypointlabels",
              "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}
    if positive is not None:
        region["is_positive"] = positive
    return region


# ------------------------------------------------------------ task prompts


def test_each_box_of_an_imported_prediction_is_a_prompt_with_its_label():
    task = {"predictions": [{"model_version": "detector", "result": [
        rectangle(10, 20, 30, 40, "Object"), rectangle(50, 50, 10, 10, "Other", name="detector_boxes")]}]}
    prompts = prompts_from_task(task, CONFIG, (100, 200))
    assert [p.box for p in prompts] == [[20.0, 20.0, 80.0, 60.0], [100.0, 50.0, 120.0, 60.0]]
    assert [p.label for p in prompts] == ["Object", "Other"]


def test_keypoints_of_one_label_form_one_prompt():
    task = {"annotations": [{"result": [
        point(10, 10, "Cat"), point(20, 20, "Dog"), point(30, 30, "Cat", positive=False), point(40, 40, "Cat")]}]}
    prompts = prompts_from_task(task, CONFIG, (100, 200))
    cats, dogs = prompts
    assert cats.label == "Cat" and cats.points == [[20.0, 10.0], [60.0, 30.0], [80.0, 40.0]]
    assert cats.labels == [1, 0, 1]
    assert dogs.label == "Dog" and dogs.points == [[40.0, 20.0]]


def test_annotations_win_over_predictions_and_the_newest_wins():
    task = {
        "annotations": [
            {"id": 1, "created_at": "2026-01-01T00:00:00Z", "result": [rectangle(0, 0, 10, 10)]},
            {"id": 2, "created_at": "2026-02-01T00:00:00Z", "result": [rectangle(50, 50, 10, 10)]},
            {"id": 3, "created_at": "2026-03-01T00:00:00Z", "was_cancelled": True, "result": [rectangle(80, 80, 5, 5)]},
        ],
        "predictions": [{"result": [rectangle(20, 20, 10, 10)]}],
    }
    assert [p.box for p in prompts_from_task(task, CONFIG, (100, 200))] == [[100.0, 50.0, 120.0, 60.0]]


def test_regions_of_other_images_brushes_and_lone_negative_points_give_nothing():
    task = {"annotations": [{"result": [
        {**rectangle(0, 0, 10, 10), "to_name": "other_image"},
        {"from_name": "brush", "to_name": "image", "type": "brushlabels", "value": {"rle": [1]}},
        point(10, 10, positive=False),
    ]}], "predictions": "not a list"}
    assert prompts_from_task(task, CONFIG, (100, 200)) == []


def test_a_malformed_imported_box_is_a_clear_error():
    task = {"predictions": [{"result": [{**rectangle(0, 0, 10, 10), "value": {"x": "left"}}]}]}
    with pytest.raises(BadRequestError, match="value.x"):
        prompts_from_task(task, CONFIG, (100, 200))


# ------------------------------------------------------- mask generation parts


def test_point_grid_centres_cells_of_non_square_images():
    grid = point_grid(2, (100, 300))
    assert grid.tolist() == [[75.0, 25.0], [225.0, 25.0], [75.0, 75.0], [225.0, 75.0]]


def test_stability_score_is_high_for_sharp_and_low_for_soft_logits():
    import torch

    sharp = torch.full((1, 10, 10), -10.0)
    sharp[0, 2:8, 2:8] = 10.0
    soft = torch.linspace(-3, 3, 100).reshape(1, 10, 10)
    assert stability_scores(sharp, 0.0, 1.0).item() == 1.0
    assert stability_scores(soft, 0.0, 1.0).item() < 0.6


def test_masks_to_boxes_and_nms():
    import torch

    masks = torch.zeros((3, 20, 30), dtype=torch.bool)
    masks[0, 2:10, 5:15] = True
    masks[1, 2:10, 5:16] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[5, 2, 15, 10], [5, 2, 16, 10], [0, 0, 0, 0]]
    # The duplicate with the lower score goes; the disjoint (empty) one stays.
    assert box_nms(boxes, np.array([0.8, 0.9, 0.5]), 0.7) == [1, 2]


def test_remove_small_regions_fills_holes_and_drops_islands():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[10:12, 10:12] = False  # a hole
    mask[35:37, 35:37] = True  # an island
    cleaned = remove_small_regions(mask, 10)
    assert cleaned[10:12, 10:12].all() and not cleaned[35:37, 35:37].any()
    assert cleaned[5:30, 5:30].all()


def test_settings_from_environment_and_extra_params():
    settings = PrelabelSettings.from_sources(
        {"SAM_PRELABEL": "boxes-then-auto", "SAM_AUTO_POINTS_PER_SIDE": "12", "SAM_AUTO_LABEL": "Object"},
        {"auto": {"pred_iou_thresh": 0.5}},
    )
    assert (settings.mode, settings.auto.points_per_side, settings.auto.pred_iou_thresh) == ("boxes-then-auto", 12, 0.5)
    assert settings.auto_label == "Object"
    assert PrelabelSettings.from_sources({"SAM_PRELABEL": "auto"}, {"prelabel": "off"}).mode == "off"
    with pytest.raises(BadRequestError, match="Unknown pre-labeling mode"):
        PrelabelSettings.from_sources({}, {"prelabel": "everything"})
    with pytest.raises(BadRequestError, match="points_per_side must be a number"):
        PrelabelSettings.from_sources({"SAM_AUTO_POINTS_PER_SIDE": "many"}, {})
    with pytest.raises(BadRequestError, match="max_area"):
        AutoMaskSettings.from_mapping({"min_area": 0.5, "max_area": 0.1})


# ------------------------------------------------------- with the demo preset

SIZE = (300, 460)


@pytest.fixture(scope="module")
def demo():
    from sam_backend.sam.engine import SamEngine

    return SamEngine.from_preset("demo")


@pytest.fixture(scope="module")
def four_shapes():
    return scene_with(SIZE, [
        disc_at(SIZE, 0.2, 0.3, color=RED),
        box_at(SIZE, 0.7, 0.25, color=BLUE),
        disc_at(SIZE, 0.75, 0.75, 0.14, color=GREEN, fill="stripes"),
        box_at(SIZE, 0.25, 0.75, half=(0.12, 0.12), angle=0.5, color=YELLOW),
    ])


def percent_box(mask, size=SIZE):
    x0, y0, x1, y1 = bounding_box(mask)
    h, w = size
    return 100 * x0 / w, 100 * y0 / h, 100 * (x1 - x0) / w, 100 * (y1 - y0) / h


def test_imported_boxes_become_masks_with_their_labels_in_place(demo, four_shapes):
    boxes = [rectangle(*percent_box(four_shapes.masks[i]), label) for i, label in ((1, "Dog"), (2, "Cat"))]
    for region in boxes:
        region["original_width"], region["original_height"] = SIZE[1], SIZE[0]
    task = {"id": 1, "predictions": [{"model_version": "detector-v3", "result": boxes}]}
    embedding = demo.encode(four_shapes.image)
    found = predict_task_masks(demo, embedding, task, CONFIG, PrelabelSettings(mode="boxes"))
    assert found.source == "boxes" and len(found.regions) == 2
    for region, index, label in zip(found.regions, (1, 2), ("Dog", "Cat")):
        assert region["value"]["brushlabels"] == [label]
        assert (region["original_height"], region["original_width"]) == SIZE
        assert iou(decode_brush(region), four_shapes.masks[index]) >= 0.8


def test_automatic_masks_find_each_separate_shape_once(demo, four_shapes):
    settings = AutoMaskSettings(pred_iou_thresh=0.8, stability_score_thresh=0.9)
    masks = AutoMaskGenerator(demo, settings).generate(demo.encode(four_shapes.image))
    assert len(masks) == len(four_shapes.masks)
    matches = np.array([[iou(m.mask, truth) for truth in four_shapes.masks] for m in masks])
    # One mask per shape: every shape's best match is a different mask, and good.
    assert sorted(matches.argmax(axis=0).tolist()) == list(range(len(masks)))
    assert matches.max(axis=0).min() >= 0.8, matches.round(3)
    for m in masks:
        assert np.allclose(m.box, bounding_box(m.mask))


def test_boxes_then_auto_falls_back_to_automatic_masks(demo, four_shapes):
    embedding = demo.encode(four_shapes.image)
    settings = PrelabelSettings.from_sources({}, {"prelabel": "boxes-then-auto", "pred_iou_thresh": 0.8,
                                                  "stability_score_thresh": 0.9, "auto_label": "Cat"})
    found = predict_task_masks(demo, embedding, {"id": 2, "data": {}}, CONFIG, settings)
    assert found.source == "auto" and len(found.regions) == 4
    assert {r["value"]["brushlabels"][0] for r in found.regions} == {"Cat"}
    assert predict_task_masks(demo, embedding, {"id": 2}, CONFIG, PrelabelSettings(mode="boxes")).regions == []
    assert predict_task_masks(demo, embedding, {"id": 2}, CONFIG, PrelabelSettings(mode="off")).regions == []


def test_boxes_decoded_together_equal_boxes_decoded_one_by_one(demo, four_shapes):
    embedding = demo.encode(four_shapes.image)
    boxes = [bounding_box(m) for m in four_shapes.masks]
    together = demo.decode_boxes(embedding, boxes)
    for box, prediction in zip(boxes, together):
        alone = demo.decode(embedding, box=box)
        assert np.allclose(prediction.low_res_logits, alone.low_res_logits, atol=1e-4)
        assert abs(prediction.score - alone.score) < 1e-4 and (prediction.mask == alone.mask).all()


def test_images_encoded_together_equal_images_encoded_one_by_one(tiny_segmenter, tmp_path, rng):
    from conftest import random_image
    from sam_backend.embeddings.settings import open_store
    from sam_backend.embeddings.tiers import EmbeddingTiers
    from sam_backend.sam.engine import SamEngine

    tiers = EmbeddingTiers(SamEngine(tiny_segmenter, preset="tiny"), store=open_store(cache_dir=str(tmp_path / "store")))
    images = [random_image(rng, 60, 100), random_image(rng, 120, 80), random_image(rng, 64, 64)]
    tiers.embedding_for("b", images[1])
    calls = tiers.engine.encoder_calls
    together = tiers.embeddings_for_many([("a", images[0]), ("b", images[1]), ("c", lambda: images[2])])
    assert tiers.engine.encoder_calls == calls + 1  # "b" was cached; "a" and "c" in one call
    for key, image, embedding in zip("abc", images, together):
        alone = SamEngine(tiny_segmenter, preset="tiny").encode(image)
        assert embedding.frame == alone.frame
        assert np.allclose(embedding.features.cpu().numpy(), alone.features.cpu().numpy(), atol=2e-2)
        assert tiers.embedding_for(key, image) is embedding  # now in memory
    tiers.memory.clear()
    tiers.embeddings_for_many([("a", images[0]), ("c", images[2])])
    assert tiers.engine.encoder_calls == calls + 1  # the store kept them
