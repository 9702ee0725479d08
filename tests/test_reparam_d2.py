"""reparameterize() on the Detectron2 models (metaspike_d2.d2): exact on backbone/FPN features and on
the final outputs (boxes, scores, masks / semantic logits; RetinaNet: raw head outputs), T=1 and T=4,
both modes, tiny inputs. Built from configs/quickstart/*.yaml (+ RetinaNet with BN, tiny backbone), with
random, non-trivial BN statistics."""
import copy
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

import metaspike_d2.d2 as md2
from metaspike_d2 import reparameterize

from .test_reparam import TOL, activate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (the integer-spike *_d4 variants are compared in float64 in tests/test_integer_spikes.py: with four count
# boundaries per neuron, float32 rounding moves some count of a random-weight model by one)
QUICKSTART = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "quickstart", "*.yaml")) if not p.endswith("_d4.yaml"))
# Heads not in a quickstart config, run with the tiny backbone: RetinaNet (Sequential(conv, BN) subnets).
EXTRA = [(os.path.join(ROOT, "configs", "COCO-Detection", "retinanet_metaspike_15m_FPN_T1.yaml"),
          ["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.RETINANET.NORM", "BN"])]


def _build(path, t, opts=()):
    cfg = get_cfg()
    md2.add_metaspike_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.METASPIKE.T", t, *opts])
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep low-scoring detections
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.SEM_SEG_HEAD.NORM = cfg.MODEL.SEM_SEG_HEAD.NORM.replace("SyncBN", "BN")
    torch.manual_seed(0)
    return activate(build_model(cfg)).eval(), cfg


def _head_outputs(model, feats):
    """Raw outputs of a dense head (RetinaNet: class logits and box deltas per level), else nothing."""
    if not hasattr(model, "head_in_features"):
        return []
    logits, deltas = model.head([feats[f] for f in model.head_in_features])
    return [*logits, *deltas]


def _compare_dense_head(model, mode, x):
    """RetinaNet: raw head outputs, in float64. (A float32 rounding difference can flip a spike whose
    membrane sits exactly on the threshold: this head has such a tie at T=4 for this input, where the
    unfolded model computes exactly 2.0 and the folded one 1.9999999. Float64 leaves no such ties.)"""
    if not hasattr(model, "head_in_features"):
        return
    m64 = copy.deepcopy(model).double()
    rep64 = reparameterize(m64, mode)
    with torch.no_grad():
        ref = _head_outputs(m64, m64.backbone(x.double()))
        out = _head_outputs(rep64, rep64.backbone(x.double()))
    for r, o in zip(ref, out):
        assert (o - r).abs().max().item() <= TOL


def _compare(ref, out):
    if "sem_seg" in ref:
        assert (out["sem_seg"] - ref["sem_seg"]).abs().max().item() <= TOL
        return
    a, b = ref["instances"], out["instances"]
    assert len(a) == len(b) and len(a) > 0
    boxes_a, boxes_b = a.pred_boxes.tensor, b.pred_boxes.tensor
    if (boxes_a - boxes_b).abs().max().item() <= TOL and torch.equal(a.pred_classes, b.pred_classes):
        assert (a.scores - b.scores).abs().max().item() <= TOL
        if a.has("pred_masks"):  # binarized at 0.5 after pasting: allow a rounding flip of a few pixels
            assert (a.pred_masks != b.pred_masks).float().mean().item() < 1e-3
        return
    # Random weights give many near-equal scores, so rounding may reorder ties or swap the detections at
    # the top-k cut-off. Every detection scored clearly above the cut-off must then have a twin.
    # (A random RetinaNet head scores everything about equally: its raw outputs are compared instead.)
    keep = a.scores > a.scores.min() + 1e-3
    for i in keep.nonzero().flatten().tolist():
        dist = (boxes_b - boxes_a[i]).abs().max(1).values + (b.scores - a.scores[i]).abs()
        j = int(dist.argmin())
        assert dist[j].item() <= 2 * TOL and b.pred_classes[j] == a.pred_classes[i]


@pytest.mark.parametrize("path,opts", [(p, []) for p in QUICKSTART] + EXTRA,
                         ids=[os.path.basename(p) for p in QUICKSTART] + ["retinanet_tiny_bn"])
def test_exact_on_detectron2_models(path, opts):
    for t in (1, 4):
        model, cfg = _build(path, t, opts)
        size = 128 if cfg.INPUT.MIN_SIZE_TEST >= 128 else 64
        image = torch.rand(3, size, size) * 255
        inputs = [{"image": image, "height": size, "width": size}]
        with torch.no_grad():
            ref = model(inputs)[0]
            x = ((image - model.pixel_mean) / model.pixel_std)[None]  # size is a multiple of 32
            ref_feats = model.backbone(x)
        for mode in ("fast", "spike"):
            rep = reparameterize(model, mode)
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in rep.modules())
            with torch.no_grad():
                out = rep(inputs)[0]
                feats = rep.backbone(x)
            for k in ref_feats:
                err = (feats[k] - ref_feats[k]).abs().max().item()
                assert err <= TOL, f"{os.path.basename(path)} {mode} T={t} {k}: {err}"
            _compare(ref, out)
            _compare_dense_head(model, mode, x)


def test_config_key_applies_fast_mode_in_predictor():
    import numpy as np

    from metaspike_d2.d2.predictor import MetaSpikePredictor

    path = os.path.join(ROOT, "configs", "quickstart", "semfpn_metaspike_tiny_shapes.yaml")
    _, cfg = _build(path, 1)
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    assert cfg.MODEL.METASPIKE.REPARAM_INFERENCE == ""  # off by default
    torch.manual_seed(0)
    plain = MetaSpikePredictor(cfg)
    cfg.MODEL.METASPIKE.REPARAM_INFERENCE = "fast"
    torch.manual_seed(0)
    fast = MetaSpikePredictor(cfg)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())
    image = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")
    a, b = plain(image)["sem_seg"], fast(image)["sem_seg"]
    assert (a - b).abs().max().item() <= TOL
