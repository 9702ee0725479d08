"""Meta-SpikeFormer as a Detectron2 backbone, and the FPNs built on it.

Registered in ``BACKBONE_REGISTRY``:

* ``build_metaspike_backbone``: the bottom-up :class:`MetaSpikeFormerBackbone` (features ``stage1..4``).
* ``build_metaspike_fpn_backbone``: bottom-up + FPN with P6 = max-pooled P5 (Mask R-CNN, Cascade).
* ``build_metaspike_retinanet_fpn_backbone``: bottom-up + FPN with P6/P7 convs on the last input (RetinaNet).

``MODEL.METASPIKE.SPIKING_HEADS`` picks the neck: ``True`` builds :class:`SpikeFPN` (every
feature stays ``(T, B, C, H, W)``), ``False`` averages the backbone features over T and builds
Detectron2's stock :class:`FPN` on ``(B, C, H, W)``.
"""
from __future__ import annotations

import math
from typing import Dict

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn

from ..backbone import MetaSpikeFormer
from ..neurons import mean_over_time, seq_apply, spiking_neuron

__all__ = [
    "MetaSpikeFormerBackbone",
    "SpikeFPN",
    "SpikeLastLevelMaxPool",
    "SpikeLastLevelP6P7",
    "build_lif",
    "build_metaspike_backbone",
    "build_metaspike_fpn_backbone",
    "build_metaspike_retinanet_fpn_backbone",
]


def build_lif(cfg) -> nn.Module:
    """A neuron of the spiking neck/heads with the ``MODEL.METASPIKE.NEURON`` settings: a binary LIF, or an
    I-LIF for ``MODEL.METASPIKE.SPIKE_LEVELS`` >= 2 (:func:`~metaspike_d2.neurons.spiking_neuron`)."""
    n = cfg.MODEL.METASPIKE.NEURON
    return spiking_neuron(n.V_THRESHOLD, cfg.MODEL.METASPIKE.SPIKE_LEVELS, tau=n.TAU, surrogate_alpha=n.SURROGATE_ALPHA)


class MetaSpikeFormerBackbone(MetaSpikeFormer, Backbone):
    """:class:`~metaspike_d2.backbone.MetaSpikeFormer` with Detectron2's ``Backbone`` interface.

    ``forward(images (B, 3, H, W))`` returns ``{name: (T, B, C, H/s, W/s)}``, or ``{name: (B, C, H/s, W/s)}``
    averaged over T when ``average_time`` (for stock Detectron2 necks and heads). Parameter names are
    exactly those of ``MetaSpikeFormer``, so backbone weight files load without any key mapping.
    """

    def __init__(self, *, average_time: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.average_time = average_time
        self._out_features = list(self.out_features)
        self._out_feature_channels = {f: self.feature_info[f].channels for f in self._out_features}
        self._out_feature_strides = {f: self.feature_info[f].stride for f in self._out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = super().forward(x)
        if self.average_time:
            features = {k: mean_over_time(v) for k, v in features.items()}
        return features


@BACKBONE_REGISTRY.register()
def build_metaspike_backbone(cfg, input_shape: ShapeSpec) -> MetaSpikeFormerBackbone:
    """Bottom-up Meta-SpikeFormer from ``MODEL.METASPIKE``."""
    m = cfg.MODEL.METASPIKE
    widths = list(m.WIDTHS) or None
    return MetaSpikeFormerBackbone(
        widths=widths,
        variant=None if widths else m.VARIANT,
        time_steps=m.T,
        in_chans=input_shape.channels,
        num_heads=m.NUM_HEADS,
        spike_levels=m.SPIKE_LEVELS,
        drop_path_rate=m.DROP_PATH_RATE,
        stage4_stride=m.STAGE4_STRIDE,
        out_features=m.OUT_FEATURES,
        average_time=not m.SPIKING_HEADS,
    )


class SpikeFPN(FPN):
    """Spiking FPN (the original's ``SpikeFPN``): every conv is driven by spikes, the sums are real.

    ``lateral_i = conv1x1(LIF(C_i))``; ``M_i = lateral_i + nearest_up2(M_{i+1})`` (real-valued sum);
    ``P_i = conv3x3(LIF(M_i))``; extra levels from ``top_block``. Inputs and outputs are
    ``(T, B, C, H, W)``; convs run with T folded into the batch. Same constructor, parameters and
    output names (``p2``..``p6``) as Detectron2's :class:`FPN`; one LIF per conv is added.
    """

    def __init__(self, *, lif_factory, **kwargs):
        super().__init__(**kwargs)
        self.lateral_lifs = nn.ModuleList([lif_factory() for _ in self.lateral_convs])
        self.output_lifs = nn.ModuleList([lif_factory() for _ in self.output_convs])

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up_features = self.bottom_up(x)
        lateral = zip(self.lateral_lifs, self.lateral_convs)
        output = zip(self.output_lifs, self.output_convs)
        results = []
        prev = None
        for idx, ((lat_lif, lat_conv), (out_lif, out_conv)) in enumerate(zip(lateral, output)):
            feature = bottom_up_features[self.in_features[-idx - 1]]
            lateral_features = seq_apply(lat_conv, lat_lif(feature))
            if prev is None:
                prev = lateral_features
            else:
                prev = lateral_features + seq_apply(lambda s: F.interpolate(s, scale_factor=2.0, mode="nearest"), prev)
                if self._fuse_type == "avg":
                    prev = prev / 2
            results.insert(0, seq_apply(out_conv, out_lif(prev)))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_in = bottom_up_features[self.top_block.in_feature]
            else:
                top_in = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_in))
        assert len(self._out_features) == len(results)
        return dict(zip(self._out_features, results))


