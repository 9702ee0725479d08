"""Spiking Semantic FPN for Detectron2: the original's ``FPN_SNN`` neck and ``FPNHead_SNN`` head.

Feature convention between modules: a 5-D feature is a spike-driven sequence ``(T, B, C, H, W)``; a 4-D
feature ``(B, C, H, W)`` has had time collapsed already and counts as a sequence of length 1. The spiking
modules accept both, so they run on any Detectron2 backbone, and Detectron2's stock ``SemSegFPNHead``
runs on :class:`SpikeFPNSemSeg` in ``"mean"`` mode (its outputs are then 4-D).

* :class:`SpikeFPNSemSeg` (backbone ``build_metaspike_sem_seg_fpn_backbone``): Meta-SpikeFormer
  bottom-up + spiking FPN neck, ``LIF -> 1x1 lateral``, nearest top-down sum, ``LIF -> 3x3 output``,
  no extra levels. Time modes (``MODEL.METASPIKE.SEM_SEG.TIME_MODE``): ``"mean"`` (the original's
  ``decode_mode='snn'``: every stage is averaged over T before the neck, so neck and head run one time
  step) and ``"spiking"`` (T kept to the logits).
* :class:`SpikeSemSegFPNHead` (``SEM_SEG_HEADS_REGISTRY``): per level ``[LIF -> 3x3 conv + norm
  (-> bilinear x2)]`` until ``common_stride``; sum; LIF; Dropout2d; 1x1 classifier; mean over T.
  Unlike the original (declared strides 4..32, real 2..16), the head reads the true strides from the
  backbone, and its logits are upsampled by exactly ``common_stride`` back to the input resolution.
* :func:`build_sem_seg_evaluator`: Detectron2's ``SemSegEvaluator`` with a label reader that works on NumPy 2.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.evaluation import SemSegEvaluator
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, Backbone
from detectron2.utils.file_io import PathManager

from ..neurons import MultiStepLIF, mean_over_time, seq_apply
from .backbone import build_lif, build_metaspike_backbone

__all__ = [
    "TIME_MODES",
    "as_sequence",
    "SpikeConv",
    "SpikeFPNSemSeg",
    "SpikeSemSegFPNHead",
    "build_metaspike_sem_seg_fpn_backbone",
    "build_sem_seg_evaluator",
    "load_sem_seg_gt",
    "median_frequency_weights",
]

#: How T reaches the neck (``MODEL.METASPIKE.SEM_SEG.TIME_MODE``): averaged first, or kept.
TIME_MODES = ("mean", "spiking")


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (1, B, C, H, W)``; a 5-D ``(T, B, C, H, W)`` sequence is returned as is."""
    if x.dim() == 4:
        return x.unsqueeze(0)
    if x.dim() == 5:
        return x
    raise ValueError(f"expected a feature (B, C, H, W) or (T, B, C, H, W), got shape {tuple(x.shape)}")


