"""The AVX-512 attention kernel: keras-hub's results, and how it is built, cached and refused."""

import logging
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import TINY_INPUT, random_image
from test_attention import TOLERANCE, attention_layers, images, randomise_rel_pos, run

torch = pytest.importorskip("torch")
keras_hub = pytest.importorskip("keras_hub")

from sam_backend.accel import attention, attention_kernel  # noqa: E402

AVX512 = "AVX512" in torch.backends.cpu.get_cpu_capability()
COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
needs_kernel = pytest.mark.skipif(not (AVX512 and COMPILER), reason="the kernel runs on AVX-512 CPUs, built by cc")


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv(attention_kernel.ENV_VAR, raising=False)
    monkeypatch.delenv(attention.ENV_VAR, raising=False)


@pytest.fixture()
def fresh_kernel(monkeypatch, tmp_path):
    """No kernel loaded yet in this process, and an empty cache directory."""
    monkeypatch.setattr(attention_kernel, "_loaded", {})
    monkeypatch.setenv(attention_kernel.DIR_ENV_VAR, str(tmp_path / "kernels"))
    return tmp_path / "kernels"


@pytest.fixture()
def kernel_calls(monkeypatch):
    """The model's calls of the kernel: (qkv shape, window) each."""
    calls = []
    real = attention_kernel.rel_attention_windows

    def counting(qkv, heads, window, *args, **kwargs):
        calls.append((tuple(qkv.shape), window))
        return real(qkv, heads, window, *args, **kwargs)

    monkeypatch.setattr(attention_kernel, "rel_attention_windows", counting)
    return calls


def test_kernel_is_there_where_it_can_be():
    """On an AVX-512 CPU with a C compiler a broken build fails here rather than quietly falling back."""
    if not (AVX512 and COMPILER):
        assert attention_kernel.kernel_status() == "unavailable"
        return
    assert attention_kernel.kernel() is not None
    assert attention_kernel.kernel_status() == "avx512"


def relative_terms(queries, table_h, table_w, dtype=torch.float64):
    """keras-hub's rel_h / rel_w: each query against the table rows of every key row / column."""
    height, width = queries.shape[3], queries.shape[4]
    ys, xs = torch.arange(height), torch.arange(width)
    by_row = table_h.to(dtype)[ys[:, None] - ys[None, :] + height - 1]  # (query row, key row, d)
    by_column = table_w.to(dtype)[xs[:, None] - xs[None, :] + width - 1]
    rel_h = torch.einsum("oinyxc,ykc->oinyxk", queries.to(dtype), by_row)
    rel_w = torch.einsum("oinyxc,xkc->oinyxk", queries.to(dtype), by_column)
    return rel_h, rel_w


def dense_reference(queries, keys, values, table_h, table_w, scale):
    """The attention written out in float64: scores, full bias, softmax, values."""
    outer, inner, heads, height, width, size = queries.shape
    tokens = height * width

    def flat(t):
        return t.double().reshape(outer * inner, heads, tokens, size)

    rel_h, rel_w = relative_terms(queries, table_h, table_w)
    bias = (rel_h.reshape(-1, heads, tokens, height)[..., :, None]
            + rel_w.reshape(-1, heads, tokens, width)[..., None, :]).reshape(-1, heads, tokens, tokens)
    scores = scale * flat(queries) @ flat(keys).transpose(-1, -2) + bias
    return (scores.softmax(-1) @ flat(values)).reshape(queries.shape)


