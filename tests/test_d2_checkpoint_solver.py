"""Checkpointer (weights_only, backbone files, full-model round trip, --eval-only) and the AdamW solver."""
import importlib.util

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from metaspike_d2.backbone import MetaSpikeFormer
from metaspike_d2.checkpoint import CheckpointError, save_atomic, save_backbone_weights
from metaspike_d2.d2 import MetaSpikeCheckpointer, add_metaspike_config, build_lr_scheduler, build_optimizer

QUICKSTART = "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml"


def make_cfg(*opts):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
                         "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32, *opts])
    return cfg


def test_backbone_file_initializes_only_the_backbone(tmp_path):
    source = MetaSpikeFormer(variant="tiny", stage4_stride=2)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    sd = dict(source.state_dict())
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 96), torch.zeros(10)  # a classifier head: dropped
    path = save_backbone_weights(tmp_path / "backbone.pth", sd, source="test")
    model = build_model(make_cfg())
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.bottom_up.")}
    MetaSpikeCheckpointer(model).load(str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.bottom_up.state_dict()[k], v), k
    for k, v in model.state_dict().items():
        if k in heads_before:
            assert torch.equal(v, heads_before[k]), k


def test_backbone_file_with_missing_keys_is_refused(tmp_path):
    sd = dict(MetaSpikeFormer(variant="tiny").state_dict())
    del sd["stage3.blocks.0.attn.q_conv.pw1.weight"]
    path = tmp_path / "partial.pth"
    save_atomic({"model": sd}, path)
    with pytest.raises(CheckpointError, match="q_conv.pw1.weight"):
        MetaSpikeCheckpointer(build_model(make_cfg())).load(str(path))


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        MetaSpikeCheckpointer(build_model(make_cfg())).load(str(path))


def test_full_model_round_trip_and_eval_only(tmp_path):
    cfg = make_cfg()
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    MetaSpikeCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_final", iteration=7)
    other = build_model(cfg)
    extra = MetaSpikeCheckpointer(other).load(str(tmp_path / "model_final.pth"))
    assert extra["iteration"] == 7
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    # arbitrary objects in a checkpoint are refused (weights_only=True)
    torch.save({"model": model.state_dict(), "evil": object()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only|unpickle"):
        MetaSpikeCheckpointer(other).load(str(tmp_path / "evil.pth"))

    spec = importlib.util.spec_from_file_location("train_net", "tools/train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    from metaspike_d2.data.shapes import ShapesSplit, register_shapes_instances
    name = "test_d2_shapes_eval_only"
    register_shapes_instances(name, "evalonly", ShapesSplit(3, (64, 64), seed=11), tmp_path / "ds")
    args = train_net.argument_parser().parse_args([
        "--config-file", QUICKSTART, "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"),
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
        "DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path / "out")])
    results = train_net.main(args)
    assert {"bbox", "segm"} <= set(results) and "AP50" in results["bbox"]


def test_adamw_skips_weight_decay_on_norms_and_biases():
    cfg = make_cfg("SOLVER.WEIGHT_DECAY", 0.05)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["fused"] for g in optimizer.param_groups)  # the single-kernel update (docs/deviations.md)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)) or pname == "bias":
                assert decay[id(p)] == 0.0, f"{name}.{pname}"
            else:
                assert decay[id(p)] == 0.05, f"{name}.{pname}"


def test_warmup_linear_schedule_and_grad_clipping():
    cfg = make_cfg("SOLVER.MAX_ITER", 100, "SOLVER.WARMUP_ITERS", 10, "SOLVER.BASE_LR", 1.0,
                   "SOLVER.LINEAR_END_FACTOR", 0.01, "SOLVER.CLIP_GRADIENTS.ENABLED", True)
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(cfg, torch.nn.Linear(1, 1))
    assert "WithGradientClip" in type(optimizer).__name__
    optimizer = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert lrs[0] == pytest.approx(cfg.SOLVER.WARMUP_FACTOR)
    assert lrs[10] == pytest.approx(1 - 0.99 * 0.10, abs=1e-6)  # warm-up done, linear decay from 1
    assert lrs[99] == pytest.approx(1 - 0.99 * 0.99, abs=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
