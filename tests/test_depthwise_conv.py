"""DepthwiseConv2d: the channels_last CPU training path computes what the NCHW path computes."""
import copy

import pytest
import torch
from torch import nn

from metaspike_d2 import FEATURE_NAMES, MetaSpikeFormer
from metaspike_d2.blocks import DepthwiseConv2d


@pytest.fixture
def set_channels_last(monkeypatch):
    def use(flag: bool):
        monkeypatch.setattr(DepthwiseConv2d, "cpu_channels_last", flag)
    return use


def _layouts_seen(run):
    """Memory formats of the inputs every depthwise conv's kernel received during ``run()``."""
    seen = []
    original = nn.Conv2d._conv_forward

    def spy(self, x, weight, bias):
        if isinstance(self, DepthwiseConv2d):
            seen.append("channels_last" if x.is_contiguous(memory_format=torch.channels_last)
                        and not x.is_contiguous() else "nchw")
        return original(self, x, weight, bias)

    nn.Conv2d._conv_forward = spy
    try:
        out = run()
    finally:
        nn.Conv2d._conv_forward = original
    return seen, out


def test_training_path_matches_nchw_outputs_and_gradients(set_channels_last):
    torch.manual_seed(0)
    fast = MetaSpikeFormer(variant="tiny", time_steps=2, v_threshold=0.5, out_features=FEATURE_NAMES).train()
    reference = copy.deepcopy(fast)
    image = torch.randn(2, 3, 64, 64) * 2

    seen, out_fast = _layouts_seen(lambda: fast(image))
    assert seen and set(seen) == {"channels_last"}  # every depthwise conv took the NHWC path
    set_channels_last(False)
    seen, out_ref = _layouts_seen(lambda: reference(image))
    assert set(seen) == {"nchw"}

    for name in FEATURE_NAMES:
        assert out_fast[name].is_contiguous()
        torch.testing.assert_close(out_fast[name], out_ref[name], rtol=1e-5, atol=1e-5)
    sum((o ** 2).mean() for o in out_fast.values()).backward()
    sum((o ** 2).mean() for o in out_ref.values()).backward()
    ref_params = dict(reference.named_parameters())
    # A conv bias right before a training-mode BN has an exact gradient of 0: both paths then return rounding
    # noise of order float32 eps times the gradients flowing through, hence a floor scaled by the largest one.
    floor = 1e-6 * max(p.grad.abs().max().item() for p in reference.parameters())
    for name, p in fast.named_parameters():
        other = ref_params[name].grad
        scale = other.abs().max().item()
        err = (p.grad - other).abs().max().item()
        assert err <= 1e-4 * scale + floor, f"{name}: {err} (scale {scale}, floor {floor})"


def test_inference_keeps_nchw():
    model = MetaSpikeFormer(variant="tiny", out_features=("stage4",)).eval()
    with torch.no_grad():
        seen, _ = _layouts_seen(lambda: model(torch.randn(1, 3, 32, 32)))
    assert seen and set(seen) == {"nchw"}


def test_depthwise_conv_is_a_plain_depthwise_conv2d():
    conv = DepthwiseConv2d(8, 7, padding=3)
    assert (conv.groups, conv.in_channels, conv.out_channels, conv.bias) == (8, 8, 8, None)
    assert list(conv.state_dict()) == ["weight"]  # checkpoints and converted weights are unchanged
