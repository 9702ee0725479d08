"""RetinaNet with a spiking head (the original's ``SpikeRetinaHead`` with its bugs fixed).

``META_ARCH_REGISTRY``: ``MetaSpikeRetinaNet`` = Detectron2's ``RetinaNet`` whose head is
:class:`SpikeRetinaNetHead` when ``MODEL.METASPIKE.SPIKING_HEADS`` is true (else the stock head), and whose
candidate selection and NMS order score ties by index (:func:`~metaspike_d2.d2.rpn.stable_topk`,
:func:`~metaspike_d2.d2.rpn.stable_batched_nms`), as an exported graph does.
"""
from __future__ import annotations

import math
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.structures import Boxes, Instances
from torch import nn

from ..neurons import mean_over_time, seq_apply
from .backbone import build_lif
from .rpn import stable_batched_nms, stable_topk

__all__ = ["SpikeRetinaNetHead", "MetaSpikeRetinaNet"]


class _SpikeSubnet(nn.Module):
    """``[LIF -> conv3x3 (+norm)]`` x N, then ``LIF -> conv3x3 predictor``; ``(T, B, C, H, W) -> (B, C', H, W)``
    (mean over T). Each branch of the RetinaNet head is one of these, with its own neurons."""

    def __init__(self, in_channels: int, conv_dims: List[int], out_channels: int, norm, lif_factory):
        super().__init__()
        self.lifs, self.convs = nn.ModuleList(), nn.ModuleList()
        for dim in conv_dims:
            layers = [nn.Conv2d(in_channels, dim, kernel_size=3, padding=1)]
            if norm:
                layers.append(get_norm(norm, dim))
            self.lifs.append(lif_factory())
            self.convs.append(nn.Sequential(*layers))
            in_channels = dim
        self.pred_lif = lif_factory()
        self.pred = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lif, conv in zip(self.lifs, self.convs):
            x = seq_apply(conv, lif(x))
        return mean_over_time(seq_apply(self.pred, self.pred_lif(x)))


class SpikeRetinaNetHead(nn.Module):
    """Spiking RetinaNet head: separate cls and box subnets (each ``[LIF -> conv]`` x N, no ReLU) and a
    separate LIF before each predictor (the original shared one neuron between both branches).

    Input: ``(T, B, C, H, W)`` per level; output: Detectron2's per-level ``(B, A*K, H, W)`` logits and
    ``(B, A*4, H, W)`` deltas, averaged over T. Parameters ``cls_score`` / ``bbox_pred`` keep Detectron2's
    init (normal 0.01, prior-probability bias).
    """

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes, num_anchors, conv_dims: List[int], norm="",
                 prior_prob=0.01, lif_factory):
        super().__init__()
        channels = input_shape[0].channels
        self.cls_subnet = _SpikeSubnet(channels, conv_dims, num_anchors * num_classes, norm, lif_factory)
        self.bbox_subnet = _SpikeSubnet(channels, conv_dims, num_anchors * 4, norm, lif_factory)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, mean=0, std=0.01)
                nn.init.constant_(layer.bias, 0)
        nn.init.constant_(self.cls_subnet.pred.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        ret = RetinaNetHead.from_config(cfg, input_shape)
        ret["lif_factory"] = lambda: build_lif(cfg)
        return ret

    def forward(self, features: List[torch.Tensor]):
        return [self.cls_subnet(x) for x in features], [self.bbox_subnet(x) for x in features]


@META_ARCH_REGISTRY.register()
class MetaSpikeRetinaNet(RetinaNet):
    """Detectron2's ``RetinaNet``; with ``MODEL.METASPIKE.SPIKING_HEADS`` its head is :class:`SpikeRetinaNetHead`
    (fed by the spiking FPN's ``(T, B, C, H, W)`` levels)."""

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if cfg.MODEL.METASPIKE.SPIKING_HEADS:
            shapes = ret["backbone"].output_shape()
            ret["head"] = SpikeRetinaNetHead(cfg, [shapes[f] for f in cfg.MODEL.RETINANET.IN_FEATURES])
        return ret

    def _decode_per_level_predictions(self, anchors: Boxes, pred_scores: torch.Tensor, pred_deltas: torch.Tensor,
                                      score_thresh: float, topk_candidates: int, image_size) -> Instances:
        """Detectron2's, with :func:`stable_topk` for the top-k candidates (spiking heads produce exact score
        ties, whose order ``topk`` leaves open): ``(H*W*A, K)`` scores -> boxes, scores and classes."""
        keep = pred_scores > score_thresh
        pred_scores = pred_scores[keep]
        candidates = torch.nonzero(keep)  # (K, 2): anchor, class
        count = candidates.shape[0]
        k = torch.clamp(count, max=topk_candidates) if isinstance(count, torch.Tensor) else min(count, topk_candidates)
        pred_scores, idxs = stable_topk(pred_scores, k)
        anchor_idxs, class_idxs = candidates[idxs].unbind(dim=1)
        boxes = self.box2box_transform.apply_deltas(pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs])
        return Instances(image_size, pred_boxes=Boxes(boxes), scores=pred_scores, pred_classes=class_idxs)

    def inference_single_image(self, anchors, box_cls, box_delta, image_size):
        """Detectron2's, with :func:`stable_batched_nms` (ties in index order, as in an exported graph)."""
        pred = self._decode_multi_level_predictions(anchors, box_cls, box_delta, self.test_score_thresh,
                                                    self.test_topk_candidates, image_size)
        keep = stable_batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh)
        return pred[keep[: self.max_detections_per_image]]
