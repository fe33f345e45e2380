"""The encoder's precision: bfloat16 only where asked for (or on AMX) and only when the masks stay float32's."""

import logging

import numpy as np
import pytest

from sam_backend.accel import precision
from sam_backend.sam.synthetic import iou

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_engine():
    """The shipped demo preset: trained weights, so its masks have real edges to compare."""
    from sam_backend.sam.engine import SamEngine

    return SamEngine.from_preset("demo")


@pytest.fixture()
def engine(demo_engine):
    demo_engine.precision, demo_engine.parity = "float32", None
    yield demo_engine
    demo_engine.precision, demo_engine.parity = "float32", None


@pytest.mark.parametrize("value, expected", [
    ("", "auto"), ("auto", "auto"), ("fp32", "float32"), ("FLOAT32", "float32"), ("bf16", "bfloat16"),
    ("bfloat16", "bfloat16"), ("half", "float16"), (" fp16 ", "float16"),
])
def test_requested_precision(monkeypatch, value, expected):
    monkeypatch.setenv(precision.ENV_VAR, value)
    assert precision.requested_precision() == expected


def test_unknown_precision_is_auto_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(precision.ENV_VAR, "int4")
    with caplog.at_level(logging.WARNING, logger="sam_backend.accel.precision"):
        assert precision.requested_precision() == "auto"
    assert "SAM_PRECISION='int4'" in caplog.text


@pytest.mark.parametrize("amx, device, expected", [
    (True, "cpu", "bfloat16"), (False, "cpu", "float32"), (True, "cuda", "float32"), (False, "cuda", "float32"),
])
def test_auto_is_bfloat16_on_amx_cpus_only(monkeypatch, amx, device, expected):
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: amx)
    assert precision.candidate_precision(device, "auto") == expected
    assert precision.candidate_precision(device, "float16") == "float16"  # asked for: tried anywhere


def test_amx_flag_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert not precision.cpu_has_amx_bf16(cpuinfo)  # avx512_bf16 is not AMX
    assert not precision.cpu_has_amx_bf16(tmp_path / "missing")


def test_bfloat16_kept_when_masks_match(engine, monkeypatch, caplog):
    monkeypatch.setenv(precision.ENV_VAR, "bfloat16")
    image = precision.parity_scene(seed=7).image
    fp32 = engine.encode(image)

    with caplog.at_level(logging.INFO, logger="sam_backend.accel.precision"):
        assert precision.choose_precision(engine) == "bfloat16"
    assert engine.parity.passed and engine.parity.mean_iou >= precision.PARITY_MIN_IOU
    assert engine.parity.ious.size >= 12  # a click (3 candidates) and a box on each shape
    assert "Image encoder in bfloat16" in caplog.text

    bf16 = engine.encode(image)
    difference = float((bf16.features - fp32.features).abs().max())
    assert 0 < difference < 0.1 * float(fp32.features.abs().max())  # bfloat16 ran, and stayed close
    assert bf16.features.dtype == torch.float32  # what the decoder and the store get
    click = dict(points=[[400, 300]], labels=[1], multimask=False)
    assert iou(engine.decode(bf16, **click).mask, engine.decode(fp32, **click).mask) >= 0.98


def test_float32_kept_when_masks_differ(engine, monkeypatch, caplog):
    monkeypatch.setenv(precision.ENV_VAR, "bfloat16")
    monkeypatch.setattr(precision, "PARITY_MIN_IOU", 1.01)  # no reduced precision can reach it

    with caplog.at_level(logging.WARNING, logger="sam_backend.accel.precision"):
        assert precision.choose_precision(engine) == "float32"
    assert not engine.parity.passed
    assert "stays float32" in caplog.text and "mean IoU" in caplog.text


def test_wrong_reduced_encoder_is_refused(engine, monkeypatch):
    """The check compares real masks: an encoder that is off (here: features scaled) fails it."""
    monkeypatch.setenv(precision.ENV_VAR, "bfloat16")
    real = type(engine).encode_features

    def off(self, batch, precision_=None):
        features = real(self, batch, precision_)
        return features * 0.5 + 0.3 if precision_ == "bfloat16" else features

    monkeypatch.setattr(type(engine), "encode_features", off)
    assert precision.choose_precision(engine) == "float32"
    assert engine.parity.mean_iou < precision.PARITY_MIN_IOU


def test_accelerate_chooses_on_amx(engine, monkeypatch):
    from sam_backend.accel import accelerate

    monkeypatch.setenv(precision.ENV_VAR, "auto")
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(precision.ParityReport, "faster", True)  # the demo is too small for timing to tell
    accelerate(engine)
    assert engine.precision == "bfloat16"

    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    accelerate(engine)
    assert engine.precision == "float32" and engine.parity is None


def test_store_keys_carry_the_precision(engine):
    from sam_backend.embeddings.store import entry_key
    from sam_backend.embeddings.tiers import EmbeddingTiers

    tiers = EmbeddingTiers(engine, fingerprint="ab" * 32)
    fp32_key = entry_key(tiers.fingerprint, "image")
    engine.precision = "bfloat16"
    assert tiers.fingerprint.startswith("bf16-")
    assert entry_key(tiers.fingerprint, "image") != fp32_key
    engine.precision = "float32"
    assert entry_key(tiers.fingerprint, "image") == fp32_key


def test_a_precision_that_cannot_run_keeps_float32(engine, monkeypatch, caplog):
    monkeypatch.setenv(precision.ENV_VAR, "bfloat16")

    def unsupported(*args, device_type, dtype, **kwargs):
        raise RuntimeError(f"autocast to {dtype} is not supported on {device_type}")

    monkeypatch.setattr(torch, "autocast", unsupported)
    with caplog.at_level(logging.WARNING, logger="sam_backend.accel.precision"):
        assert precision.choose_precision(engine) == "float32"
    assert engine.parity is None and "bfloat16 failed (RuntimeError" in caplog.text


def test_auto_keeps_float32_where_reduced_is_not_faster(engine, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(precision.ParityReport, "faster", False)
    with caplog.at_level(logging.INFO, logger="sam_backend.accel.precision"):
        assert precision.choose_precision(engine, "auto") == "float32"
    assert engine.parity.passed and "is not enough faster here" in caplog.text
    assert engine.parity.seconds > 0 and engine.parity.float32_seconds > 0

    assert precision.choose_precision(engine, "bfloat16") == "bfloat16"  # asked for by name: the masks alone decide


def test_reduced_precision_must_pay_by_a_margin():
    report = precision.ParityReport("bfloat16", np.ones(4), seconds=1.0, float32_seconds=1.4)
    assert report.passed and not report.faster  # 1.4x: workers timing it could decide apart
    assert precision.ParityReport("bfloat16", np.ones(4), seconds=1.0, float32_seconds=2.8).faster  # ViT-B here
