"""classification/: train + eval, resume, distillation, export (tiny model, 32 px, a few synthetic images)."""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from classification import export, train  # noqa: E402
from classification.data import SYNTHETIC_CLASSES, build_dataset, make_synthetic_imagefolder  # noqa: E402
from classification.distill import DistillationLoss, build_teacher  # noqa: E402
from metaspike_d2 import MetaSpikeFormer  # noqa: E402
from metaspike_d2.backbone import OWN_BUFFERS  # noqa: E402
from metaspike_d2.checkpoint import (CheckpointError, load_backbone_weights, load_checkpoint_file,  # noqa: E402
                                     load_state_dict_strict, original_key_map)

# 2 train / 1 val image per class: 20 training images = 2 steps of 10, 10 val images. (With the original's
# projection-BN eps the tiny model's gradient norm overflows at 32 px: every step would be skipped and the run
# would stop with TrainingDivergedError; tests/test_from_scratch.py, tests/test_divergence.py.)
BASE = ["--model", "metaspikeformer_tiny", "--data-path", "synthetic", "--synthetic-per-class", "2", "1",
        "--input-size", "32", "--batch-size", "10", "--num-workers", "0", "--warmup-epochs", "0",
        "--blr", "1e-2", "--no-amp"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    make_synthetic_imagefolder(str(d), train_per_class=2, val_per_class=1)
    return str(d)


def run(synth_dir, out, *extra):
    args = train.parse_args([*BASE, "--synthetic-dir", synth_dir, "--output-dir", str(out), *extra])
    return train.main(args)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    """One epoch of training + eval; shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("t1")
    record = run(synth_dir, out, "--epochs", "1")
    return out, record


def test_synthetic_data_is_deterministic(tmp_path):
    a = make_synthetic_imagefolder(str(tmp_path / "a"), train_per_class=1, val_per_class=1)
    b = make_synthetic_imagefolder(str(tmp_path / "b"), train_per_class=1, val_per_class=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * len(SYNTHETIC_CLASSES)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sorted(d.name for d in (a / "train").iterdir()) == sorted(SYNTHETIC_CLASSES)


def test_missing_data_path_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class_name>"):
        build_dataset(str(tmp_path / "nowhere"), "train", None)
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing split folder 'val'"):
        build_dataset(str(tmp_path / "d"), "val", None)


def test_train_and_eval_one_epoch(trained, synth_dir):
    out, record = trained
    (rec,) = read_log(out)
    assert rec["epoch"] == 0 and rec == pytest.approx(record)
    for key in ("train_loss", "val_top1", "val_top5", "lr"):
        assert isinstance(rec[key], float) and rec[key] == rec[key]
    assert rec["train_images"] == 20 and rec["val_images"] == 10
    assert rec["nonfinite_grad_steps"] == 0 and rec["optimizer_steps"] == 2  # 2 optimizer steps, each checked
    assert 0 <= rec["val_top1"] <= rec["val_top5"] <= 100
    assert rec["lr"] > 0
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    ckpt = load_checkpoint_file(out / train.CHECKPOINT_LAST)  # weights_only=True
    assert ckpt["epoch"] == 0 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "metaspikeformer_tiny"
    assert {"model", "optimizer", "scheduler", "scaler"} <= set(ckpt)
    # lr = blr * batch / 256; the model trained (weights moved away from the initial ones)
    assert ckpt["args"]["lr"] == pytest.approx(1e-2 * 10 / 256)

    # --eval at another T on the same checkpoint: the same val set, metrics in range
    stats = train.main(train.parse_args([*BASE, "--synthetic-dir", synth_dir, "--eval", "--time-steps", "2",
                                         "--resume", str(out / train.CHECKPOINT_LAST)]))
    assert stats["time_steps"] == 2 and stats["val_images"] == 10 and not stats["kd_head"]
    assert 0 <= stats["val_top1"] <= 100


def test_resume_continues_epochs_and_optimizer(synth_dir, tmp_path):
    full = tmp_path / "full"
    run(synth_dir, full, "--epochs", "2", "--warmup-epochs", "1")
    part = tmp_path / "part"
    run(synth_dir, part, "--epochs", "2", "--warmup-epochs", "1", "--max-epochs-per-run", "1")
    first = load_checkpoint_file(part / train.CHECKPOINT_LAST)
    assert first["epoch"] == 0 and [r["epoch"] for r in read_log(part)] == [0]
    run(synth_dir, part, "--epochs", "2", "--warmup-epochs", "1", "--resume", "auto")
    assert [r["epoch"] for r in read_log(part)] == [0, 1]
    a = load_checkpoint_file(full / train.CHECKPOINT_LAST)
    b = load_checkpoint_file(part / train.CHECKPOINT_LAST)
    assert b["epoch"] == 1
    def steps(c):  # timm's Lamb counts per group, AdamW (the small-data recipe's) per parameter
        group = c["optimizer"]["param_groups"][0]
        return int(group["step"]) if "step" in group else int(c["optimizer"]["state"][0]["step"])
    assert steps(first) == 2 and steps(b) == 4  # the optimizer's step counts continued
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(a["optimizer"]["param_groups"][0]["lr"])
    # the resumed run did exactly what the uninterrupted one did
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)


def test_distillation_loss_matches_deit():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    head, head_kd = torch.randn(5, 4), torch.randn(5, 4)
    ce = torch.nn.CrossEntropyLoss()
    hard = DistillationLoss(ce, teacher, "hard", alpha=0.5)(x, (head, head_kd), y)
    expected = 0.5 * ce(head, y) + 0.5 * ce(head_kd, teacher(x).argmax(1))
    torch.testing.assert_close(hard, expected)
    soft = DistillationLoss(ce, teacher, "soft", alpha=0.5, tau=2.0)(x, (head, head_kd), y)
    p_t = torch.softmax(teacher(x) / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(head_kd / 2, 1))).sum() * 4 / head_kd.numel()
    torch.testing.assert_close(soft, 0.5 * ce(head, y) + 0.5 * kl)
    assert DistillationLoss(ce, None, "none")(x, (head, head_kd), y) == ce(head, y)
    with pytest.raises(ValueError, match="kd=True"):
        DistillationLoss(ce, teacher, "hard")(x, head, y)


def test_teacher_weights_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        build_teacher("caformer_b36.sail_in22k_ft_in1k", str(tmp_path / "missing.pth"), 1000, torch.device("cpu"))
    with pytest.raises(ValueError, match="--teacher-weights"):
        build_teacher("caformer_b36.sail_in22k_ft_in1k", "", 1000, torch.device("cpu"))


def test_kd_finetune_t1_to_t2_with_stand_in_teacher(trained, synth_dir, tmp_path):
    """The T=1 -> T=4 recipe in small: init from the T=1 checkpoint (head_kd new), hard distillation."""
    out_t1, _ = trained
    teacher = timm.create_model("test_efficientnet", num_classes=len(SYNTHETIC_CLASSES))
    weights = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, weights)
    out = tmp_path / "kd"
    record = run(synth_dir, out, "--epochs", "1", "--time-steps", "2", "--kd", "--distillation-type", "hard",
                 "--teacher-model", "test_efficientnet", "--teacher-weights", str(weights),
                 "--finetune", str(out_t1 / train.CHECKPOINT_LAST), "--blr", "2e-5", "--model-ema")
    assert record["train_loss"] == record["train_loss"] and record["val_images"] == 10
    assert "val_top1_ema" in record
    ckpt = load_checkpoint_file(out / train.CHECKPOINT_LAST)
    assert "head_kd.weight" in ckpt["model"] and "model_ema" in ckpt
    init = load_checkpoint_file(out_t1 / train.CHECKPOINT_LAST)["model"]
    # the backbone started from the T=1 weights (tiny lr: still close), head_kd did not exist there
    assert "head_kd.weight" not in init
    assert torch.allclose(ckpt["model"]["stage4.downsample.conv.weight"], init["stage4.downsample.conv.weight"],
                          atol=1e-3)
    # a KD checkpoint evaluates without --kd (head_kd is detected), at T=1
    stats = train.main(train.parse_args([*BASE, "--synthetic-dir", synth_dir, "--eval",
                                         "--resume", str(out / train.CHECKPOINT_LAST)]))
    assert stats["kd_head"] and stats["val_images"] == 10


def test_distillation_requires_kd_head(synth_dir, tmp_path):
    with pytest.raises(SystemExit, match="--kd"):
        run(synth_dir, tmp_path, "--epochs", "1", "--distillation-type", "hard", "--teacher-weights", "x.pth")


def _assert_loads_into_backbone(path, reference):
    state_dict, meta = load_backbone_weights(path)
    for stride in (1, 2):  # stage4_stride changes no weight shape
        report = load_state_dict_strict(MetaSpikeFormer(variant="tiny", stage4_stride=stride), state_dict, source=path)
        assert report.missing == [] and report.unexpected == [] and report.complete
    assert meta["widths"] == [16, 32, 64, 96]
    for key, value in state_dict.items():
        torch.testing.assert_close(value, reference[key], msg=key)
    return meta


def test_export_ours_then_load_into_backbone(trained, tmp_path, capsys):
    out, _ = trained
    ckpt = out / train.CHECKPOINT_LAST
    weights = tmp_path / "tiny_backbone.pth"
    report = export.main(["--input", str(ckpt), "--output", str(weights), "--variant", "tiny"])
    assert report["dropped"] == ["head.weight", "head.bias"]
    assert "dropped (classifier only): head.weight, head.bias" in capsys.readouterr().out
    meta = _assert_loads_into_backbone(weights, load_checkpoint_file(ckpt)["model"])
    assert meta["format"] == "metaspike_d2.backbone/1"


def test_export_original_layout(tmp_path):
    model = timm.create_model("metaspikeformer_tiny", num_classes=7, kd=True)
    ours = model.state_dict()
    inverse = {v: k for k, v in original_key_map(("head", "head_kd")).items()}
    original = {}
    for key, value in ours.items():
        if key in OWN_BUFFERS:  # not in the original's files: the converter adds the original's values
            continue
        if ".mlp.fc" in key and key.endswith(".weight"):
            value = value.squeeze(-1)  # the original's Conv1d weights (out, in, 1)
        original[inverse[key]] = value
    src = tmp_path / "checkpoint-299.pth"
    torch.save({"model": {f"module.{k}": v for k, v in original.items()}, "epoch": 299}, src)
    report = export.export_backbone(str(src), str(tmp_path / "bb.pth"))
    assert report["layout"] == "original BICLab" and sorted(report["dropped"]) == sorted(
        ["head.weight", "head.bias", "head_kd.weight", "head_kd.bias"])
    expected = {**ours, "v_threshold": torch.tensor(1.0, dtype=torch.float64),  # the original's settings
                "attn_proj_bn_eps": torch.tensor(1e-5, dtype=torch.float64), "spike_levels": torch.tensor(1)}
    _assert_loads_into_backbone(tmp_path / "bb.pth", expected)


def test_export_wrong_variant_and_truncated_file(trained, tmp_path):
    out, _ = trained
    ckpt = out / train.CHECKPOINT_LAST
    with pytest.raises(SystemExit, match=r"do not match --variant 15m"):
        export.main(["--input", str(ckpt), "--output", str(tmp_path / "x.pth"), "--variant", "15m"])
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        export.main(["--input", str(bad), "--output", str(tmp_path / "y.pth")])
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()
    with pytest.raises(CheckpointError):
        load_checkpoint_file(bad)


def test_randaugment_posterize_at_full_magnitude():
    """timm's RandAugment posterize asks for 0 bits at magnitude 10 (hit with mstd0.5 around m9); under
    Pillow >= 13 that raised a ValueError in the data loader. The transform must survive it."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from classification import data  # noqa: F401  (installs the fix)

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(img)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(img).getpixel((0, 0)) == (192, 64, 0)  # 2 bits


def test_export_loads_through_detectron2_model_weights(trained, tmp_path):
    """The exported file as MODEL.WEIGHTS: Detectron2's checkpointer initialises the whole backbone from it."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from metaspike_d2.d2 import MetaSpikeCheckpointer, add_metaspike_config
    from metaspike_d2.d2.backbone import build_metaspike_backbone

    out, _ = trained
    weights = tmp_path / "tiny_backbone.pth"
    export.main(["--input", str(out / train.CHECKPOINT_LAST), "--output", str(weights)])
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.MODEL.METASPIKE.VARIANT = "tiny"
    model = torch.nn.Module()
    model.backbone = build_metaspike_backbone(cfg, ShapeSpec(channels=3))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    MetaSpikeCheckpointer(model).load(str(weights))
    trained_sd = load_checkpoint_file(out / train.CHECKPOINT_LAST)["model"]
    assert set(before) == {k for k in trained_sd if not k.startswith("head")}
    assert any(not torch.equal(before[k], trained_sd[k]) for k in before)  # the load changed the weights
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, trained_sd[key], msg=key)


@pytest.mark.parametrize("variant", ["15m", "31m", "55m"])
def test_recipe_configs_match_the_original(variant, tmp_path):
    configs = ROOT / "classification" / "configs"
    t1 = train.parse_args(["--config", str(configs / f"{variant}_t1.yaml")])
    assert (t1.model, t1.time_steps, t1.kd, t1.opt) == (f"metaspikeformer_{variant}", 1, False, "lambc")
    assert t1.blr * t1.batch_size * 8 / 256 == pytest.approx(2.4e-3)  # 8 GPUs x 128
    assert (t1.epochs, t1.warmup_epochs, t1.weight_decay, t1.smoothing, t1.mixup, t1.cutmix) == (200, 10, 0.05, 0.1, 0, 0)
    kd = train.parse_args(["--config", str(configs / f"{variant}_t4_kd.yaml"), "--epochs", "7"])
    assert (kd.time_steps, kd.kd, kd.distillation_type, kd.distillation_alpha) == (4, True, "hard", 0.5)
    assert kd.teacher_model == "caformer_b36.sail_in22k_ft_in1k" and kd.finetune.endswith(f"{variant}_t1/checkpoint-last.pth")
    assert kd.blr * kd.batch_size * 8 / 256 == pytest.approx(1.5e-5)  # 8 GPUs x 24
    assert kd.epochs == 7  # the command line overrides the config
    assert timm.is_model(kd.model)  # the name is registered
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(SystemExit, match="unknown keys"):
        train.parse_args(["--config", str(bad)])
