"""The click path: the torch click decoder gives keras-hub's masks, its caches follow the weights, warm-up.

Every prompt kind is decoded twice on the same embedding, once through the
torch click decoder (``SamEngine``'s default) and once through keras-hub's
own ``SAMPromptEncoder`` and ``SAMMaskDecoder`` (an engine with the click
decoder turned off), on the tiny test model and on a random model with the
decoder of the SA-1B checkpoints (256 channels, 64x64 embedding, 8 heads).
"""

import logging
import threading

import numpy as np
import pytest
import torch

from conftest import TINY_INPUT, random_image
from sam_backend.sam import decoder as click_decoder
from sam_backend.sam import engine as engine_module
from sam_backend.sam.engine import Embedding, SamEngine
from sam_backend.sam.transforms import Frame

#: Logits may differ by float rounding only (summation order).
LOGITS_ATOL = 1e-4
#: Where keras-hub's upsampled logit is this close to the threshold, rounding may flip a pixel.
MASK_MARGIN = 1e-3


def sa1b_decoder_segmenter():
    """A random SAM whose prompt encoder and mask decoder have SA-1B's sizes (a tiny image encoder)."""
    from sam_backend.sam.architectures import SamArchitecture, build_sam

    return build_sam(SamArchitecture(
        input_size=1024, encoder_width=16, encoder_depth=1, encoder_heads=2, encoder_mlp=32, window_size=16,
        global_layers=(0,), embed_dim=256, decoder_heads=8, decoder_mlp=2048,
    ), seed=3)


@pytest.fixture(scope="module")
def sa1b_segmenter():
    return sa1b_decoder_segmenter()


@pytest.fixture(params=["tiny", "sa1b_decoder"])
def engines(request, tiny_segmenter):
    """(fast engine, keras-hub engine, embedding) on one model and image."""
    if request.param == "tiny":
        segmenter, size = tiny_segmenter, (90, 200)
    else:
        segmenter, size = request.getfixturevalue("sa1b_segmenter"), (1080, 1920)
    fast, keras_path = SamEngine(segmenter), SamEngine(segmenter)
    keras_path._click_decoder = False
    features = torch.randn(
        (1, *fast.embedding_size, fast.embedding_channels), generator=torch.Generator().manual_seed(7)
    )
    return fast, keras_path, Embedding(features, Frame.for_image(size, fast.input_size))


def prompts(size):
    """Each kind of prompt, in pixels of an image of ``size`` (height, width)."""
    h, w = size
    box = [0.2 * w, 0.1 * h, 0.7 * w, 0.8 * h]
    return {
        "point": dict(points=[[0.4 * w, 0.5 * h]], labels=[1]),
        "point_single": dict(points=[[0.4 * w, 0.5 * h]], labels=[1], multimask=False),
        "points": dict(points=[[0.2 * w, 0.3 * h], [0.6 * w, 0.6 * h]], labels=[1, 1]),
        "negative_points": dict(points=[[0.2 * w, 0.3 * h], [0.75 * w, 0.7 * h]], labels=[1, 0]),
        "box": dict(box=box),
        "box_multimask": dict(box=box, multimask=True),
        "box_and_points": dict(points=[[0.3 * w, 0.4 * h], [0.25 * w, 0.15 * h]], labels=[1, 0], box=box),
    }


def assert_same_prediction(got, expected):
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(got.low_res_logits, expected.low_res_logits, atol=LOGITS_ATOL)
    from sam_backend.sam.transforms import postprocess_logits

    logits = postprocess_logits(torch.from_numpy(expected.low_res_logits), expected.frame).numpy()
    decided = np.abs(logits) > MASK_MARGIN
    np.testing.assert_array_equal(got.masks[decided], expected.masks[decided])
    assert (got.masks != expected.masks).mean() < 1e-6  # a pixel or so where the logit is ~0
    np.testing.assert_array_equal(got.mask, got.masks[0])


@pytest.mark.parametrize("kind", sorted(prompts((1, 1))))
def test_every_prompt_kind_gives_keras_hubs_masks(engines, kind):
    fast, keras_path, embedding = engines
    prompt = prompts(embedding.frame.original_size)[kind]
    got = fast.decode(embedding, **prompt)
    assert fast._click_decoder  # the torch path really ran
    assert_same_prediction(got, keras_path.decode(embedding, **prompt))


def test_refinement_with_mask_input_gives_keras_hubs_masks(engines):
    fast, keras_path, embedding = engines
    prompt = prompts(embedding.frame.original_size)["negative_points"]
    previous = keras_path.decode(embedding, **prompts(embedding.frame.original_size)["point"]).low_res_logits[0]
    got = fast.decode(embedding, mask_input=previous, **prompt)
    assert_same_prediction(got, keras_path.decode(embedding, mask_input=previous, **prompt))


