"""Spiking RoI heads: RoIAlign with T folded into the batch, spiking box and mask heads.

Registered names:

* ``ROI_HEADS_REGISTRY``: ``MetaSpikeStandardROIHeads``, ``MetaSpikeCascadeROIHeads`` (Detectron2's
  Standard/Cascade RoI heads whose poolers accept ``(T, B, C, H, W)`` features as well as 4-D ones).
* ``ROI_BOX_HEAD_REGISTRY``: ``SpikeFastRCNNConvFCHead`` and the switch ``build_metaspike_box_head``.
* ``ROI_MASK_HEAD_REGISTRY``: ``SpikeMaskRCNNConvUpsampleHead`` and the switch ``build_metaspike_mask_head``.

The switches build the spiking head when ``MODEL.METASPIKE.SPIKING_HEADS`` is true, else Detectron2's
``FastRCNNConvFCHead`` / ``MaskRCNNConvUpsampleHead``.

Importing this module points Detectron2's ``fast_rcnn_inference`` (used by the Standard and Cascade heads) at
:func:`~metaspike_d2.d2.rpn.stable_batched_nms`: the same detections, ordered with score ties by index, so
that the top ``DETECTIONS_PER_IMAGE`` are the ones an exported graph keeps. Spiking box heads give exact
ties (equal spike patterns, equal scores); Detectron2's NMS leaves their order open above 1000 boxes.
"""
from __future__ import annotations

from typing import List

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ROIAlign, ShapeSpec, get_norm
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    CascadeROIHeads,
    FastRCNNConvFCHead,
    StandardROIHeads,
)
from detectron2.modeling.roi_heads import fast_rcnn
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead, MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes
from torch import nn

from ..neurons import mean_over_time, seq_apply
from .backbone import build_lif
from .roi_align import MatmulROIAlign
from .rpn import stable_batched_nms

# one module-level name instead of copies of fast_rcnn_inference and CascadeROIHeads._forward_box (see above)
fast_rcnn.batched_nms = stable_batched_nms

__all__ = [
    "TimeFoldedROIPooler",
    "MetaSpikeStandardROIHeads",
    "MetaSpikeCascadeROIHeads",
    "SpikeFastRCNNConvFCHead",
    "SpikeMaskRCNNConvUpsampleHead",
    "build_metaspike_box_head",
    "build_metaspike_mask_head",
]


class TimeFoldedROIPooler(nn.Module):
    """Wraps a :class:`ROIPooler` so it also pools ``(T, B, C, H, W)`` features.

    5-D levels are pooled with T folded into the batch (the boxes repeated per time step), which is
    the same as pooling each ``x[t]`` separately: ``-> (T, R, C, k, k)``. 4-D levels pass through
    unchanged (``-> (R, C, k, k)``). Holds no parameters.
    """

    def __init__(self, pooler: ROIPooler):
        super().__init__()
        self.pooler = pooler

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        if x[0].dim() == 4:
            return self.pooler(x, box_lists)
        t = x[0].shape[0]
        pooled = self.pooler([level.flatten(0, 1) for level in x], list(box_lists) * t)
        return pooled.reshape(t, -1, *pooled.shape[1:])


def _select_roi_align(pooler: ROIPooler, kernel: str) -> ROIPooler:
    """Swap the level poolers of ``pooler`` for :class:`MatmulROIAlign` when ``kernel`` is "matmul"
    (``MODEL.METASPIKE.ROI_ALIGN_KERNEL``); "torchvision" keeps Detectron2's ``ROIAlign``."""
    if kernel == "torchvision":
        return pooler
    if kernel != "matmul":
        raise ValueError(f"MODEL.METASPIKE.ROI_ALIGN_KERNEL must be 'torchvision' or 'matmul', got {kernel!r}")
    for i, level in enumerate(pooler.level_poolers):
        if not isinstance(level, ROIAlign):
            raise ValueError(f"MODEL.METASPIKE.ROI_ALIGN_KERNEL 'matmul' needs POOLER_TYPE 'ROIAlign' or 'ROIAlignV2', "
                             f"the pooler has {type(level).__name__}")
        pooler.level_poolers[i] = MatmulROIAlign(level.output_size, level.spatial_scale, level.sampling_ratio,
                                                 level.aligned)
    return pooler


class _TimeFoldedPoolers:
    """Mixin for Detectron2 RoI heads: wrap the box and mask poolers in :class:`TimeFoldedROIPooler`
    (with the RoIAlign kernel chosen by ``MODEL.METASPIKE.ROI_ALIGN_KERNEL``)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        pooler = _select_roi_align(ret["box_pooler"], cfg.MODEL.METASPIKE.ROI_ALIGN_KERNEL)
        ret["box_pooler"] = TimeFoldedROIPooler(pooler)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if ret.get("mask_pooler") is not None:
            pooler = _select_roi_align(ret["mask_pooler"], cfg.MODEL.METASPIKE.ROI_ALIGN_KERNEL)
            ret["mask_pooler"] = TimeFoldedROIPooler(pooler)
        return ret


@ROI_HEADS_REGISTRY.register()
class MetaSpikeStandardROIHeads(_TimeFoldedPoolers, StandardROIHeads):
    """Detectron2's ``StandardROIHeads`` (box + mask) on spiking ``(T, B, C, H, W)`` or stock features."""


@ROI_HEADS_REGISTRY.register()
class MetaSpikeCascadeROIHeads(_TimeFoldedPoolers, CascadeROIHeads):
    """Detectron2's ``CascadeROIHeads`` on spiking ``(T, B, C, H, W)`` or stock features; the boxes are
    refined from the T-averaged predictions of each stage."""


