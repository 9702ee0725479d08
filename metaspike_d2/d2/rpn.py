"""Spiking RPN head (the original's ``SpikeRPNHead``), the head switch, and an RPN whose
proposal selection breaks score ties by anchor index.

Registered in ``RPN_HEAD_REGISTRY``: ``SpikeRPNHead`` and ``build_metaspike_rpn_head`` (spiking or
Detectron2's ``StandardRPNHead``, chosen by ``MODEL.METASPIKE.SPIKING_HEADS``); in
``PROPOSAL_GENERATOR_REGISTRY``: ``MetaSpikeRPN``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN, RPN_HEAD_REGISTRY, StandardRPNHead
from detectron2.structures import Boxes, Instances
from torch import nn

from ..neurons import mean_over_time, seq_apply
from .backbone import build_lif

__all__ = ["SpikeRPNHead", "build_metaspike_rpn_head", "MetaSpikeRPN", "find_top_proposals", "stable_topk",
           "stable_batched_nms"]


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


def stable_topk(x: torch.Tensor, k, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim)`` with ties in index order (the lower index first), as ONNX's ``TopK`` defines them.

    ``torch.topk`` leaves the order of equal values unspecified, and spiking heads produce exact ties: every
    anchor whose input spike pattern is the same (all zero, say) gets the same logit. A stable descending sort
    makes PyTorch keep the proposals an exported graph keeps: while tracing this is ``topk``, which exports to
    ONNX ``TopK`` (ties by index by definition).
    """
    if torch.jit.is_tracing():
        return x.topk(k, dim=dim)
    values, indices = x.sort(dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def stable_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Detectron2's ``batched_nms`` with the kept indices by descending score, ties in index order.

    The kept set does not depend on the path, but its order does: torchvision's per-class path (taken for more
    than 1000 boxes on the CPU) sorts the result with an unstable sort, while its coordinate-trick path and
    ONNX's ``NonMaxSuppression`` (what an exported graph runs) order ties by index.
    """
    keep = batched_nms(boxes, scores, idxs, iou_threshold)
    if torch.jit.is_tracing():
        return keep
    keep = keep.sort().values
    return keep[scores[keep].sort(descending=True, stable=True).indices]


def find_top_proposals(proposals: List[torch.Tensor], logits: List[torch.Tensor], image_sizes, nms_thresh: float,
                       pre_nms_topk: int, post_nms_topk: int, min_box_size: float, training: bool) -> List[Instances]:
    """Detectron2's ``find_top_rpn_proposals`` with :func:`stable_topk` and :func:`stable_batched_nms`.

    ``proposals``: per level ``(N, Hi*Wi*A, 4)``; ``logits``: per level ``(N, Hi*Wi*A)``. Returns per image the
    ``post_nms_topk`` proposals left by a per-level NMS, by descending objectness (ties: level, then anchor).
    """
    scores, boxes, levels = [], [], []
    for level, (proposals_i, logits_i) in enumerate(zip(proposals, logits)):
        count = logits_i.shape[1]
        k = torch.clamp(count, max=pre_nms_topk) if isinstance(count, torch.Tensor) else min(count, pre_nms_topk)
        top_scores, top_idx = stable_topk(logits_i, k, dim=1)
        scores.append(top_scores)
        boxes.append(torch.gather(proposals_i, 1, top_idx.unsqueeze(-1).expand(-1, -1, proposals_i.shape[-1])))
        levels.append(torch.full_like(top_idx[0], level))
    scores, boxes, levels = torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(levels, 0)
    results = []
    for n, image_size in enumerate(image_sizes):
        image_boxes, image_scores, image_levels = Boxes(boxes[n]), scores[n], levels
        valid = torch.isfinite(image_boxes.tensor).all(dim=1) & torch.isfinite(image_scores)
        if not bool(valid.all()) or torch.jit.is_tracing():
            if training:
                raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
            image_boxes, image_scores, image_levels = image_boxes[valid], image_scores[valid], image_levels[valid]
        image_boxes.clip(image_size)
        keep = image_boxes.nonempty(threshold=min_box_size)
        image_boxes, image_scores, image_levels = image_boxes[keep], image_scores[keep], image_levels[keep]
        keep = stable_batched_nms(image_boxes.tensor, image_scores, image_levels, nms_thresh)[:post_nms_topk]
        result = Instances(image_size)
        result.proposal_boxes = image_boxes[keep]
        result.objectness_logits = image_scores[keep]
        results.append(result)
    return results


@PROPOSAL_GENERATOR_REGISTRY.register()
class MetaSpikeRPN(RPN):
    """Detectron2's ``RPN`` selecting proposals with :func:`find_top_proposals` (score ties broken by index,
    so that the PyTorch model and its exported graph keep the same proposals). Same parameters and losses."""

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes):
        with torch.no_grad():
            pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            return find_top_proposals(pred_proposals, pred_objectness_logits, image_sizes, self.nms_thresh,
                                      self.pre_nms_topk[self.training], self.post_nms_topk[self.training],
                                      self.min_box_size, self.training)
