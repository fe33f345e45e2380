"""The fused ViTDet attention gives keras-hub's results, only faster; and stands aside when it must."""

import logging

import numpy as np
import pytest

from conftest import build_tiny_segmenter, random_image

torch = pytest.importorskip("torch")
keras_hub = pytest.importorskip("keras_hub")

from sam_backend.accel import attention, attention_kernel  # noqa: E402

TOLERANCE = 1e-4


def small_vitdet(seed: int = 0, use_rel_pos: bool = True):
    """Three blocks: windowed (with padding: a 7x7 grid in 3x3 windows), global, windowed."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras_hub.models.ViTDetBackbone(
        hidden_size=32, num_layers=3, intermediate_dim=64, num_heads=2, global_attention_layer_indices=[1],
        patch_size=16, num_output_channels=16, window_size=3, image_shape=(112, 112, 3), use_rel_pos=use_rel_pos,
    )
    if use_rel_pos:
        randomise_rel_pos(model, seed)
    return model


def randomise_rel_pos(model, seed: int = 0) -> int:
    """Non-zero relative-position tables (keras-hub initialises them to zero, which would hide bugs)."""
    rng = np.random.default_rng(seed)
    tables = 0
    for layer in model._flatten_layers():
        if type(layer).__name__ == "AddRelativePositionalEmbedding":
            for table in (layer.rel_pos_h, layer.rel_pos_w):
                table.assign(rng.normal(0.0, 1.0, size=table.shape).astype("float32"))
                tables += 1
    assert tables
    return tables


def attention_layers(model) -> list:
    return [layer for layer in model._flatten_layers() if type(layer).__name__ == "MultiHeadAttentionWithRelativePE"]


def images(batch: int = 2, size: int = 112, seed: int = 1):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.uniform(0, 255, size=(batch, size, size, 3)).astype("float32"))


def run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.fixture()
def count_fused(monkeypatch):
    """Counts calls of the fused attention (from a patched layer or block) and of torch's SDPA kernel."""
    counts = {"fused": 0, "sdpa": 0}
    fused, sdpa = attention._attend, torch.nn.functional.scaled_dot_product_attention

    def counting_fused(*args, **kwargs):
        counts["fused"] += 1
        return fused(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention, "_attend", counting_fused)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    return counts


@pytest.fixture(autouse=True)
def _fused_on_by_default(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    # These tests are about the SDPA path; tests/test_attention_kernel.py covers the AVX-512 kernel.
    monkeypatch.setenv(attention_kernel.ENV_VAR, "0")


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "row-by-row"])
def test_fused_backbone_matches_keras_hub(monkeypatch, count_fused, chunk_bytes):
    if chunk_bytes is not None:  # the bias built one query row of one head at a time, as for a large image
        monkeypatch.setattr(attention, "_CPU_BIAS_CHUNK_BYTES", chunk_bytes)
    model = small_vitdet()
    x = images()
    expected = run(model, x)

    assert attention.fuse_vitdet_attention(model) == 3
    got = run(model, x)

    assert count_fused["fused"] == 3  # one per block: the patched path is the one that ran
    # One kernel call per block, or one per query row of each head of each batch item: two blocks
    # of 2 x 9 3x3 windows (3 rows) and a 7x7 global one, 2 heads.
    assert count_fused["sdpa"] == (3 if chunk_bytes is None else 2 * (18 * 2 * 3) + 2 * 2 * 7)
    assert float((got - expected).abs().max()) <= TOLERANCE
    assert float(expected.abs().max()) > 0.1  # not trivially equal


def test_fused_backbone_without_relative_positions(count_fused):
    model = small_vitdet(use_rel_pos=False)
    x = images()
    expected = run(model, x)

    assert attention.fuse_vitdet_attention(model) == 3
    assert float((run(model, x) - expected).abs().max()) <= TOLERANCE
    assert count_fused["fused"] == 3


def test_comparison_catches_a_wrong_relative_position(monkeypatch):
    """The tolerance above is tight enough to see a mistake in the relative-position bias."""
    model = small_vitdet()
    x = images()
    expected = run(model, x)
    attention.fuse_vitdet_attention(model)
    real = attention._relative_table
    # Key minus query instead of query minus key: the table read backwards.
    monkeypatch.setattr(attention, "_relative_table", lambda table, size, dtype, t: real(table, size, dtype, t).flip(0))

    assert float((run(model, x) - expected).abs().max()) > 1e-2