class SpikeConv(nn.Module):
    """``LIF -> conv [-> norm]`` on a sequence: ``(T, B, C_in, H, W) -> (T, B, C_out, H, W)``.

    The conv input is a spike map; the output is real valued (a "membrane" for the next LIF).
    The conv has a bias only when there is no norm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str = "",
                 lif_factory: Callable[[], nn.Module] = MultiStepLIF):
        super().__init__()
        self.lif = lif_factory()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                           bias=not norm, norm=get_norm(norm, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seq_apply(self.conv, self.lif(x))


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class SpikeFPNSemSeg(Backbone):
    """Bottom-up backbone + spiking FPN neck (the original's ``FPN_SNN``), as one Detectron2 backbone.

    ``lateral_i = conv1x1(LIF(C_i))``; ``M_i = lateral_i + nearest_resize(M_{i+1})`` (real-valued sum);
    ``P_i = conv3x3(LIF(M_i))``; no extra levels. ``forward(image (B, 3, H, W))`` returns
    ``{"p<log2 s>": P}`` at the strides of ``in_features`` (``p1..p4`` for the paper's stem, stage1,
    stage2, stage4 at strides 2/4/8/16), ``out_channels`` each, with the rank of the bottom-up
    features: ``(T, B, C, H/s, W/s)``, or ``(B, C, H/s, W/s)`` when the bottom-up averaged over T (the
    neck then runs one time step, as the original's ``decode_mode='snn'``).

    Args:
        bottom_up: a Detectron2 backbone whose features are ``(T, B, C, H, W)`` or ``(B, C, H, W)``.
        in_features: bottom-up features fed to the neck, any order (sorted by stride here).
        out_channels: neck width.
        norm: normalization after each neck conv (Detectron2 name, e.g. "BN"); "" (the original) gives
            biased convs without normalization.
        lif_factory: builds the neck's neurons.
    """

    def __init__(self, bottom_up: Backbone, in_features: Sequence[str], out_channels: int, norm: str = "",
                 lif_factory: Callable[[], nn.Module] = MultiStepLIF):
        super().__init__()
        shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing or not in_features:
            raise ValueError(f"in_features {list(in_features)} must be a non-empty subset of the bottom-up "
                             f"features {sorted(shapes)}")
        self.bottom_up = bottom_up
        self.in_features = sorted(in_features, key=lambda f: shapes[f].stride)
        strides = [shapes[f].stride for f in self.in_features]
        if len(set(strides)) != len(strides):
            raise ValueError(f"the neck needs one feature per stride, got strides {strides} for {self.in_features}")
        self.lateral_convs = nn.ModuleList(
            SpikeConv(shapes[f].channels, out_channels, 1, norm, lif_factory) for f in self.in_features)
        self.output_convs = nn.ModuleList(
            SpikeConv(out_channels, out_channels, 3, norm, lif_factory) for _ in self.in_features)
        for m in [*self.lateral_convs, *self.output_convs]:
            weight_init.c2_xavier_fill(m.conv)

        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {f: out_channels for f in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return self.bottom_up.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.bottom_up.padding_constraints

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up = self.bottom_up(x)
        feats = [bottom_up[f] for f in self.in_features]
        averaged = feats[0].dim() == 4
        laterals = [conv(as_sequence(f)) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            size = laterals[i - 1].shape[-2:]
            laterals[i - 1] = laterals[i - 1] + seq_apply(lambda s: F.interpolate(s, size=size, mode="nearest"),
                                                          laterals[i])
        outs = [conv(lat) for conv, lat in zip(self.output_convs, laterals)]
        return dict(zip(self._out_features, [o.squeeze(0) for o in outs] if averaged else outs))


class _ScaleHead(nn.Module):
    """``n`` units of ``LIF -> 3x3 conv + norm``, the first ``n_up`` of them followed by a bilinear x2."""

    def __init__(self, in_channels: int, conv_dims: int, norm: str, n_up: int, lif_factory: Callable[[], nn.Module]):
        super().__init__()
        self.convs = nn.ModuleList(SpikeConv(in_channels if k == 0 else conv_dims, conv_dims, 3, norm=norm,
                                             lif_factory=lif_factory) for k in range(max(1, n_up)))
        for m in self.convs:
            weight_init.c2_msra_fill(m.conv)
        self.n_up = n_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, conv in enumerate(self.convs):
            x = conv(x)
            if k < self.n_up:
                x = seq_apply(_upsample2x, x)
        return x


@SEM_SEG_HEADS_REGISTRY.register()
class SpikeSemSegFPNHead(nn.Module):
    """Spiking Semantic FPN head (the original's ``FPNHead_SNN``): features -> logits ``(B, K, H, W)``.

    Every input feature at stride ``s`` gets ``max(1, log2(s / common_stride))`` units of
    ``LIF -> 3x3 conv + norm``, each unit but the extra one followed by a bilinear x2, so all levels meet at
    ``common_stride``; then sum -> LIF -> Dropout2d -> 1x1 classifier on spikes -> mean over T. The logits
    are upsampled by ``common_stride`` (bilinear) to the padded input size; training uses cross-entropy
    with ``ignore_value``. Inputs may be ``(T, B, C, H, W)`` or ``(B, C, H, W)`` (T = 1).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        conv_dims: int,
        common_stride: int,
        norm: str = "BN",
        dropout: float = 0.1,
        loss_weight: float = 1.0,
        ignore_value: int = 255,
        class_weights: Optional[Sequence[float]] = None,
        lif_factory: Callable[[], nn.Module] = MultiStepLIF,
    ):
        super().__init__()
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {num_classes} classes")
        # per-class cross-entropy weights (MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING); not saved: they follow from the data
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor(list(class_weights), dtype=torch.float32), persistent=False)
        if not input_shape:
            raise ValueError("SpikeSemSegFPNHead(input_shape=) cannot be empty")
        items = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in items]
        self.common_stride = common_stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.scale_heads = nn.ModuleList()
        for name, shape in items:
            ratio = shape.stride / common_stride
            if ratio < 1 or not math.log2(ratio).is_integer():
                raise ValueError(f"feature {name!r} has stride {shape.stride}; it must be common_stride "
                                 f"({common_stride}) times a power of two (leave it out of IN_FEATURES "
                                 "or lower COMMON_STRIDE)")
            self.scale_heads.append(_ScaleHead(shape.channels, conv_dims, norm, int(math.log2(ratio)), lif_factory))
        self.decode_lif = lif_factory()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
            "dropout": head.DROPOUT,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
            "class_weights": _class_weights_from_config(cfg),
            "lif_factory": lambda: build_lif(cfg),
        }

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        """Training: ``(None, {"loss_sem_seg": loss})``; inference: ``(logits (B, K, H, W), {})``."""
        x = self.layers(features)
        if self.training:
            return None, self.losses(x, targets)
        return F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False), {}

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at ``common_stride``, averaged over T: ``(B, K, H / common_stride, W / common_stride)``."""
        x = sum(head(as_sequence(features[f])) for f, head in zip(self.in_features, self.scale_heads))
        x = seq_apply(lambda s: self.predictor(self.dropout(s)), self.decode_lif(x))
        return mean_over_time(x)

    def losses(self, predictions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        predictions = F.interpolate(predictions.float(), scale_factor=self.common_stride, mode="bilinear",
                                    align_corners=False)
        loss = F.cross_entropy(predictions, targets, weight=self.class_weights, reduction="mean",
                               ignore_index=self.ignore_value)
        return {"loss_sem_seg": loss * self.loss_weight}


#: Values of ``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING``.
CLASS_WEIGHTINGS = ("", "median_frequency")


def median_frequency_weights(label_files: Sequence[str], num_classes: int, ignore_value: int) -> List[float]:
    """Median-frequency balancing (Eigen & Fergus 2015; SegNet's CamVid recipe): ``w_c = median(f) / f_c``.

    ``f_c`` is the pixel count of class c divided by the pixel count of the label maps in which c appears,
    so a class that is small where it occurs (poles, signs, pedestrians) gets a large weight and the
    dominant ones (road, sky) a small one. Classes that never occur get weight 1. Reads every label map
    once (a few seconds for hundreds of maps).
    """
    counts = np.zeros(num_classes, dtype=np.float64)
    present_pixels = np.zeros(num_classes, dtype=np.float64)
    for path in label_files:
        labels = load_sem_seg_gt(path, dtype=np.int64).ravel()
        labels = labels[labels != ignore_value]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{path}: label value {int(labels.max())} is outside 0..{num_classes - 1} "
                             f"(and is not the ignore value {ignore_value})")
        image_counts = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
        counts += image_counts
        present_pixels += (image_counts > 0) * labels.size
    seen = counts > 0
    if not seen.any():
        raise ValueError("class weighting: no labelled pixel in the training set")
    freq = np.where(seen, counts / np.maximum(present_pixels, 1), 0.0)
    median = float(np.median(freq[seen]))
    return [float(median / f) if f > 0 else 1.0 for f in freq]


def _class_weights_from_config(cfg) -> Optional[List[float]]:
    mode = cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING must be one of {CLASS_WEIGHTINGS}, got {mode!r}")
    if not mode:
        return None
    from detectron2.data import DatasetCatalog

    files = [d["sem_seg_file_name"] for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    head = cfg.MODEL.SEM_SEG_HEAD
    weights = median_frequency_weights(files, head.NUM_CLASSES, head.IGNORE_VALUE)
    logging.getLogger(__name__).info("median-frequency class weights from %d label maps of %s: %s", len(files),
                                     ", ".join(cfg.DATASETS.TRAIN), " ".join(f"{w:.2f}" for w in weights))
    return weights


@BACKBONE_REGISTRY.register()
def build_metaspike_sem_seg_fpn_backbone(cfg, input_shape: ShapeSpec) -> SpikeFPNSemSeg:
    """Meta-SpikeFormer (``MODEL.METASPIKE``) + spiking FPN neck (``MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM}``).

    ``MODEL.METASPIKE.SEM_SEG.TIME_MODE`` sets how T reaches the neck: ``"mean"`` averages every stage
    over T first (the original); ``"spiking"`` keeps ``(T, B, C, H, W)`` through neck and head. It takes
    the place of ``MODEL.METASPIKE.SPIKING_HEADS`` (detection's switch) for this backbone.
    """
    time_mode = cfg.MODEL.METASPIKE.SEM_SEG.TIME_MODE
    if time_mode not in TIME_MODES:
        raise ValueError(f"MODEL.METASPIKE.SEM_SEG.TIME_MODE must be one of {TIME_MODES}, got {time_mode!r}")
    bottom_up = build_metaspike_backbone(cfg, input_shape)
    bottom_up.average_time = time_mode == "mean"
    return SpikeFPNSemSeg(bottom_up, cfg.MODEL.FPN.IN_FEATURES, cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
                          lif_factory=lambda: build_lif(cfg))


def load_sem_seg_gt(filename: str, dtype=int) -> np.ndarray:
    """A label map as an array. ``SemSegEvaluator``'s default reader calls ``np.array(..., copy=False)``,
    which NumPy 2 rejects for PIL images."""
    with PathManager.open(filename, "rb") as f:
        return np.asarray(Image.open(f), dtype=dtype)


def build_sem_seg_evaluator(dataset_name: str, output_dir: Optional[str] = None) -> SemSegEvaluator:
    """Detectron2's ``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC) with a NumPy-2-safe label reader."""
    return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_dir, sem_seg_loading_fn=load_sem_seg_gt)
