"""Spiking RPN head (the original's ``SpikeRPNHead``, spec §2.3) and the head switch.

Registered in ``RPN_HEAD_REGISTRY``: ``SpikeRPNHead`` and ``build_metaspike_rpn_head`` (spiking or
Detectron2's ``StandardRPNHead``, chosen by ``MODEL.METASPIKE.SPIKING_HEADS``).
"""
from __future__ import annotations

from typing import List

import torch
from detectron2.config import configurable
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead
from torch import nn

from ..neurons import mean_over_time, seq_apply
from .backbone import build_lif

__all__ = ["SpikeRPNHead", "build_metaspike_rpn_head"]


@RPN_HEAD_REGISTRY.register()
class SpikeRPNHead(nn.Module):
    """``[LIF -> conv3x3]`` x len(conv_dims) (no ReLU), then ``LIF -> 1x1 objectness`` and ``1x1 deltas``.

    Input: one ``(T, B, C, H, W)`` tensor per level. Output: Detectron2's ``(B, A, H, W)`` objectness
    logits and ``(B, A*box_dim, H, W)`` deltas per level, averaged over T. The two predictors share
    one LIF: the original gave each its own neuron on the same input, which spikes identically.
    """

    @configurable
    def __init__(self, *, in_channels: int, num_anchors: int, box_dim: int = 4, conv_dims: List[int] = (-1,),
                 lif_factory):
        super().__init__()
        self.conv_lifs = nn.ModuleList()
        self.convs = nn.ModuleList()
        channels = in_channels
        for dim in conv_dims:
            out = channels if dim == -1 else dim
            if out <= 0:
                raise ValueError(f"RPN conv output channels must be > 0, got {out}")
            self.conv_lifs.append(lif_factory())
            self.convs.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            channels = out
        self.pred_lif = lif_factory()
        self.objectness_logits = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * box_dim, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = StandardRPNHead.from_config(cfg, input_shape)
        ret["lif_factory"] = lambda: build_lif(cfg)
        return ret

    def forward(self, features: List[torch.Tensor]):
        objectness, deltas = [], []
        for x in features:
            for lif, conv in zip(self.conv_lifs, self.convs):
                x = seq_apply(conv, lif(x))
            s = self.pred_lif(x)
            objectness.append(mean_over_time(seq_apply(self.objectness_logits, s)))
            deltas.append(mean_over_time(seq_apply(self.anchor_deltas, s)))
        return objectness, deltas


@RPN_HEAD_REGISTRY.register()
def build_metaspike_rpn_head(cfg, input_shape):
    """:class:`SpikeRPNHead` if ``MODEL.METASPIKE.SPIKING_HEADS`` else Detectron2's ``StandardRPNHead``."""
    return (SpikeRPNHead if cfg.MODEL.METASPIKE.SPIKING_HEADS else StandardRPNHead)(cfg, input_shape)