def test_fused_gradients_match_keras_hub():
    model = small_vitdet()
    layers = attention_layers(model)
    watched = [layers[0].add_decomposed_relative_pe.rel_pos_h, layers[1].add_decomposed_relative_pe.rel_pos_w,
               layers[1].qkv.kernel]
    weights = torch.tensor(np.random.default_rng(2).normal(size=(2, 7, 7, 16)).astype("float32"))

    def gradients():
        x = images().requires_grad_(True)
        loss = (model(x) * weights).sum()
        grads = torch.autograd.grad(loss, [x] + [w.value for w in watched])
        return [g.detach() for g in grads]

    expected = gradients()
    attention.fuse_vitdet_attention(model)
    got = gradients()

    for g, e in zip(got, expected):
        scale = float(e.abs().max())
        assert scale > 0
        assert float((g - e).abs().max()) <= TOLERANCE * max(1.0, scale)


def test_fused_sam_masks_match_keras_hub(monkeypatch, count_fused):
    from sam_backend.sam.engine import SamEngine

    reference_model = build_tiny_segmenter(seed=3)
    randomise_rel_pos(reference_model.backbone.image_encoder, seed=3)
    fused_model = build_tiny_segmenter(seed=4)
    fused_model.set_weights(reference_model.get_weights())

    monkeypatch.setenv(attention.ENV_VAR, "0")  # whatever SamEngine does, the reference stays keras-hub's
    reference = SamEngine(reference_model, preset="tiny")
    monkeypatch.delenv(attention.ENV_VAR)
    fused = SamEngine(fused_model, preset="tiny")
    assert attention.fuse_vitdet_attention(fused_model) == 2
    assert not any(getattr(layer, "_sam_fused_attention", False) for layer in attention_layers(reference_model))

    image = random_image(np.random.default_rng(5), 96, 120)
    ref_emb, fused_emb = reference.encode(image), fused.encode(image)
    assert count_fused["fused"] == 2
    assert float((ref_emb.features - fused_emb.features).abs().max()) <= TOLERANCE

    prompt = dict(points=[[40, 30], [90, 70]], labels=[1, 0], multimask=True)
    ref_pred, fused_pred = reference.decode(ref_emb, **prompt), fused.decode(fused_emb, **prompt)
    np.testing.assert_allclose(fused_pred.low_res_logits, ref_pred.low_res_logits, atol=10 * TOLERANCE)
    np.testing.assert_allclose(fused_pred.scores, ref_pred.scores, atol=TOLERANCE)
    same = fused_pred.masks == ref_pred.masks
    assert same.mean() > 0.999  # at most a pixel or so right on the threshold may flip


def test_source_fingerprint_mismatch_leaves_keras_hub_attention(monkeypatch, caplog, count_fused):
    model = small_vitdet()
    x = images()
    expected = run(model, x)
    monkeypatch.setattr(attention, "KNOWN_SOURCE_FINGERPRINTS", frozenset({"another keras-hub"}))

    with caplog.at_level(logging.INFO, logger="sam_backend.accel.attention"):
        assert attention.fuse_vitdet_attention(model) == 0

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not once per layer
    assert "keras-hub's own attention is used" in warnings[0].getMessage()
    assert not any("call" in vars(layer) for layer in attention_layers(model))
    assert torch.equal(run(model, x), expected)
    assert count_fused["fused"] == 0


def test_unexpected_layer_is_left_alone(caplog, count_fused):
    model = small_vitdet()
    x = images()
    expected = run(model, x)
    odd = attention_layers(model)[1]
    odd.input_size = (5, 5)  # its tables no longer have the shape the fused path expects

    with caplog.at_level(logging.WARNING, logger="sam_backend.accel.attention"):
        assert attention.fuse_vitdet_attention(model) == 2

    assert "call" not in vars(odd)
    assert "rel_pos_h shape" in caplog.text and "keras-hub's own attention is used" in caplog.text
    assert float((run(model, x) - expected).abs().max()) <= TOLERANCE
    assert count_fused["fused"] == 2


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_env_var_turns_it_off(monkeypatch, value, count_fused):
    monkeypatch.setenv(attention.ENV_VAR, value)
    model = small_vitdet()

    assert not attention.fused_attention_enabled()
    assert attention.fuse_vitdet_attention(model) == 0
    assert not any("call" in vars(layer) for layer in attention_layers(model))
    run(model, images(batch=1))
    assert count_fused["fused"] == 0