class SpikeLastLevelMaxPool(LastLevelMaxPool):
    """P6 = max_pool(kernel 1, stride 2) of ``in_feature`` (P5), on ``(T, B, C, H, W)``."""

    def forward(self, x: torch.Tensor):
        return [seq_apply(lambda s: F.max_pool2d(s, kernel_size=1, stride=2, padding=0), x)]


class SpikeLastLevelP6P7(nn.Module):
    """RetinaNet's extra levels with spiking inputs: ``P6 = conv3x3s2(LIF(C5))``, ``P7 = conv3x3s2(LIF(P6))``.

    ``(T, B, C_in, H, W) -> [(T, B, C, H/2, W/2), (T, B, C, H/4, W/4)]`` (no ReLU, unlike the stock block).
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str, lif_factory):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6_lif, self.p7_lif = lif_factory(), lif_factory()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            weight_init.c2_xavier_fill(module)

    def forward(self, c5: torch.Tensor):
        p6 = seq_apply(self.p6, self.p6_lif(c5))
        return [p6, seq_apply(self.p7, self.p7_lif(p6))]


def _build_fpn(cfg, bottom_up: Backbone, top_block: nn.Module) -> FPN:
    kwargs = dict(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
                  norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
    if cfg.MODEL.METASPIKE.SPIKING_HEADS:
        return SpikeFPN(lif_factory=lambda: build_lif(cfg), **kwargs)
    return FPN(**kwargs)


def _last_level(bottom_up: Backbone, in_features) -> str:
    """FPN name (``p<log2 stride>``) of the coarsest input level."""
    return f"p{int(math.log2(bottom_up.output_shape()[in_features[-1]].stride))}"


@BACKBONE_REGISTRY.register()
def build_metaspike_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Meta-SpikeFormer + (spiking or stock) FPN, plus one max-pooled level.

    With the default stage-4 stride 2 and ``FPN.IN_FEATURES = stage1..stage4`` the outputs are
    ``p2..p6`` at strides 4..64; with ``STAGE4_STRIDE: 1`` use inputs at 4/8/16 (e.g. stage1, stage2,
    stage4) for ``p2..p5``.
    """
    bottom_up = build_metaspike_backbone(cfg, input_shape)
    top_block = SpikeLastLevelMaxPool() if cfg.MODEL.METASPIKE.SPIKING_HEADS else LastLevelMaxPool()
    top_block.in_feature = _last_level(bottom_up, cfg.MODEL.FPN.IN_FEATURES)
    return _build_fpn(cfg, bottom_up, top_block)


@BACKBONE_REGISTRY.register()
def build_metaspike_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Meta-SpikeFormer + FPN with P6/P7 computed from the coarsest *input* feature (``on_input``, as the
    original RetinaNet config). With ``FPN.IN_FEATURES = stage2..stage4``: ``p3..p7`` at strides 8..128."""
    bottom_up = build_metaspike_backbone(cfg, input_shape)
    last = cfg.MODEL.FPN.IN_FEATURES[-1]
    in_channels, out_channels = bottom_up.output_shape()[last].channels, cfg.MODEL.FPN.OUT_CHANNELS
    if cfg.MODEL.METASPIKE.SPIKING_HEADS:
        top_block = SpikeLastLevelP6P7(in_channels, out_channels, last, lambda: build_lif(cfg))
    else:
        top_block = LastLevelP6P7(in_channels, out_channels, in_feature=last)
    return _build_fpn(cfg, bottom_up, top_block)