def test_decode_boxes_and_decode_batch_give_keras_hubs_outputs(engines):
    fast, keras_path, embedding = engines
    h, w = embedding.frame.original_size
    boxes = [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.3 * w, 0.2 * h, 0.9 * w, 0.9 * h], [0, 0, w, h]]
    for got, expected in zip(fast.decode_boxes(embedding, boxes), keras_path.decode_boxes(embedding, boxes)):
        assert_same_prediction(got, expected)

    # Automatic masks: a batch of single points, all four outputs.
    points = embedding.frame.to_model(np.array([[[0.2 * w, 0.2 * h]], [[0.5 * w, 0.5 * h]]], np.float32))
    labels = np.ones((2, 1), np.float32)
    got, expected = fast.decode_batch(embedding.features, points, labels), keras_path.decode_batch(
        embedding.features, points, labels
    )
    assert got[0].shape == expected[0].shape == (2, 4, *fast.mask_input_size)
    torch.testing.assert_close(got[0], expected[0], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)


def test_only_the_returned_masks_are_decoded_and_only_the_sent_one_upsampled(engine, rng, monkeypatch):
    embedding = engine.encode(random_image(rng, 90, 200))
    assert engine._get_click_decoder()  # built and checked against keras-hub's layers (all four masks)
    computed, upsampled = [], []
    real_masks, real_postprocess = click_decoder.ClickDecoder._masks, engine_module.postprocess_logits

    def masks(self, w, queries, keys, outputs, batch):
        computed.append(list(outputs))
        return real_masks(self, w, queries, keys, outputs, batch)

    def postprocess(logits, frame):
        upsampled.append(len(logits))
        return real_postprocess(logits, frame)

    monkeypatch.setattr(click_decoder.ClickDecoder, "_masks", masks)
    monkeypatch.setattr(engine_module, "postprocess_logits", postprocess)

    multimask = engine.decode(embedding, points=[[50, 40]], labels=[1])
    single = engine.decode(embedding, points=[[50, 40], [150, 60]], labels=[1, 0])
    assert computed == [[1, 2, 3], [0]]
    assert multimask.mask.shape == (90, 200) and upsampled == [1]
    np.testing.assert_array_equal(multimask.masks_at([2, 0]), multimask.masks[[2, 0]])
    assert single.mask.shape == (90, 200)


def test_the_image_cache_follows_the_embedding_not_its_address(engine, rng):
    keras_path = SamEngine(engine.model)
    keras_path._click_decoder = False
    frame = Frame.for_image((90, 200), engine.input_size)
    shape = (1, *engine.embedding_size, engine.embedding_channels)
    embeddings = [Embedding(torch.randn(shape), frame) for _ in range(click_decoder.DEFAULT_IMAGE_CACHE + 2)]
    click = dict(points=[[60, 40]], labels=[1])
    for _ in range(2):  # the second round hits the cache for the last images, misses for the first
        for embedding in embeddings:
            assert_same_prediction(engine.decode(embedding, **click), keras_path.decode(embedding, **click))
    decoder = engine._click_decoder
    assert decoder._current() is decoder._current()  # the weights are read once, not per click
    assert len(decoder._images) == click_decoder.DEFAULT_IMAGE_CACHE
    assert embeddings[-1].features is decoder._images[id(embeddings[-1].features)].features()
    # A new tensor (even at a freed one's address) is a new image.
    for _ in range(3):
        embedding = Embedding(torch.randn(shape), frame)
        assert_same_prediction(engine.decode(embedding, **click), keras_path.decode(embedding, **click))
        del embedding


def test_clicks_from_several_threads_get_their_own_images_masks(engine):
    keras_path = SamEngine(engine.model)
    keras_path._click_decoder = False
    frame = Frame.for_image((90, 200), engine.input_size)
    shape = (1, *engine.embedding_size, engine.embedding_channels)
    embeddings = [Embedding(torch.randn(shape), frame) for _ in range(8)]
    click = dict(points=[[60, 40]], labels=[1])
    expected = [keras_path.decode(e, **click).low_res_logits for e in embeddings]
    errors = []

    def annotator(offset):
        try:
            for i in range(16):
                j = (i + offset) % len(embeddings)
                np.testing.assert_allclose(engine.decode(embeddings[j], **click).low_res_logits, expected[j],
                                           atol=LOGITS_ATOL)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors


def keras_twin(engine):
    twin = SamEngine(engine.model)
    twin._click_decoder = False
    return twin


def test_assigned_weights_are_decoded_with_the_new_weights():
    """Loading weights between two clicks must not leave the per-model or per-image caches stale."""
    from conftest import build_tiny_segmenter

    model = build_tiny_segmenter(seed=5)  # changed below: not the shared fixture
    engine, keras_path = SamEngine(model), keras_twin(SamEngine(model))
    embedding = engine.encode(random_image(np.random.default_rng(0), 90, 200))
    click = dict(points=[[60, 40]], labels=[1])
    before = engine.decode(embedding, **click)

    backbone = model.backbone
    for variable in (
        backbone.prompt_encoder.no_mask_embed.embeddings,  # the per-image sum
        backbone.prompt_encoder.positional_embedding_layer.positional_encoding_gaussian_matrix,  # the grid
        backbone.mask_decoder.transformer.layers[0].cross_attention_token_to_image.key_proj.kernel,
    ):
        variable.assign(variable.value * 1.5 + 0.1)
    after = engine.decode(embedding, **click)
    assert not np.allclose(after.low_res_logits, before.low_res_logits, atol=1e-3)
    assert_same_prediction(after, keras_path.decode(embedding, **click))