def test_enabled_by_default_and_idempotent(monkeypatch):
    assert attention.fused_attention_enabled()
    monkeypatch.setenv(attention.ENV_VAR, "1")
    assert attention.fused_attention_enabled()
    model = small_vitdet()
    x = images(batch=1)
    expected = run(model, x)

    assert attention.fuse_vitdet_attention(model) == 3
    assert attention.fuse_vitdet_attention(model) == 3  # already fused: counted, not patched twice
    assert attention.unfuse_vitdet_attention(model) == 3
    assert not any("call" in vars(layer) for layer in attention_layers(model))
    assert torch.equal(run(model, x), expected)


def test_windowed_blocks_project_only_real_tokens(monkeypatch, count_fused):
    """The qkv projection of a windowed block sees the 7x7 token grid, not the 9x9 padded windows."""
    model = small_vitdet()
    x = images()
    expected = run(model, x)
    shapes = []
    qkv_layers = [layer.qkv for layer in attention_layers(model)]
    real_dense = attention._dense

    def recording(layer, inputs, *args, **kwargs):
        if any(layer is qkv for qkv in qkv_layers):
            shapes.append(tuple(inputs.shape))
        return real_dense(layer, inputs, *args, **kwargs)

    monkeypatch.setattr(attention, "_dense", recording)
    assert attention.fuse_vitdet_attention(model) == 3
    got = run(model, x)

    blocks = [b for b in model._flatten_layers() if type(b).__name__ == "WindowedTransformerEncoder"]
    assert ["call" in vars(b) for b in blocks] == [True, True, True]
    assert shapes == [(2, 7, 7, 32)] * 3  # keras-hub's own: (18, 3, 3, 32) for the windowed blocks
    assert count_fused["fused"] == 3
    assert float((got - expected).abs().max()) <= TOLERANCE


def test_block_source_mismatch_keeps_keras_hub_blocks(monkeypatch, caplog, count_fused):
    model = small_vitdet()
    x = images()
    expected = run(model, x)
    monkeypatch.setattr(attention, "KNOWN_BLOCK_FINGERPRINTS", frozenset({"another keras-hub"}))

    with caplog.at_level(logging.WARNING, logger="sam_backend.accel.attention"):
        assert attention.fuse_vitdet_attention(model) == 3  # the attention itself is still fused

    assert "blocks keep keras-hub's own call" in caplog.text
    assert not any("call" in vars(b) for b in model._flatten_layers()
                   if type(b).__name__ == "WindowedTransformerEncoder")
    assert float((run(model, x) - expected).abs().max()) <= TOLERANCE
    assert count_fused["fused"] == 3


def test_bias_chunks_for_vit_b():
    """ViT-B at 1024 px: a global block in 1 head x 16 rows, a windowed block in 3 calls of 9 windows."""
    budget = 16 << 20
    assert attention._bias_chunks(1, 12, 64, 64 * 4096 * 4, budget) == (1, 1, 16)
    assert attention._bias_chunks(25, 12, 14, 14 * 196 * 4, budget) == (9, 12, 14)
    assert attention._bias_chunks(2, 2, 7, 1, 1) == (1, 1, 1)


def test_blocks_under_bfloat16_autocast(count_fused):
    """Under autocast the patched blocks run their linear layers in bfloat16, bias included, close to keras-hub's."""
    model = small_vitdet()
    x = images()
    expected = run(model, x)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keras_hub_bf16 = run(model, x)
    linears = []
    real_linear = torch.nn.functional.linear

    def counting_linear(*args, **kwargs):
        out = real_linear(*args, **kwargs)
        linears.append(out.dtype)
        return out

    attention.fuse_vitdet_attention(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.linear = counting_linear
        try:
            got = run(model, x)
        finally:
            torch.nn.functional.linear = real_linear

    assert linears == [torch.bfloat16] * 12  # qkv, projection and two MLP layers in each of 3 blocks
    assert count_fused["fused"] == 3
    scale = float(expected.abs().max())
    assert float((got.float() - expected).abs().max()) <= 0.05 * scale
    assert float((got.float() - keras_hub_bf16.float()).abs().max()) <= 0.05 * scale
