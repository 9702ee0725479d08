"""Meta-SpikeFormer backbone and classifier: parameter counts, shapes, strides, T semantics, gradients."""
import pytest
import timm
import torch

import metaspike_d2  # noqa: F401  (registers the timm models)
from metaspike_d2 import FEATURE_NAMES, VARIANTS, MetaSpikeFormer, MetaSpikeFormerClassifier
from metaspike_d2.neurons import repeat_over_time

# exact counts of the original code (1000 classes), without head, and with head_kd.
PARAMS = {
    "15m": (15_112_208, 14_751_208, 15_473_208),
    "31m": (31_333_864, 30_852_864, 31_814_864),
    "55m": (55_350_248, 54_709_248, 55_991_248),
    "123m": (123_741_160, 122_780_160, 124_702_160),
}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", sorted(PARAMS))
def test_parameter_counts_match_the_original(variant):
    total, backbone, with_kd = PARAMS[variant]
    assert count(timm.create_model(f"metaspikeformer_{variant}")) == total
    assert count(MetaSpikeFormer(variant=variant)) == backbone
    assert count(timm.create_model(f"metaspikeformer_{variant}", kd=True)) == with_kd


@pytest.mark.parametrize("alias,variant", [("metaspikformer_8_384", "31m"), ("metaspikformer_8_512", "55m"),
                                           ("metaspikformer_8_768", "123m")])
def test_original_factory_names_are_aliases(alias, variant):
    assert count(timm.create_model(alias)) == PARAMS[variant][0]


def test_tiny_variant_counts():
    assert count(timm.create_model("metaspikeformer_tiny")) == 1_099_640  # README's table
    assert count(MetaSpikeFormer(variant="tiny")) == 1_002_640


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("stage4_stride", [1, 2])
def test_feature_shapes_and_strides(variant, stage4_stride):
    model = MetaSpikeFormer(variant=variant, time_steps=2, stage4_stride=stage4_stride,
                            out_features=FEATURE_NAMES).eval()
    c0, c1, c2, c3 = VARIANTS[variant].widths
    expected = {"stem": (c0 // 2, 2), "stage1": (c0, 4), "stage2": (c1, 8), "stage3": (c2, 16),
                "stage4": (c3, 16 * stage4_stride)}
    h, w = 64, 96
    with torch.no_grad():
        feats = model(torch.randn(1, 3, h, w))
    assert list(feats) == list(FEATURE_NAMES)
    for name, (channels, stride) in expected.items():
        assert (model.feature_info[name].channels, model.feature_info[name].stride) == (channels, stride)
        assert feats[name].shape == (2, 1, channels, h // stride, w // stride), name
    assert model.size_divisibility == 16 * stage4_stride


def test_out_features_subset_and_validation():
    model = MetaSpikeFormer(variant="tiny", out_features=("stage2", "stem")).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    assert list(feats) == ["stem", "stage2"]
    with pytest.raises(ValueError, match="out_features"):
        MetaSpikeFormer(variant="tiny", out_features=("res5",))
    with pytest.raises(ValueError, match="unknown Meta-SpikeFormer variant"):
        MetaSpikeFormer(variant="7m")
    with pytest.raises(ValueError, match="exactly one"):
        MetaSpikeFormer()
    with pytest.raises(ValueError, match="stage4_stride"):
        MetaSpikeFormer(variant="tiny", stage4_stride=4)


def test_time_steps_validation():
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        MetaSpikeFormer(variant="tiny", time_steps=0)
    model = MetaSpikeFormer(variant="tiny")
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        model.time_steps = -2


def test_direct_encoding_equals_repeating_the_image():
    """An image at T equals the same image repeated T times and fed as a (T, B, ...) sequence."""
    model = MetaSpikeFormer(variant="tiny", time_steps=3, out_features=FEATURE_NAMES).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(img)
        b = model(repeat_over_time(img, 3).contiguous())
    for name in FEATURE_NAMES:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_t1_features_are_the_first_step_of_t4_features():
    """Causality: step t depends only on steps <= t, so the T=1 output equals step 0 of a T=4 run (eval)."""
    model = MetaSpikeFormer(variant="tiny", out_features=FEATURE_NAMES).eval()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.time_steps = 1
        one = model(img)
        model.time_steps = 4
        four = model(img)
    for name in FEATURE_NAMES:
        assert four[name].shape[0] == 4
        assert torch.allclose(one[name][0], four[name][0], atol=1e-5), name


def test_classifier_logits_are_mean_over_time_and_kd_heads():
    model = MetaSpikeFormerClassifier(variant="tiny", num_classes=7, time_steps=2, kd=True)
    img = torch.randn(2, 3, 32, 32)
    model.train()
    out, out_kd = model(img)
    assert out.shape == out_kd.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(img)
        spikes = model.lif(feats.flatten(3).mean(3))
        expected = (model.head(spikes).mean(0) + model.head_kd(spikes).mean(0)) / 2
        assert torch.allclose(model(img), expected, atol=1e-6)
    assert feats.shape[0] == 2


def test_gradients_reach_the_encoding_conv_through_the_surrogate():
    model = timm.create_model("metaspikeformer_tiny", num_classes=5, T=2)
    with torch.no_grad():  # make sure spikes flow at initialization
        model.stem.downsample.bn.weight.fill_(3.0)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 3]))
    loss.backward()
    grad = model.stem.downsample.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("stage4")), \
        "every stage-4 parameter should get a gradient"


def test_two_identical_forwards_are_identical_in_train_and_eval():
    model = MetaSpikeFormer(variant="tiny", time_steps=2, out_features=FEATURE_NAMES)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        a, b = model(img), model(img)
        for name in FEATURE_NAMES:
            assert torch.equal(a[name], b[name])
        model.train()
        model.apply(lambda m: setattr(m, "momentum", 0.0) if isinstance(m, torch.nn.BatchNorm2d) else None)
        a, b = model(img), model(img)
        for name in FEATURE_NAMES:
            assert torch.equal(a[name], b[name])


def test_no_state_leak_under_ddp(tmp_path):
    """Under DistributedDataParallel (gloo, 1 process) repeated forwards stay identical."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(
            timm.create_model("metaspikeformer_tiny", num_classes=4, T=2).eval())
        img = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(img), model(img))
    finally:
        dist.destroy_process_group()


def test_drop_path_is_applied_in_training():
    model = timm.create_model("metaspikeformer_tiny", num_classes=3, drop_path_rate=0.5)
    rates = [blk.drop_path.rate for blk in [*model.stage3.blocks, *model.stage4.blocks]]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    block = model.stage4.blocks[1].train()
    x = torch.randn(2, 8, 96, 2, 2)
    torch.manual_seed(0)
    outs = [block.drop_path(x) for _ in range(20)]
    rate = block.drop_path.rate
    dropped = kept = 0
    for o in outs:
        per_sample = (o != 0).flatten(2).any(-1)  # (T, B)
        assert (per_sample == per_sample[0]).all()  # one decision per sample, shared across all T steps
        for b in range(x.shape[1]):
            if per_sample[0, b]:  # kept samples are rescaled by 1 / (1 - rate)
                assert torch.allclose(o[:, b], x[:, b] / (1 - rate), atol=1e-6)
                kept += 1
            else:
                dropped += 1
    assert 0.3 < dropped / (dropped + kept) < 0.7  # 160 draws at rate 0.5
    block.eval()
    assert torch.equal(block.drop_path(x), x)
