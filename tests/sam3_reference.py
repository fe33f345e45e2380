"""The references SAM 3 is checked against: a tiny Hugging Face ``Sam3Model`` and torchvision's ROI align.

transformers is a test-only dependency. Its SAM 3 calls ``torchvision.ops.roi_align``
for box prompts, and torchvision has no build for this torch: :func:`reference_roi_align`
is the kernel's loops written out (one sample at a time, as torchvision's C++ does),
independent of the vectorised version under test.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

from sam_backend.sam3.tiny import TINY_DETECTOR_CONFIG, tiny_vocabulary


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    channels, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(channels, dtype=fmap.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def reference_roi_align(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """``torchvision.ops.roi_align`` (NCHW features; boxes a ``(K, 5)`` tensor or a list of per-image ``(k, 4)``)."""
    if isinstance(boxes, (list, tuple)):
        boxes = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b.float()], dim=1)
                           for i, b in enumerate(boxes)])
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    result = torch.zeros(len(boxes), features.shape[1], out_h, out_w, dtype=features.dtype)
    offset = 0.5 if aligned else 0.0
    for k, (index, x0, y0, x1, y1) in enumerate(boxes.tolist()):
        fmap = features[int(index)]
        x0, y0, x1, y1 = (v * spatial_scale - offset for v in (x0, y0, x1, y1))
        roi_w, roi_h = x1 - x0, y1 - y0
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = torch.zeros(features.shape[1], dtype=features.dtype)
                for iy in range(grid_h):
                    y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += _bilinear(fmap, y, x)
                result[k, :, ph, pw] = total / count
    return result


@contextlib.contextmanager
def without_torchvision_stand_in():
    """Hide tests/meta_reference.py's torchvision stand-in (a module without a spec) while transformers looks.

    transformers asks ``importlib.util.find_spec("torchvision")``, which raises on
    the stand-in; it must see what is true here: no torchvision.
    """
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name == "torchvision" or name.startswith("torchvision.")}
    try:
        yield
    finally:
        sys.modules.update(saved)


#: Stands in for the torchvision module in transformers' SAM 3 (only ``ops.roi_align`` is used).
fake_torchvision = types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=reference_roi_align))


def hf_tiny_config():
    """A transformers ``Sam3Config`` of the tiny preset's sizes."""
    with without_torchvision_stand_in():
        from transformers import Sam3Config

    detector = json.loads(json.dumps(TINY_DETECTOR_CONFIG))
    backbone = dict(detector["vision_config"].pop("backbone_config"), model_type="sam3_vit_model")
    backbone["rope_parameters"] = {"rope_theta": backbone.pop("rope_theta"), "rope_type": "axial"}
    side = backbone["image_size"] // backbone["patch_size"]
    vision = dict(detector["vision_config"], backbone_config=backbone,
                  backbone_feature_sizes=[[side * 4, side * 4], [side * 2, side * 2], [side, side]])
    text = dict(detector["text_config"], model_type="clip_text_model", vocab_size=len(tiny_vocabulary()[0]),
                projection_dim=detector["text_config"]["hidden_size"])
    return Sam3Config(vision_config=vision, text_config=text,
                      geometry_encoder_config=detector["geometry_encoder_config"],
                      detr_encoder_config=detector["detr_encoder_config"],
                      detr_decoder_config=detector["detr_decoder_config"],
                      mask_decoder_config=detector["mask_decoder_config"])


def write_hf_tiny_checkpoint(directory: Path, seed: int = 0):
    """A random tiny ``Sam3Model`` with decisive scores, saved as ``facebook/sam3`` publishes it.

    The folder's ``config.json`` is the full SAM 3 one (``sam3_video``, the detector
    under ``detector_config``), which is what keras-hub converts; its
    ``tokenizer.json`` is a CLIP tokenizer of the tiny vocabulary. Returns the model.
    """
    with without_torchvision_stand_in():
        return _write_hf_tiny_checkpoint(directory, seed)


def _write_hf_tiny_checkpoint(directory: Path, seed: int):
    from transformers import CLIPTokenizer, Sam3Model

    torch.manual_seed(seed)
    model = Sam3Model(hf_tiny_config()).eval()
    with torch.no_grad():  # the same decisive tweak as the tiny keras-hub preset
        model.dot_product_scoring.text_proj.weight.mul_(6.0)
        model.detr_decoder.presence_head.layer3.bias.add_(3.0)
    directory = Path(directory)
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "sam3_video", "architectures": ["Sam3VideoModel"], "detector_config": config}))
    vocabulary, merges = tiny_vocabulary()
    CLIPTokenizer(vocab=vocabulary, merges=merges).save_pretrained(directory)
    return model


def hf_outputs(model, pixel_values: np.ndarray, tokens, boxes=None, box_labels=None) -> dict:
    """transformers' raw outputs for one image: NCHW float pixels, our tokens, cxcywh boxes."""
    with without_torchvision_stand_in():
        return _hf_outputs(model, pixel_values, tokens, boxes, box_labels)


def _hf_outputs(model, pixel_values: np.ndarray, tokens, boxes=None, box_labels=None) -> dict:
    from transformers.models.sam3 import modeling_sam3

    modeling_sam3.torchvision = fake_torchvision
    kwargs = {}
    if boxes is not None:
        kwargs = {"input_boxes": torch.tensor(boxes, dtype=torch.float32)[None],
                  "input_boxes_labels": torch.tensor(box_labels, dtype=torch.long)[None]}
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixel_values), input_ids=torch.from_numpy(tokens.ids[None]).long(),
                    attention_mask=torch.from_numpy(tokens.mask[None]).long(), **kwargs)
    return {"pred_masks": out.pred_masks[0].numpy(), "pred_logits": out.pred_logits[0].numpy(),
            "pred_boxes": out.pred_boxes[0].numpy(), "presence_logits": float(out.presence_logits.reshape(-1)[0])}
