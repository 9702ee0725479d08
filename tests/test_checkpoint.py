"""Checkpoint safety and the converter for the original BICLab checkpoints."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import metaspike_d2  # noqa: F401
from metaspike_d2.checkpoint import (
    CheckpointError,
    convert_original_state_dict,
    load_backbone_weights,
    load_checkpoint_file,
    load_state_dict_strict,
    save_atomic,
    save_backbone_weights,
)
from metaspike_d2.backbone import MetaSpikeFormer
from tests.original_reference import Spiking_vit_MetaFormer

ROOT = Path(__file__).resolve().parents[1]
TINY = [16, 32, 64, 96]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics that keep neurons firing, so logits depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype == torch.long:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1 and "bn" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 2 + 1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / max(1, t[0].numel()) ** 0.5))
    return model


def write_original_checkpoint(path, kd=True, num_classes=10, drop=None):
    ref = randomize(Spiking_vit_MetaFormer(TINY, num_classes=num_classes, kd=kd)).eval()
    sd = ref.state_dict()
    if drop:
        sd.pop(drop)
    args = argparse.Namespace(model="metaspikformer_8_512", time_steps=1, kd=kd, blr=6e-4, input_size=224)
    torch.save({"model": sd, "args": args, "epoch": 199, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}}, path)
    return ref


@pytest.mark.parametrize("time_steps", [1, 4])
def test_converted_original_checkpoint_gives_the_original_logits(tmp_path, time_steps):
    src, dst = tmp_path / "orig.pth", tmp_path / "ours.pth"
    ref = write_original_checkpoint(src, kd=True)
    out = subprocess.run([sys.executable, str(ROOT / "tools/convert_original.py"), "--input", str(src),
                          "--output", str(dst)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kd head: True" in out.stdout and "[16, 32, 64, 96]" in out.stdout
    model = timm.create_model("metaspikeformer_tiny", num_classes=10, kd=True, T=time_steps,
                              checkpoint_path=str(dst)).eval()
    ref.T = time_steps
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(img), model(img)
    assert expected.abs().max() > 0.01, "degenerate reference (no spikes reach the head)"
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_converted_file_holds_only_safe_types(tmp_path):
    src, dst = tmp_path / "orig.pth", tmp_path / "ours.pth"
    write_original_checkpoint(src, kd=False)
    subprocess.run([sys.executable, str(ROOT / "tools/convert_original.py"), "--input", str(src),
                    "--output", str(dst)], check=True, capture_output=True)
    ckpt = torch.load(dst, weights_only=True)  # no allowlist needed any more
    assert ckpt["widths"] == TINY and ckpt["kd"] is False and ckpt["num_classes"] == 10
    assert ckpt["original_args"]["model"] == "metaspikformer_8_512" and ckpt["original_epoch"] == 199
    assert "optimizer" not in ckpt


def test_converter_fails_on_a_missing_key(tmp_path):
    src, dst = tmp_path / "orig.pth", tmp_path / "ours.pth"
    write_original_checkpoint(src, drop="block3.2.attn.k_conv.0.body.1.bn.running_var")
    out = subprocess.run([sys.executable, str(ROOT / "tools/convert_original.py"), "--input", str(src),
                          "--output", str(dst)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "block3.2.attn.k_conv.0.body.1.bn.running_var" in out.stderr and "missing (1)" in out.stderr
    assert not dst.exists()


def test_converter_fails_on_an_unexpected_key():
    sd = Spiking_vit_MetaFormer(TINY, num_classes=3).state_dict()
    sd["block4.1.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): \['block4.1.attn.extra.weight'\]"):
        convert_original_state_dict(sd)


class NotAllowlisted:
    """Stands in for any class a checkpoint might pickle (and run code through)."""


def test_arbitrary_pickles_are_refused_with_a_hint(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "obj": NotAllowlisted()}, path)
    with pytest.raises(CheckpointError, match="convert_original.py"):
        load_checkpoint_file(path)


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
    path = tmp_path / "w.pth"
    save_atomic({"model": MetaSpikeFormer(variant="tiny").state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "nope.pth")


def test_strict_load_reports_every_difference():
    model = MetaSpikeFormer(variant="tiny")
    sd = MetaSpikeFormer(variant="15m").state_dict()
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, sd, "15m weights")
    assert "shape mismatches" in str(e.value) and "stem.downsample.conv.weight" in str(e.value)
    sd = model.state_dict()
    sd.pop("stage4.blocks.1.mlp.fc2.bias")
    sd["extra"] = torch.zeros(1)
    report = load_state_dict_strict(model, sd, "partial", allow_partial=True)
    assert report.missing == ["stage4.blocks.1.mlp.fc2.bias"] and report.unexpected == ["extra"]


def test_backbone_weights_round_trip(tmp_path):
    clf = timm.create_model("metaspikeformer_tiny", num_classes=5, kd=True)
    path = save_backbone_weights(tmp_path / "bb.pth", clf.state_dict(), "test")
    heads = ["head.bias", "head.weight", "head_kd.bias", "head_kd.weight"]
    sd, meta = load_backbone_weights(path)
    assert meta["widths"] == TINY and sorted(meta["dropped"]) == heads  # heads are not written, but reported
    assert not any(k.startswith("head") for k in torch.load(path, weights_only=True)["model"])
    backbone = MetaSpikeFormer(variant="tiny", stage4_stride=2)
    report = load_state_dict_strict(backbone, sd, str(path))
    assert report.complete
    # a classification checkpoint of ours is accepted too, its heads dropped and reported
    save_atomic({"model": clf.state_dict()}, tmp_path / "clf.pth")
    sd, meta = load_backbone_weights(tmp_path / "clf.pth")
    assert sorted(meta["dropped"]) == heads


def test_save_atomic_leaves_no_partial_file(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    path = tmp_path / "ckpt.pth"
    save_atomic({"a": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"a": Boom()}, path)
    assert torch.load(path, weights_only=True)["a"].shape == (1,)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
