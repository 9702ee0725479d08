"""SyncBN conversion keeps BN-and-pad's border (torch's converter alone would drop it)."""
import torch
from torch import nn

from metaspike_d2 import MetaSpikeFormer
from metaspike_d2.blocks import BNAndPad, SyncBNAndPad, convert_sync_batchnorm


def test_convert_sync_batchnorm_keeps_padding_and_weights():
    model = MetaSpikeFormer(variant="tiny", time_steps=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(img)["stage4"]
    n_pad = sum(isinstance(m, BNAndPad) for m in model.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBNAndPad) for m in model.modules()) == n_pad > 0
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    with torch.no_grad():  # eval mode: SyncBatchNorm uses running statistics, no process group needed
        assert torch.allclose(model(img)["stage4"], expected, atol=1e-5)
    pad = next(m for m in model.modules() if isinstance(m, SyncBNAndPad))
    assert pad(torch.zeros(2, pad.num_features, 3, 3)).shape[-1] == 5