@needs_kernel
@pytest.mark.parametrize("outer,inner,heads,height,width,size", [
    (1, 1, 2, 8, 8, 64),     # one tile
    (1, 1, 2, 13, 11, 64),   # 143 tokens: two full tiles of 64 and a tail
    (2, 3, 2, 5, 7, 32),     # windows: items in two strides
    (1, 1, 1, 3, 30, 16),    # a row wider than a vector, with a masked tail
    (1, 2, 3, 9, 9, 80),     # ViT-H's head size
    (2, 1, 2, 1, 1, 48),     # a single token
])
@pytest.mark.parametrize("magnitude", [1.0, 5.0], ids=["normal", "peaked"])
def test_kernel_matches_dense_attention(outer, inner, heads, height, width, size, magnitude):
    generator = torch.Generator().manual_seed(height * 100 + width)
    # As the windowed blocks hand it over: (outer, H, inner, W, 3, heads, d) -> 3 x (outer, inner, heads, H, W, d).
    qkv = torch.randn(outer, height, inner, width, 3, heads, size, generator=generator)
    qkv[..., :2, :, :] *= magnitude  # queries and keys: "peaked" scores reach about +-100
    queries, keys, values = qkv.permute(4, 0, 2, 5, 1, 3, 6).unbind(0)
    table_h = torch.randn(2 * height - 1, size, generator=generator) * 0.5
    table_w = torch.randn(2 * width - 1, size, generator=generator) * 0.5
    scale = size ** -0.5

    got = attention_kernel.rel_attention(queries, keys, values, table_h, table_w, scale)

    expected = dense_reference(queries, keys, values, table_h, table_w, scale)
    assert got.shape == queries.shape
    # About as close to the float64 truth as keras-hub's float32 math through torch's attention.
    tokens = height * width
    rel_h, rel_w = relative_terms(queries, table_h, table_w, torch.float32)
    bias = (rel_h.reshape(-1, heads, tokens, height, 1) + rel_w.reshape(-1, heads, tokens, 1, width))
    torch_result = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(-1, heads, tokens, size) for t in (queries, keys, values)),
        attn_mask=bias.reshape(-1, heads, tokens, tokens), scale=scale)
    torch_error = float((torch_result.double() - expected.reshape(torch_result.shape)).abs().max())
    assert float((got.double() - expected).abs().max()) <= max(4 * torch_error, 1e-6)  # rounding order differs
    if tokens > 1:  # not trivially equal: the bias matters
        unbiased = dense_reference(queries, keys, values, table_h * 0, table_w * 0, scale)
        assert float((unbiased - expected).abs().max()) > 1e-3


