"""Detectron2 backbones: feature shapes and strides, spiking vs. stock FPN, stage-4 stride options."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import FPN
from torch import nn

from metaspike_d2.d2 import add_metaspike_config
from metaspike_d2.d2.backbone import MetaSpikeFormerBackbone, SpikeFPN
from metaspike_d2.neurons import MultiStepLIF

BASE = "configs/Base-MetaSpike-RCNN-FPN.yaml"


def make_cfg(*opts, config=BASE):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.DEVICE", "cpu",
                         *opts])
    return cfg


def test_bottom_up_shapes_and_strides_stage4_stride2():
    cfg = make_cfg("MODEL.BACKBONE.NAME", "build_metaspike_backbone", "MODEL.METASPIKE.T", 2)
    bb = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(bb, MetaSpikeFormerBackbone)
    shapes = bb.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}
    assert {k: v.channels for k, v in shapes.items()} == {"stage1": 16, "stage2": 32, "stage3": 64, "stage4": 96}
    assert bb.size_divisibility == 32
    out = bb(torch.randn(2, 3, 64, 96))
    for name, spec in shapes.items():
        assert out[name].shape == (2, 2, spec.channels, 64 // spec.stride, 96 // spec.stride)


def test_spiking_fpn_keeps_time_and_strides():
    cfg = make_cfg("MODEL.METASPIKE.T", 2)
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(fpn, SpikeFPN)
    shapes = fpn.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    out = fpn(torch.randn(1, 3, 128, 64))
    for name, spec in shapes.items():
        assert out[name].shape == (2, 1, 16, 128 // spec.stride, 64 // spec.stride)
    assert torch.equal(out["p6"], out["p5"][..., ::2, ::2])  # max-pool kernel 1 stride 2


def test_spiking_fpn_convs_see_only_spikes():
    """LIF before every lateral and output conv: each conv's input is binary."""
    fpn = build_backbone(make_cfg("MODEL.METASPIKE.T", 2), ShapeSpec(channels=3))
    seen = []
    for conv in [*fpn.lateral_convs, *fpn.output_convs]:
        conv.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    fpn(torch.randn(1, 3, 64, 64) * 3)
    assert len(seen) == 8
    for x in seen:
        assert ((x == 0) | (x == 1)).all()
    assert sum(x.sum() for x in seen) > 0
    assert not any(isinstance(m, nn.ReLU) for m in fpn.modules())


def test_stock_fpn_averages_time_before_the_neck():
    cfg = make_cfg("MODEL.METASPIKE.T", 2, "MODEL.METASPIKE.SPIKING_HEADS", False)
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    assert type(fpn) is FPN and fpn.bottom_up.average_time
    assert not any(isinstance(m, MultiStepLIF) for n, m in fpn.named_modules() if not n.startswith("bottom_up"))
    out = fpn(torch.randn(1, 3, 64, 64))
    assert out["p2"].shape == (1, 16, 16, 16) and out["p6"].shape == (1, 16, 1, 1)


def test_stage4_stride1_fpn_from_stride_4_8_16():
    cfg = make_cfg(config="configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1_stage4s1.yaml")
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    assert fpn.bottom_up.output_shape()["stage4"].stride == 16
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    out = fpn(torch.randn(1, 3, 64, 64))
    assert out["p4"].shape[-2:] == (4, 4) and out["p5"].shape[-2:] == (2, 2)


def test_stage4_stride1_with_four_levels_is_rejected():
    """Strides 4/8/16/16 are not log2-contiguous: Detectron2's FPN refuses them."""
    cfg = make_cfg("MODEL.METASPIKE.STAGE4_STRIDE", 1)
    with pytest.raises(AssertionError, match="log2 contiguous"):
        build_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("spiking", [True, False])
def test_retinanet_fpn_levels(spiking):
    cfg = make_cfg("MODEL.METASPIKE.SPIKING_HEADS", spiking,
                   config="configs/COCO-Detection/retinanet_metaspike_15m_FPN_T1.yaml")
    fpn = build_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    out = fpn(torch.randn(1, 3, 128, 128))
    assert out["p7"].shape[-2:] == (1, 1)
    assert out["p3"].dim() == (5 if spiking else 4)
