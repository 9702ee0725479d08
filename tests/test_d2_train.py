"""One training step and one inference for every detector family; every config in configs/ builds."""
import glob

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from metaspike_d2.d2 import add_metaspike_config, build_optimizer

CONFIGS = sorted(glob.glob("configs/COCO-*/*.yaml") + glob.glob("configs/quickstart/mask_rcnn_*.yaml")
                 + ["configs/Base-MetaSpike-RCNN-FPN.yaml"])
TINY = ["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.DEVICE", "cpu",
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 1, "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.RETINANET.NUM_CLASSES", 3,
        "MODEL.RETINANET.NUM_CONVS", 1, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.ROI_BOX_HEAD.NORM", "BN", "SOLVER.OPTIMIZER", "ADAMW"]


def make_cfg(config, *opts):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list([*TINY, *opts])
    return cfg


def test_configs_found():
    names = {c.split("/")[-1] for c in CONFIGS}
    assert {"mask_rcnn_metaspike_15m_FPN_T1.yaml", "mask_rcnn_metaspike_15m_FPN_T4.yaml",
            "mask_rcnn_metaspike_55m_FPN_T1.yaml", "mask_rcnn_metaspike_55m_FPN_T4.yaml",
            "retinanet_metaspike_15m_FPN_T1.yaml", "cascade_mask_rcnn_metaspike_15m_FPN_T1.yaml",
            "mask_rcnn_metaspike_tiny_shapes.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_builds(config):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 5e5
    if "coco" in cfg.DATASETS.TRAIN[0] and cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        assert model.backbone.bottom_up.time_steps == cfg.MODEL.METASPIKE.T


def _images(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    from detectron2.structures import BitMasks, Boxes, Instances
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 36.0], [20.0, 24.0, 60.0, 62.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 8:36, 8:40] = True
        masks[1, 24:62, 20:60] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float(),
                      "instances": inst, "height": size, "width": size})
    return batch


@pytest.mark.parametrize("config,opts", [
    ("configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml", []),
    ("configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T4.yaml", ["MODEL.METASPIKE.T", 2,
                                                                                "SOLVER.AMP.ENABLED", False]),
    ("configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml", ["MODEL.METASPIKE.SPIKING_HEADS", False]),
    ("configs/COCO-Detection/retinanet_metaspike_15m_FPN_T1.yaml", []),
    ("configs/COCO-InstanceSegmentation/cascade_mask_rcnn_metaspike_15m_FPN_T1.yaml", []),
    ("configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml", ["MODEL.METASPIKE.SPIKE_LEVELS", 4]),
    ("configs/COCO-Detection/retinanet_metaspike_15m_FPN_T1.yaml", ["MODEL.METASPIKE.SPIKE_LEVELS", 4]),
], ids=["mask_rcnn_T1", "mask_rcnn_T2", "mask_rcnn_stock_heads", "retinanet", "cascade", "mask_rcnn_D4", "retinanet_D4"])
def test_train_step_and_inference(config, opts):
    cfg = make_cfg(config, *opts)
    model = build_model(cfg)
    from spikingjelly.activation_based.neuron import BaseNode
    levels = {getattr(n, "spike_levels", 1) for n in model.modules() if isinstance(n, BaseNode)}
    assert levels == {cfg.MODEL.METASPIKE.SPIKE_LEVELS}  # backbone, neck and heads
    model.train()
    optimizer = build_optimizer(cfg, model)
    with EventStorage():
        losses = model(_images())
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    expected = {"loss_cls", "loss_box_reg"} if "retinanet" in config else {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"}
    assert expected <= {k.rsplit("_stage", 1)[0] for k in losses}
    optimizer.zero_grad()
    loss.backward()
    stem = model.backbone.bottom_up.stem.downsample.conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0  # gradients reach the encoding layer
    # from scratch (MODEL.WEIGHTS "") at 64 px the attention sees 4-16 tokens: every stage's gradient stays finite
    bottom_up = model.backbone.bottom_up
    for stage in ("stem", "stage1", "stage2", "stage3", "stage4"):
        norm = torch.nn.utils.get_total_norm([p.grad for p in getattr(bottom_up, stage).parameters()
                                              if p.grad is not None])
        assert torch.isfinite(norm) and 0 < norm < 1e3, (stage, norm)
    before = stem.detach().clone()
    optimizer.step()
    assert not torch.equal(before, stem.detach())

    model.eval()
    with torch.no_grad():
        out = model([{"image": im["image"], "height": 64, "width": 64} for im in _images()])
    assert len(out) == 2
    inst = out[0]["instances"]
    assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
    if cfg.MODEL.MASK_ON and len(inst):
        assert inst.pred_masks.shape[-2:] == (64, 64)


def test_quickstart_pools_every_shape_from_p2():
    """The quickstart's RoI heads read p2-p5, and Detectron2's level rule (canonical 224 px at p4) sends
    every shape the generator draws (28-80 px) to p2, the stride-4 level: the claim in its yaml."""
    import numpy as np
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import Boxes

    from metaspike_d2.data.shapes import render_shapes_image

    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file("configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml")
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(40):
        _, instances = render_shapes_image(rng)
        for _, mask in instances:
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    sizes = boxes.area().sqrt()
    assert sizes.max() < 112 and sizes.min() > 8
    for pooler in (model.roi_heads.box_pooler.pooler, model.roi_heads.mask_pooler.pooler):
        levels = assign_boxes_to_levels([boxes], pooler.min_level, pooler.max_level,
                                        pooler.canonical_box_size, pooler.canonical_level)
        assert levels.tolist() == [0] * len(boxes)
        assert pooler.level_poolers[0].spatial_scale == 1 / 4
    assert model.roi_heads.box_in_features[0] == "p2"
    assert model.proposal_generator.in_features == ["p3", "p4", "p5", "p6"]