@ROI_BOX_HEAD_REGISTRY.register()
class SpikeFastRCNNConvFCHead(nn.Module):
    """Spiking conv/FC box head (``SharedSpike2FCBBoxHead`` with 0 convs, ``SpikeConvFCBBoxHead`` with convs).

    ``(T, R, C, k, k)`` -> ``[LIF -> conv3x3 (+norm)]`` x convs -> flatten -> ``[LIF -> FC]`` x FCs
    -> mean over T -> ``(R, D)``. There is no LIF (and no ReLU) after the last FC: Detectron2's linear
    predictors run on this membrane output, and since they are linear, predicting on the T-mean equals
    averaging their logits over T.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, conv_dims: List[int], fc_dims: List[int], conv_norm="",
                 lif_factory):
        super().__init__()
        if not conv_dims and not fc_dims:
            raise ValueError("the box head needs at least one conv or FC layer")
        size = (input_shape.channels, input_shape.height, input_shape.width)
        self.conv_lifs, self.convs = nn.ModuleList(), nn.ModuleList()
        for dim in conv_dims:
            conv = Conv2d(size[0], dim, kernel_size=3, padding=1, bias=not conv_norm, norm=get_norm(conv_norm, dim))
            weight_init.c2_msra_fill(conv)
            self.conv_lifs.append(lif_factory())
            self.convs.append(conv)
            size = (dim, size[1], size[2])
        self.fc_lifs, self.fcs = nn.ModuleList(), nn.ModuleList()
        for dim in fc_dims:
            fc = nn.Linear(int(np.prod(size)), dim)
            weight_init.c2_xavier_fill(fc)
            self.fc_lifs.append(lif_factory())
            self.fcs.append(fc)
            size = dim
        self._output_size = size

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = FastRCNNConvFCHead.from_config(cfg, input_shape)
        ret["lif_factory"] = lambda: build_lif(cfg)
        return ret

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lif, conv in zip(self.conv_lifs, self.convs):
            x = seq_apply(conv, lif(x))
        if self.fcs:
            x = x.flatten(2)
        for lif, fc in zip(self.fc_lifs, self.fcs):
            x = fc(lif(x))
        return mean_over_time(x)

    @property
    def output_shape(self) -> ShapeSpec:
        o = self._output_size
        return ShapeSpec(channels=o) if isinstance(o, int) else ShapeSpec(channels=o[0], height=o[1], width=o[2])


@ROI_MASK_HEAD_REGISTRY.register()
class SpikeMaskRCNNConvUpsampleHead(BaseMaskRCNNHead):
    """Spiking FCN mask head (``SpikeFCNMaskHead``), without the original's stray ReLUs.

    ``(T, R, C, k, k)`` -> ``[LIF -> conv3x3 (+norm)]`` x N -> ``LIF -> deconv 2x2 s2`` ->
    ``LIF -> 1x1 predictor`` -> mean over T -> mask logits ``(R, K, 2k, 2k)``.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_classes, conv_dims, conv_norm="", lif_factory, **kwargs):
        super().__init__(**kwargs)
        if len(conv_dims) < 1:
            raise ValueError("conv_dims have to be non-empty")
        channels = input_shape.channels
        self.conv_lifs, self.convs = nn.ModuleList(), nn.ModuleList()
        for dim in conv_dims[:-1]:
            conv = Conv2d(channels, dim, kernel_size=3, padding=1, bias=not conv_norm, norm=get_norm(conv_norm, dim))
            self.conv_lifs.append(lif_factory())
            self.convs.append(conv)
            channels = dim
        self.deconv_lif = lif_factory()
        self.deconv = ConvTranspose2d(channels, conv_dims[-1], kernel_size=2, stride=2, padding=0)
        self.predictor_lif = lif_factory()
        self.predictor = Conv2d(conv_dims[-1], num_classes, kernel_size=1)
        for layer in [*self.convs, self.deconv]:
            weight_init.c2_msra_fill(layer)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = MaskRCNNConvUpsampleHead.from_config(cfg, input_shape)
        ret["lif_factory"] = lambda: build_lif(cfg)
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        for lif, conv in zip(self.conv_lifs, self.convs):
            x = seq_apply(conv, lif(x))
        x = seq_apply(self.deconv, self.deconv_lif(x))
        return mean_over_time(seq_apply(self.predictor, self.predictor_lif(x)))


@ROI_BOX_HEAD_REGISTRY.register()
def build_metaspike_box_head(cfg, input_shape):
    """:class:`SpikeFastRCNNConvFCHead` if ``MODEL.METASPIKE.SPIKING_HEADS`` else ``FastRCNNConvFCHead``."""
    return (SpikeFastRCNNConvFCHead if cfg.MODEL.METASPIKE.SPIKING_HEADS else FastRCNNConvFCHead)(cfg, input_shape)


@ROI_MASK_HEAD_REGISTRY.register()
def build_metaspike_mask_head(cfg, input_shape):
    """:class:`SpikeMaskRCNNConvUpsampleHead` if ``MODEL.METASPIKE.SPIKING_HEADS`` else ``MaskRCNNConvUpsampleHead``."""
    cls = SpikeMaskRCNNConvUpsampleHead if cfg.MODEL.METASPIKE.SPIKING_HEADS else MaskRCNNConvUpsampleHead
    return cls(cfg, input_shape)