@needs_kernel
@pytest.mark.parametrize("grid_h,grid_w,window", [(5, 7, 3), (6, 6, 3), (4, 9, 0), (1, 2, 2)])
def test_windows_match_padding_then_attention(grid_h, grid_w, window):
    """rel_attention_windows equals: pad the grid with the padding tokens, attend per window, crop."""
    generator = torch.Generator().manual_seed(grid_h * 10 + grid_w)
    batch, heads, size = 2, 2, 32
    channels = heads * size
    qkv = torch.randn(batch, grid_h, grid_w, 3 * channels, generator=generator)
    padding = torch.randn(3 * channels, generator=generator)
    height, width = (window, window) if window else (grid_h, grid_w)
    table_h = torch.randn(2 * height - 1, size, generator=generator)
    table_w = torch.randn(2 * width - 1, size, generator=generator)

    got = attention_kernel.rel_attention_windows(qkv, heads, window, table_h, table_w, 0.2, padding)

    rows, cols = -(-grid_h // height), -(-grid_w // width)
    padded = padding.expand(batch, rows * height, cols * width, 3 * channels).clone()
    padded[:, :grid_h, :grid_w] = qkv
    # (B * rows, height, cols, width, 3, heads, d) -> 3 x (B * rows, cols, heads, height, width, d)
    views = padded.view(batch * rows, height, cols, width, 3, heads, size).permute(4, 0, 2, 5, 1, 3, 6)
    expected = dense_reference(*views.unbind(0), table_h, table_w, 0.2)  # (B * rows, cols, heads, h, w, d)
    expected = expected.permute(0, 3, 1, 4, 2, 5).reshape(batch, rows * height, cols * width, channels)
    assert got.shape == (batch, grid_h, grid_w, channels)
    assert float((got.double() - expected[:, :grid_h, :grid_w]).abs().max()) <= 1e-5
    if window and (grid_h % window or grid_w % window):  # the padding tokens are keys: they matter
        zero_padded = attention_kernel.rel_attention_windows(qkv, heads, window, table_h, table_w, 0.2)
        assert float((zero_padded - got).abs().max()) > 1e-3


@needs_kernel
def test_kernel_writes_into_a_strided_output():
    queries = torch.randn(1, 1, 2, 4, 4, 64)
    table_h, table_w = torch.randn(7, 64), torch.randn(7, 64)
    buffer = torch.full((1, 1, 4, 4, 2, 64), float("nan"))  # (B, 1, H, W, heads, d), as the global path writes
    out = buffer.permute(0, 1, 4, 2, 3, 5)

    assert attention_kernel.rel_attention(queries, queries, queries, table_h, table_w, 0.125, out) is out
    assert not torch.isnan(buffer).any()
    torch.testing.assert_close(out.double(), dense_reference(queries, queries, queries, table_h, table_w, 0.125),
                               atol=1e-5, rtol=0)


@needs_kernel
def test_kernel_refuses_what_it_cannot_read():
    good = torch.randn(1, 1, 2, 4, 4, 64)
    table = torch.randn(7, 64)
    with pytest.raises(ValueError, match="head size"):
        attention_kernel.rel_attention(torch.randn(1, 1, 2, 4, 4, 24), good, good, table, table, 0.1)
    with pytest.raises(ValueError, match="one shape"):
        attention_kernel.rel_attention(good, good.double(), good, table, table, 0.1)
    with pytest.raises(ValueError, match="one shape"):
        attention_kernel.rel_attention(good, good.transpose(-1, -2), good, table, table, 0.1)
    with pytest.raises(ValueError, match="do not match a 4x4 grid"):
        attention_kernel.rel_attention(good, good, good, table[:5], table, 0.1)
    with pytest.raises(ValueError, match="CPU views"):  # a GPU's pointer is not the kernel's to read
        attention_kernel.rel_attention(good, good, good.to("meta"), table, table, 0.1)


def test_windows_refuse_what_they_cannot_read():
    table = torch.randn(5, 32)
    qkv = torch.randn(1, 6, 6, 3 * 64)
    for bad in (qkv.double(), qkv.to("meta"), qkv[..., :190], torch.randn(1, 6, 6, 3 * 64 * 2)[..., ::2]):
        with pytest.raises(ValueError, match="qkv must be a float32 CPU"):
            attention_kernel.rel_attention_windows(bad, 2, 3, table, table, 0.1)


def head64_vitdet(seed: int = 0):
    """As test_attention.small_vitdet, with SAM's head size of 64 (two heads of 128 channels)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras_hub.models.ViTDetBackbone(
        hidden_size=128, num_layers=3, intermediate_dim=64, num_heads=2, global_attention_layer_indices=[1],
        patch_size=16, num_output_channels=16, window_size=3, image_shape=(112, 112, 3), use_rel_pos=True,
    )
    randomise_rel_pos(model, seed)
    return model


@needs_kernel
def test_backbone_with_the_kernel_matches_keras_hub(kernel_calls):
    model = head64_vitdet()
    x = images()
    expected = run(model, x)

    attention.fuse_vitdet_attention(model)
    got = run(model, x)

    # Windowed blocks: 3 x 3 windows of 3x3 over each 7x7 grid (padded to 9x9 by the kernel); the global block.
    assert kernel_calls == [((2, 7, 7, 384), 3), ((2, 7, 7, 384), 0), ((2, 7, 7, 384), 3)]
    assert float((got - expected).abs().max()) <= TOLERANCE
    assert float(expected.abs().max()) > 0.1


@needs_kernel
def test_comparison_catches_a_wrong_bias_in_the_kernel_path(monkeypatch, kernel_calls):
    model = head64_vitdet()
    x = images()
    expected = run(model, x)
    attention.fuse_vitdet_attention(model)
    real = attention_kernel.rel_attention_windows
    # The column table read backwards: key minus query instead of query minus key.
    monkeypatch.setattr(attention_kernel, "rel_attention_windows",
                        lambda qkv, heads, window, table_h, table_w, *rest: real(qkv, heads, window, table_h,
                                                                                 table_w.flip(0), *rest))

    assert float((run(model, x) - expected).abs().max()) > 1e-2


@needs_kernel
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-and-weights", "weights-only"])
def test_gradients_take_the_sdpa_path(kernel_calls, input_grad):
    """The kernel has no backward pass: with autograd on, SDPA runs, and gradients are keras-hub's."""
    model = head64_vitdet()
    watched = [attention_layers(model)[0].qkv.kernel.value, attention_layers(model)[1].qkv.kernel.value]

    def gradient():
        x = images().requires_grad_(input_grad)
        loss = model(x).square().sum()
        return [g.detach() for g in torch.autograd.grad(loss, ([x] if input_grad else []) + watched)]

    expected = gradient()
    attention.fuse_vitdet_attention(model)
    got = gradient()

    assert kernel_calls == []
    for g, e in zip(got, expected):
        assert float((g - e).abs().max()) <= TOLERANCE * max(1.0, float(e.abs().max()))


@needs_kernel
def test_sam_masks_with_the_kernel_match_keras_hub(monkeypatch, kernel_calls):
    from sam_backend.sam.architectures import SamArchitecture, build_sam
    from sam_backend.sam.engine import SamEngine

    architecture = SamArchitecture(
        input_size=TINY_INPUT, encoder_width=64, encoder_depth=2, encoder_heads=1, encoder_mlp=32,
        window_size=4, global_layers=(1,), embed_dim=8, decoder_heads=2, decoder_mlp=16,
    )
    reference_model = build_sam(architecture, 3)
    randomise_rel_pos(reference_model.backbone.image_encoder, seed=3)
    kernel_model = build_sam(architecture, 4)
    kernel_model.set_weights(reference_model.get_weights())

    monkeypatch.setenv(attention.ENV_VAR, "0")
    reference = SamEngine(reference_model, preset="tiny")
    monkeypatch.delenv(attention.ENV_VAR)
    engine = SamEngine(kernel_model, preset="tiny")

    image = random_image(np.random.default_rng(5), 96, 120)
    ref_emb, emb = reference.encode(image), engine.encode(image)
    assert len(kernel_calls) == 2  # both blocks ran in the kernel
    assert float((ref_emb.features - emb.features).abs().max()) <= TOLERANCE

    prompt = dict(points=[[40, 30], [90, 70]], labels=[1, 0], multimask=True)
    ref_pred, pred = reference.decode(ref_emb, **prompt), engine.decode(emb, **prompt)
    np.testing.assert_allclose(pred.low_res_logits, ref_pred.low_res_logits, atol=10 * TOLERANCE)
    assert (pred.masks == ref_pred.masks).mean() > 0.999


def test_handles_only_what_it_computes(monkeypatch):
    x = torch.randn(1, 4, 4, 3 * 64)
    with torch.inference_mode():
        assert attention_kernel.handles(x, 64) == (attention_kernel.kernel() is not None)
        assert not attention_kernel.handles(x.bfloat16(), 64)
        assert not attention_kernel.handles(x, 8)  # the tiny test models' head size
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not attention_kernel.handles(x, 64)  # float32 residuals, bfloat16 projections
    with torch.no_grad():
        assert attention_kernel.handles(x, 64) == (attention_kernel.kernel() is not None)
    assert not attention_kernel.handles(x, 64)  # autograd on: weights may want gradients
    monkeypatch.setenv(attention_kernel.ENV_VAR, "off")
    with torch.inference_mode():
        assert not attention_kernel.handles(x, 64)
    assert attention_kernel.kernel_status() == "off"


@needs_kernel
def test_bfloat16_autocast_keeps_sdpa(kernel_calls):
    """Under autocast (the bfloat16 encoder) the residuals are float32 but the projections are not: SDPA runs."""
    model = head64_vitdet()
    x = images()
    expected = run(model, x)
    attention.fuse_vitdet_attention(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(model, x)
    assert kernel_calls == []
    assert float((got.float() - expected).abs().max()) <= 0.05 * float(expected.abs().max())


@needs_kernel
def test_env_var_keeps_sdpa(monkeypatch, kernel_calls):
    model = head64_vitdet()
    attention.fuse_vitdet_attention(model)
    monkeypatch.setenv(attention_kernel.ENV_VAR, "0")
    run(model, images())
    assert kernel_calls == []


@pytest.mark.skipif(not COMPILER, reason="no C compiler")
def test_build_is_cached_by_source(fresh_kernel, monkeypatch):
    library = attention_kernel.build_kernel()
    assert library.parent == fresh_kernel and library.is_file()
    assert library.name.startswith("rel_attention-") and library.suffix == ".so"
    assert oct(fresh_kernel.stat().st_mode & 0o777) == oct(0o700)

    def no_compiler(*args, **kwargs):
        raise AssertionError("built twice")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert attention_kernel.build_kernel() == library
    assert list(fresh_kernel.iterdir()) == [library]  # no half-written files left


@pytest.mark.skipif(not COMPILER, reason="no C compiler")
def test_build_cli(tmp_path):
    assert attention_kernel.main([str(tmp_path / "image-kernels")]) == 0
    assert [p.suffix for p in (tmp_path / "image-kernels").iterdir()] == [".so"]


def test_failed_build_falls_back_with_a_warning(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")

    with caplog.at_level(logging.WARNING, logger="sam_backend.accel.attention_kernel"):
        assert attention_kernel.kernel() is None
        assert attention_kernel.kernel() is None  # decided once

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stays on SDPA" in warnings[0]
    assert attention_kernel.kernel_status() == "unavailable"
    with torch.inference_mode():
        assert not attention_kernel.handles(torch.randn(1, 4, 4, 192), 64)


def test_other_systems_keep_sdpa(fresh_kernel, monkeypatch):
    monkeypatch.setattr(attention_kernel.sys, "platform", "win32")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("built where it is not supported"))
    assert attention_kernel.kernel() is None
    assert not fresh_kernel.exists()


def test_no_avx512_means_no_build(fresh_kernel, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("built for a CPU that cannot run it"))
    assert attention_kernel.kernel() is None
    assert not fresh_kernel.exists()


@pytest.mark.skipif(not COMPILER, reason="no C compiler")
def test_a_directory_others_can_write_is_not_trusted(fresh_kernel):
    library = attention_kernel.build_kernel()
    fresh_kernel.chmod(0o777)
    try:
        with pytest.raises(OSError, match="writable by others"):
            attention_kernel.build_kernel()
        assert attention_kernel._cached([fresh_kernel]) is None  # a library already there is not loaded either
    finally:
        fresh_kernel.chmod(0o700)
    assert attention_kernel.build_kernel() == library