def test_training_through_decode_tensors_keeps_autograd_and_fresh_caches():
    """tools/train_demo_preset.py: decode_tensors on keras-hub's layers, a torch optimizer, then clicks."""
    from conftest import build_tiny_segmenter

    model = build_tiny_segmenter(seed=6)
    engine, keras_path = SamEngine(model), keras_twin(SamEngine(model))
    embedding = engine.encode(random_image(np.random.default_rng(0), 90, 200))
    click = dict(points=[[60, 40]], labels=[1])
    before = engine.decode(embedding, **click)  # fills the caches

    params = [v.value for part in (model.backbone.prompt_encoder, model.backbone.mask_decoder)
              for v in part.trainable_variables]
    optimizer = torch.optim.SGD(params, lr=0.5)
    points = embedding.frame.to_model(np.array([[[60.0, 40.0]]], np.float32))
    logits, iou = engine.decode_tensors(embedding.features.clone(), points, np.ones((1, 1), np.float32))
    assert logits.requires_grad and iou.requires_grad
    (logits.square().mean() + iou.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    optimizer.step()

    after = engine.decode(embedding, **click)
    assert not np.allclose(after.low_res_logits, before.low_res_logits, atol=1e-3)
    assert_same_prediction(after, keras_path.decode(embedding, **click))


def test_layers_it_cannot_reproduce_fall_back_to_keras_hub(engine, rng, monkeypatch, caplog):
    def unsupported(*args, **kwargs):
        raise click_decoder.UnsupportedLayers("a future keras-hub")

    monkeypatch.setattr(engine_module, "ClickDecoder", unsupported)
    embedding = engine.encode(random_image(rng, 90, 200))
    with caplog.at_level(logging.WARNING, logger="sam_backend"):
        got = engine.decode(embedding, points=[[60, 40]], labels=[1])
    assert engine._click_decoder is False and "a future keras-hub" in caplog.text
    assert_same_prediction(got, keras_twin(engine).decode(embedding, points=[[60, 40]], labels=[1]))


def test_warm_up_falls_back_when_the_click_decoder_disagrees(engine, monkeypatch, caplog):
    real_call = click_decoder.ClickDecoder.__call__

    def off_by_a_little(self, *args, **kwargs):
        logits, iou = real_call(self, *args, **kwargs)
        return logits + 0.01, iou

    monkeypatch.setattr(click_decoder.ClickDecoder, "__call__", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger="sam_backend"):
        engine.warm_up()
    assert engine._click_decoder is False and "differs from keras-hub's layers" in caplog.text


def test_warm_up_encodes_and_decodes_every_prompt_kind_without_counting(engine, monkeypatch):
    kinds = []
    real_decode = SamEngine._decode_outputs

    def recording(self, features, points, labels, boxes, mask_inputs, outputs):
        kinds.append((points.shape[:2], boxes is not None, mask_inputs is not None))
        return real_decode(self, features, points, labels, boxes, mask_inputs, outputs)

    monkeypatch.setattr(SamEngine, "_decode_outputs", recording)
    encodes = []
    real_encoder = engine._encoder
    engine._encoder = lambda x: encodes.append(tuple(x.shape)) or real_encoder(x)
    engine.warm_up()
    assert encodes == [(1, TINY_INPUT, TINY_INPUT, 3)]
    assert {(n, has_box, has_mask) for (_, n), has_box, has_mask in kinds} >= {
        (1, False, False), (2, False, False), (0, True, False), (2, True, False), (2, True, True)
    }
    assert any(batch == 2 for (batch, _), _, _ in kinds)  # decode_boxes
    assert engine.encoder_calls == 0
    assert engine.stats.encode_seconds._sum.get() == 0 and engine.stats.decode_seconds._sum.get() == 0
    assert engine._click_decoder  # it agreed with keras-hub's layers


def test_health_says_loading_while_the_warm_up_encodes(engine, tmp_path):
    from sam_backend.labelstudio.media import MediaFetcher
    from sam_backend.server.app import create_app
    from sam_backend.server.backend import ModelHolder, SamBackend

    encoding, release = threading.Event(), threading.Event()
    real_encoder = engine._encoder

    def blocking_encoder(x):
        encoding.set()
        assert release.wait(30)
        return real_encoder(x)

    engine._encoder = blocking_encoder
    holder = ModelHolder("tiny", loader=lambda preset: engine)
    client = create_app(SamBackend(holder=holder, fetcher=MediaFetcher(cache_dir=str(tmp_path)))).test_client()
    holder.start()
    try:
        assert encoding.wait(30)
        assert holder.state == "loading" and holder.loaded_engine is None
        assert client.get("/health").get_json()["model_state"] == "loading"
    finally:
        release.set()
    assert holder.wait(60) and holder.state == "ready"
    assert client.get("/health").get_json()["model_state"] == "ready"
    assert engine.encoder_calls == 0 and engine.stats.decode_seconds._sum.get() == 0
