"""Spiking heads: shapes, spikes-only inputs, no ReLUs, T-folded RoIAlign, and the spiking/stock switch."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes
from torch import nn

from metaspike_d2.d2 import add_metaspike_config
from metaspike_d2.d2.backbone import SpikeFPN
from metaspike_d2.d2.retinanet import SpikeRetinaNetHead
from metaspike_d2.d2.roi_heads import SpikeFastRCNNConvFCHead, SpikeMaskRCNNConvUpsampleHead, TimeFoldedROIPooler
from metaspike_d2.d2.rpn import SpikeRPNHead
from metaspike_d2.neurons import MultiStepLIF

MASK = "configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml"
RETINA = "configs/COCO-Detection/retinanet_metaspike_15m_FPN_T1.yaml"


def make_cfg(config, *opts):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.DEVICE", "cpu",
                         "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
                         "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.RETINANET.NUM_CLASSES", 3,
                         "MODEL.RETINANET.NUM_CONVS", 2, *opts])
    return cfg


def test_switch_builds_spiking_heads():
    model = build_model(make_cfg(MASK))
    assert isinstance(model.backbone, SpikeFPN)
    assert isinstance(model.proposal_generator.rpn_head, SpikeRPNHead)
    assert isinstance(model.roi_heads.box_head, SpikeFastRCNNConvFCHead)
    assert isinstance(model.roi_heads.mask_head, SpikeMaskRCNNConvUpsampleHead)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    for m in model.modules():  # detectron2 Conv2d with an activation would be a hidden ReLU
        assert getattr(m, "activation", None) is None


def test_switch_builds_stock_neck_and_heads():
    model = build_model(make_cfg(MASK, "MODEL.METASPIKE.SPIKING_HEADS", False))
    assert type(model.backbone) is FPN
    assert type(model.proposal_generator.rpn_head) is StandardRPNHead
    assert type(model.roi_heads.box_head) is FastRCNNConvFCHead
    assert type(model.roi_heads.mask_head) is MaskRCNNConvUpsampleHead
    heads = [m for n, m in model.named_modules() if not n.startswith("backbone.bottom_up")]
    assert not any(isinstance(m, MultiStepLIF) for m in heads)


@pytest.mark.parametrize("spiking,cls", [(True, SpikeRetinaNetHead), (False, RetinaNetHead)])
def test_retinanet_switch(spiking, cls):
    model = build_model(make_cfg(RETINA, "MODEL.METASPIKE.SPIKING_HEADS", spiking))
    assert type(model.head) is cls


def test_spiking_heads_feed_convs_and_fcs_with_spikes_only():
    model = build_model(make_cfg(MASK, "MODEL.METASPIKE.T", 2))
    model.eval()
    inputs = []
    heads = [model.proposal_generator.rpn_head, model.roi_heads.box_head, model.roi_heads.mask_head]
    for head in heads:
        for m in head.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.register_forward_pre_hook(lambda mod, inp: inputs.append(inp[0]))
    with torch.no_grad():
        model([{"image": torch.randint(0, 255, (3, 64, 64)).float(), "height": 64, "width": 64}])
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for h in heads for m in h.modules())
    assert len(inputs) >= n_layers - 3  # the mask head may see no detections from an untrained model
    for x in inputs:
        assert ((x == 0) | (x == 1)).all()


def test_time_folded_roi_pooler_equals_pooling_each_time_step():
    pooler = ROIPooler((7, 7), scales=(1 / 4, 1 / 8), sampling_ratio=0, pooler_type="ROIAlignV2")
    folded = TimeFoldedROIPooler(pooler)
    feats = [torch.randn(3, 2, 4, 32, 32), torch.randn(3, 2, 4, 16, 16)]
    boxes = [Boxes(torch.tensor([[1.0, 2.0, 60.0, 50.0], [10.0, 10.0, 120.0, 126.0]])),
             Boxes(torch.tensor([[0.0, 0.0, 30.0, 30.0]]))]
    out = folded(feats, boxes)
    assert out.shape == (3, 3, 4, 7, 7)
    for t in range(3):
        torch.testing.assert_close(out[t], pooler([f[t] for f in feats], boxes))
    torch.testing.assert_close(folded([f[0] for f in feats], boxes), pooler([f[0] for f in feats], boxes))


def test_box_and_mask_head_shapes_average_over_time():
    cfg = make_cfg(MASK, "MODEL.METASPIKE.T", 2)
    box = SpikeFastRCNNConvFCHead(cfg, ShapeSpec(channels=16, height=7, width=7))
    mask = SpikeMaskRCNNConvUpsampleHead(cfg, ShapeSpec(channels=16, height=14, width=14))
    x = torch.randn(2, 5, 16, 7, 7) * 4
    y = box(x)
    assert y.shape == (5, 32) and box.output_shape.channels == 32
    # T-mean of the membrane output = T-mean of the logits of a linear predictor
    lin = nn.Linear(32, 4)
    per_t = torch.stack([box.fcs[1](box.fc_lifs[1](box.fcs[0](box.fc_lifs[0](x.flatten(2)))))[t] for t in range(2)])
    torch.testing.assert_close(lin(y), lin(per_t).mean(0))
    assert mask.layers(torch.randn(2, 5, 16, 14, 14)).shape == (5, 3, 28, 28)


def test_rpn_head_outputs_detectron2_layout():
    cfg = make_cfg(MASK, "MODEL.METASPIKE.T", 3)
    head = SpikeRPNHead(cfg, [ShapeSpec(channels=16, stride=s) for s in (4, 8, 16, 32, 64)])
    feats = [torch.randn(3, 2, 16, 16 // 2**i, 16 // 2**i) * 3 for i in range(5)]
    obj, deltas = head(feats)
    assert [o.shape for o in obj] == [(2, 3, 16 // 2**i, 16 // 2**i) for i in range(5)]
    assert [d.shape for d in deltas] == [(2, 12, 16 // 2**i, 16 // 2**i) for i in range(5)]


def test_neuron_settings_reach_the_heads():
    model = build_model(make_cfg(MASK, "MODEL.METASPIKE.NEURON.V_THRESHOLD", 0.75))
    lifs = [m for n, m in model.named_modules()
            if isinstance(m, MultiStepLIF) and not n.startswith("backbone.bottom_up")]
    assert lifs and all(m.v_threshold == 0.75 for m in lifs)
    # the backbone's neurons keep their own settings (stored with its weights): 0.5, attention 0.25
    assert {m.v_threshold for m in model.backbone.bottom_up.modules() if isinstance(m, MultiStepLIF)} == {0.5, 0.25}
