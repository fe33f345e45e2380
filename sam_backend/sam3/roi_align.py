"""ROI align in plain torch, as ``torchvision.ops.roi_align`` computes it, without torchvision.

keras-hub's SAM 3 geometry encoder calls ``torchvision.ops.roi_align`` on the
torch backend, and torchvision has no CPU build for every torch (none for the
2.13 CPU wheel these machines use). Bilinear sampling separates into a
weight matrix along y and one along x, so each region's pooled features are
``Ay @ F @ Ax^T``: exact, vectorised, and small (the exemplar boxes of one
prompt).
"""

from __future__ import annotations

import torch


def _axis_weights(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, bins: int,
                  size: int) -> torch.Tensor:
    """``(K, bins, size)``: the bilinear weights of every sample of each bin along one axis, summed.

    The rules of torchvision's kernel: a sample more than one pixel outside
    the map counts zero, one below zero is clamped to 0, and one at or past
    the last pixel reads the last pixel.
    """
    k = start.shape[0]
    most = max(int(grid.max()), 1) if k else 1
    steps = torch.arange(most, device=start.device, dtype=start.dtype)
    cells = torch.arange(bins, device=start.device, dtype=start.dtype)
    # (K, bins, samples): the sample positions, evenly inside each bin.
    pos = (start[:, None, None] + cells[None, :, None] * bin_size[:, None, None]
           + (steps[None, None, :] + 0.5) * (bin_size / grid.clamp(min=1))[:, None, None])
    used = (steps[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low.to(pos.dtype))
    weights = torch.zeros(k, bins, size, device=start.device, dtype=start.dtype)
    used = used.to(start.dtype)
    weights.scatter_add_(2, low.reshape(k, bins, -1), ((1.0 - frac) * used).reshape(k, bins, -1))
    weights.scatter_add_(2, high.reshape(k, bins, -1), (frac * used).reshape(k, bins, -1))
    return weights


def roi_align(features, rois, output_size, spatial_scale: float = 1.0, aligned: bool = False) -> torch.Tensor:
    """Average-pool each region of interest to ``output_size`` with bilinear sampling.

    Same result as ``torchvision.ops.roi_align(features_nchw, rois,
    output_size, spatial_scale, sampling_ratio=-1, aligned)``, in channels-last
    layout: the number of samples per bin adapts to the region's size.

    Args:
        features: ``(N, H, W, C)`` feature maps.
        rois: ``(K, 5)`` rows of ``[batch_index, x0, y0, x1, y1]`` in feature-map pixels
            (times ``spatial_scale``).
        output_size: ``(height, width)`` of the pooled grid.
        spatial_scale: scale from the box coordinates to the feature map.
        aligned: shift by half a pixel (``torchvision``'s ``aligned=True``).

    Returns:
        ``(K, height, width, C)`` pooled features, in the features' dtype.

    Example:
        >>> f = torch.arange(16.0).reshape(1, 4, 4, 1)
        >>> roi_align(f, torch.tensor([[0.0, 0, 0, 4, 4]]), (1, 1)).flatten().tolist()
        [7.5]
    """
    features = torch.as_tensor(features)
    dtype = features.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    feats = features.to(compute)
    rois = torch.as_tensor(rois, device=feats.device).to(compute).reshape(-1, 5)
    out_h, out_w = int(output_size[0]), int(output_size[1])
    _, height, width, _ = feats.shape
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (rois[:, 1:] * spatial_scale - offset).unbind(1)
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:  # torchvision's legacy rule: a region is at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    grid_h, grid_w = torch.ceil(bin_h).long(), torch.ceil(bin_w).long()
    along_y = _axis_weights(y0, bin_h, grid_h, out_h, height)
    along_x = _axis_weights(x0, bin_w, grid_w, out_w, width)
    maps = feats[rois[:, 0].long()]
    pooled = torch.einsum("kph,khwc,kqw->kpqc", along_y, maps, along_x)
    count = (grid_h * grid_w).clamp(min=1).to(compute)
    return (pooled / count[:, None, None, None]).to(dtype)
