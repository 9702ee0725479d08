"""RoIAlign as two small matrix products: a fast CPU path for small feature maps (the quickstart).

RoIAlign's bilinear sampling is separable: the weight of feature cell ``(y, x)`` in output bin
``(p, q)`` of a RoI is ``w_y(p, y) * w_x(q, x)``, each factor summed over that axis's sampling points
and divided by their count. So, per RoI ``r`` of image ``b``::

    out[r, c] = Wy[r] @ F[b, c] @ Wx[r]^T        Wy[r]: (P_h, H), Wx[r]: (P_w, W)

with the same sampling points, borders and ``aligned`` offset as torchvision's ``roi_align`` (equal to
it within 1e-12 in float64, forward and backward: ``tests/test_roi_align.py``).

Why by hand: torchvision's CPU backward is a scalar loop per RoI, channel, bin and sampling point.
At the quickstart's sizes it was the largest single item of a training step (~40 ms of ~0.37 s).
Here, forward and backward are a few BLAS calls (``python benchmarks/run.py --parts roi_align``).
The dense ``Wy``/``Wx`` make the work and the memory grow with ``R * P_h * C * W``: the intermediate
``Wy @ F`` of a COCO image's p2 (512 RoIs, 256 x 200 x 336) would take 1.2 GB. So this suits small maps
(the quickstart's p2 is 40x40); on COCO-sized inputs, and on CUDA, keep torchvision's kernel
(``MODEL.METASPIKE.ROI_ALIGN_KERNEL: "torchvision"``, the default).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["roi_align_matmul", "MatmulROIAlign"]


def _axis_weights(start: torch.Tensor, length: torch.Tensor, pooled: int, size: int, sampling_ratio: int) -> torch.Tensor:
    """Interpolation weights of one axis: ``(R,)`` RoI starts and lengths (in feature cells) -> ``(R, pooled, size)``.

    Each output bin averages ``grid`` sampling points spaced evenly inside it (``grid = sampling_ratio``,
    or ``ceil(length / pooled)`` when it is 0, as torchvision). A point more than one cell outside the
    map contributes nothing; one within a cell of the border is clamped onto it.
    """
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(length, float(sampling_ratio))
    else:
        grid = torch.ceil(length / pooled)
    max_grid = int(grid.max()) if grid.numel() else 0
    weights = length.new_zeros(length.shape[0], pooled, size)
    if max_grid <= 0:
        return weights
    bins = torch.arange(pooled, dtype=length.dtype, device=length.device).view(1, -1, 1)
    points = torch.arange(max_grid, dtype=length.dtype, device=length.device).view(1, 1, -1)
    start, bin_size, grid = start.view(-1, 1, 1), bin_size.view(-1, 1, 1), grid.view(-1, 1, 1)
    divisor = grid.clamp(min=1.0)  # an empty RoI has no points; keep its (unused) coordinates finite
    coord = start + bins * bin_size + (points + 0.5) * bin_size / divisor  # (R, pooled, max_grid)
    valid = (points < grid) & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor().clamp(max=size - 1)
    at_end = low >= size - 1
    frac = torch.where(at_end, torch.zeros_like(coord), coord - low)  # past the last cell: all weight on it
    high = torch.where(at_end, low, low + 1)
    frac = frac * valid
    weights.scatter_add_(2, low.long(), (valid.to(frac.dtype) - frac))
    weights.scatter_add_(2, high.long(), frac)
    return weights / divisor


def roi_align_matmul(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align`` computed as ``Wy @ F @ Wx^T`` per RoI.

    Args:
        features: ``(N, C, H, W)``.
        rois: ``(R, 5)`` rows ``(batch index, x1, y1, x2, y2)`` in input-image coordinates.
        output_size, spatial_scale, sampling_ratio, aligned: as torchvision's ``roi_align``.

    Returns ``(R, C, P_h, P_w)``. Differentiable with respect to ``features`` (not the boxes, like
    torchvision's op).
    """
    if features.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"expected features (N, C, H, W) and rois (R, 5), got {tuple(features.shape)} and {tuple(rois.shape)}")
    pooled_h, pooled_w = _pair(output_size)
    n, c, h, w = features.shape
    with torch.no_grad():
        rois = rois.to(features.dtype)
        offset = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:  # the legacy op forces RoIs to be at least one cell wide
            roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
        wy = _axis_weights(y1, roi_h, pooled_h, h, sampling_ratio)
        wx = _axis_weights(x1, roi_w, pooled_w, w, sampling_ratio)
        image_of_roi = rois[:, 0].long()
    parts, order = [], []
    for b in range(n):
        idx = (image_of_roi == b).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        r = idx.numel()
        # rows: (R_b * P_h, H) @ (H, C * W) -> contract H for every RoI of this image at once
        rows = (wy[idx].reshape(r * pooled_h, h) @ features[b].transpose(0, 1).reshape(h, c * w)).view(r, pooled_h * c, w)
        # columns: (R_b, P_h * C, W) @ (R_b, W, P_w) -> contract W per RoI
        pooled = torch.bmm(rows, wx[idx].transpose(1, 2)).view(r, pooled_h, c, pooled_w)
        parts.append(pooled.permute(0, 2, 1, 3))
        order.append(idx)
    if not parts:
        return features.new_empty(0, c, pooled_h, pooled_w)
    order = torch.cat(order)
    out = torch.cat(parts)
    if len(parts) == 1 and order.numel() == rois.shape[0]:
        return out.contiguous()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out[inverse].contiguous()


class MatmulROIAlign(nn.Module):
    """Drop-in for Detectron2's ``ROIAlign`` level pooler (same arguments and ``forward(input, rois)``)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = True):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align_matmul(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")
