"""Spiking Semantic FPN: head and neck on tensors, the SemanticSegmentor built from configs (tiny, CPU),
stock SemSegFPNHead on the backbone, solver additions."""
import glob
import os

import pytest
import torch

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from metaspike_d2.d2 import add_metaspike_config, build_lr_scheduler, build_optimizer  # noqa: E402
from metaspike_d2.d2.sem_seg import SpikeFPNSemSeg, SpikeSemSegFPNHead  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
QUICKSTART = os.path.join(ROOT, "configs/quickstart/semfpn_metaspike_tiny_shapes.yaml")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs/*-SemanticSegmentation/semfpn_*.yaml")))


def load_cfg(path=QUICKSTART, *opts):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def batch(sizes, num_classes=4, with_targets=True):
    items = []
    for h, w in sizes:
        item = {"image": torch.randint(0, 256, (3, h, w)).float(), "height": h, "width": w}
        if with_targets:
            target = torch.randint(0, num_classes, (h, w))
            target[:2] = 255  # ignored
            item["sem_seg"] = target
        items.append(item)
    return items


SHAPES = {"p1": ShapeSpec(channels=8, stride=2), "p2": ShapeSpec(channels=8, stride=4),
          "p3": ShapeSpec(channels=8, stride=8), "p4": ShapeSpec(channels=8, stride=16)}


@pytest.mark.parametrize("time_steps", [None, 1, 3])
def test_head_on_tensors_output_at_input_resolution(time_steps):
    head = SpikeSemSegFPNHead(SHAPES, num_classes=5, conv_dims=8, common_stride=2)
    lead = () if time_steps is None else (time_steps,)
    feats = {k: (3 * torch.randn(*lead, 2, 8, 64 // s.stride, 96 // s.stride)).requires_grad_()
             for k, s in SHAPES.items()}
    # per level: max(1, log2(stride / common_stride)) units -> 1, 1, 2, 3 (the original's layout)
    assert [len(h.convs) for h in head.scale_heads] == [1, 1, 2, 3]
    targets = torch.randint(0, 5, (2, 64, 96))
    targets[:, :10] = 255
    _, losses = head(feats, targets)
    assert losses["loss_sem_seg"].isfinite() and losses["loss_sem_seg"] > 0
    losses["loss_sem_seg"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats.values())
    head.eval()
    logits, _ = head(feats)
    assert logits.shape == (2, 5, 64, 96)


def test_head_common_stride_4_and_bad_strides():
    shapes = {k: v for k, v in SHAPES.items() if k != "p1"}
    head = SpikeSemSegFPNHead(shapes, num_classes=3, conv_dims=8, common_stride=4).eval()
    feats = {k: torch.randn(2, 1, 8, 64 // s.stride, 64 // s.stride) for k, s in shapes.items()}
    assert head(feats)[0].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="stride 2"):
        SpikeSemSegFPNHead(SHAPES, num_classes=3, conv_dims=8, common_stride=4)


def test_head_ignores_ignore_value():
    head = SpikeSemSegFPNHead(SHAPES, num_classes=3, conv_dims=8, common_stride=2).eval()
    feats = {k: 3 * torch.randn(1, 8, 32 // s.stride, 32 // s.stride) for k, s in SHAPES.items()}
    targets = torch.full((1, 32, 32), 255)
    targets[0, 5, 7] = 1
    predictions = head.layers(feats)
    assert predictions.shape == (1, 3, 16, 16)
    loss = head.losses(predictions, targets)["loss_sem_seg"]
    logits = torch.nn.functional.interpolate(predictions, scale_factor=2, mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(logits[:, :, 5, 7], torch.tensor([1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("path", CONFIGS + [QUICKSTART], ids=os.path.basename)
def test_configs_build(path):
    cfg = load_cfg(path, "MODEL.DEVICE", "cpu")
    name = os.path.basename(path)
    assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == (150 if "ADE20K" in path else 21 if "VOC" in path else 4)
    if "_T4" in name:
        assert cfg.MODEL.METASPIKE.T == 4 and cfg.MODEL.WEIGHTS.endswith("_T1/model_final.pth")
        t1_output = os.path.basename(cfg.OUTPUT_DIR).replace("T4", "T1")
        assert os.path.basename(os.path.dirname(cfg.MODEL.WEIGHTS)) == t1_output
    if path in CONFIGS:
        assert cfg.INPUT.CROP.SIZE == [512, 512] and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
        assert cfg.SOLVER.POLY_LR_POWER == 1.0 and cfg.SOLVER.OPTIMIZER == "ADAMW"
    if "15m" in name or "tiny" in name:  # building the 55M models is slow on 2 cores; their widths are checked
        model = build_model(cfg)
        assert isinstance(model.backbone, SpikeFPNSemSeg)
        assert model.backbone.output_shape()["p1"].stride == 2
    else:
        assert cfg.MODEL.METASPIKE.VARIANT == "55m"
        assert cfg.MODEL.FPN.OUT_CHANNELS == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == 256


PAPER_LAYOUT = ("MODEL.METASPIKE.OUT_FEATURES", ["stem", "stage1", "stage2", "stage4"], "MODEL.FPN.IN_FEATURES",
                ["stem", "stage1", "stage2", "stage4"], "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p1", "p2", "p3", "p4"])


@pytest.mark.parametrize("time_steps,time_mode,layout", [(1, "mean", ()), (2, "mean", ()), (2, "spiking", ()),
                                                         (2, "spiking", PAPER_LAYOUT),
                                                         (1, "spiking", ("MODEL.METASPIKE.SPIKE_LEVELS", 4))])
def test_train_step_and_inference(time_steps, time_mode, layout):
    cfg = load_cfg(QUICKSTART, "MODEL.METASPIKE.T", time_steps, "MODEL.METASPIKE.SEM_SEG.TIME_MODE", time_mode, *layout)
    model = build_model(cfg)
    feats = model.backbone(torch.zeros(1, 3, 32, 48))
    rank = 4 if time_mode == "mean" else 5
    assert all(f.dim() == rank for f in feats.values()) and (rank == 4 or feats["p1"].shape[0] == time_steps)
    optimizer = build_optimizer(cfg, model)
    with EventStorage():
        losses = model(batch([(48, 64), (64, 48)]))
        loss = sum(losses.values())
        assert set(losses) == {"loss_sem_seg"} and loss.isfinite()
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert grads["backbone.bottom_up.stem.downsample.conv.weight"].abs().sum() > 0
        assert grads["sem_seg_head.predictor.bias"].abs().sum() > 0  # (its weight may see no spikes at init)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        images = batch([(50, 70), (64, 64)], with_targets=False)  # 50x70 is padded to the stride of stage 4 inside
        outputs = model(images)
        again = model(images)
    assert [o["sem_seg"].shape for o in outputs] == [(4, 50, 70), (4, 64, 64)]
    assert torch.equal(outputs[0]["sem_seg"], again[0]["sem_seg"])  # no state leaks between calls
    with torch.no_grad():
        padded = torch.zeros(1, 3, 64, 96)  # a multiple of every stride (stage 4: 32 in the quickstart)
        logits, _ = model.sem_seg_head(model.backbone(padded))
    assert logits.shape[-2:] == (64, 96)  # the head's output is at the input resolution, not stride 2


def test_stock_sem_seg_fpn_head_on_the_backbone():
    cfg = load_cfg(QUICKSTART, *PAPER_LAYOUT, "MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead",
                   "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p3", "p4"], "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4,
                   "MODEL.METASPIKE.T", 2)
    model = build_model(cfg)
    assert type(model.sem_seg_head).__name__ == "SemSegFPNHead"
    with EventStorage():
        loss = sum(model(batch([(64, 64)])).values())
        loss.backward()
    model.eval()
    with torch.no_grad():
        assert model(batch([(48, 64)], with_targets=False))[0]["sem_seg"].shape == (4, 48, 64)


def test_lr_multipliers_and_poly_schedule():
    cfg = load_cfg(QUICKSTART, "SOLVER.LR_MULTIPLIERS", [["sem_seg_head.", 2.0], ["backbone.lateral_convs.", 3.0]],
                   "SOLVER.MAX_ITER", 100, "SOLVER.WARMUP_ITERS", 0, "SOLVER.POLY_LR_POWER", 1.0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    assert lr_of[id(model.sem_seg_head.predictor.weight)] == pytest.approx(2 * base)
    assert lr_of[id(model.backbone.lateral_convs[0].conv.weight)] == pytest.approx(3 * base)
    assert lr_of[id(model.backbone.output_convs[0].conv.weight)] == pytest.approx(base)
    assert lr_of[id(model.backbone.bottom_up.stem.downsample.conv.weight)] == pytest.approx(base)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    predictor = model.sem_seg_head.predictor.weight
    head_group = next(g for g in optimizer.param_groups if any(p is predictor for p in g["params"]))
    assert head_group["lr"] == pytest.approx(2 * base * 0.5)  # poly, power 1, half-way


def test_demo_draws_semantic_segmentation(tmp_path):
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    demo.main(["--config-file", QUICKSTART, "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (64, 48)


def test_median_frequency_weights_by_hand(tmp_path):
    import numpy as np
    from PIL import Image
    from metaspike_d2.d2.sem_seg import median_frequency_weights
    a = np.zeros((4, 4), np.uint8)
    a[0] = 1                      # 12 px of class 0, 4 px of class 1
    b = np.zeros((4, 5), np.uint8)
    b[:, 4] = 255                 # 16 px of class 0, 4 px ignored
    files = []
    for name, arr in (("a", a), ("b", b)):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        files.append(str(tmp_path / f"{name}.png"))
    # f_0 = 28 / 32, f_1 = 4 / 16 (class 1 appears only in a); median 0.5625; class 2 never appears -> 1
    weights = median_frequency_weights(files, 3, 255)
    assert weights == pytest.approx([0.5625 / 0.875, 0.5625 / 0.25, 1.0])
    Image.fromarray(np.full((2, 2), 7, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad.png: label value 7 is outside 0..2"):
        median_frequency_weights([str(tmp_path / "bad.png")], 3, 255)


def test_class_weights_reach_the_loss():
    import torch.nn.functional as F
    torch.manual_seed(0)
    head = SpikeSemSegFPNHead({"p2": ShapeSpec(channels=4, stride=4)}, num_classes=3, conv_dims=4, common_stride=4,
                              class_weights=[0.0, 1.0, 1.0]).eval()  # eval: no dropout, same logits twice
    feats = {"p2": torch.randn(1, 2, 4, 4, 4) * 3}
    targets = torch.zeros(2, 16, 16, dtype=torch.long)
    targets[:, 8:] = 1
    logits = F.interpolate(head.layers(feats), scale_factor=4, mode="bilinear", align_corners=False)
    class1_only = F.cross_entropy(logits.permute(0, 2, 3, 1)[targets == 1], targets[targets == 1])
    assert head.losses(head.layers(feats), targets)["loss_sem_seg"].item() == pytest.approx(class1_only.item(), rel=1e-5)
    with pytest.raises(ValueError, match="class_weights has 2 entries for 3 classes"):
        SpikeSemSegFPNHead({"p2": ShapeSpec(channels=4, stride=4)}, num_classes=3, conv_dims=4, common_stride=4,
                           class_weights=[1.0, 1.0])
