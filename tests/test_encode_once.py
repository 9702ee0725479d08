"""Encode once: the encoding conv runs on the image once and is broadcast over T. It must equal running
the model on the image repeated T times, including BN statistics and gradients in training."""
import copy

import pytest
import torch
from torch import nn

from metaspike_d2 import FEATURE_NAMES, MetaSpikeFormer, repeat_over_time


def _pair(t):
    a = MetaSpikeFormer(variant="tiny", time_steps=t, out_features=FEATURE_NAMES)
    for m in a.modules():  # non-trivial running statistics to start from
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.8, 1.2)
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("t", [1, 3])
def test_encode_once_equals_repeat_in_training(t):
    once, repeat = _pair(t)
    once.train(), repeat.train()
    image = torch.randn(2, 3, 32, 32) * 2
    calls = []
    hook = once.stem.downsample.conv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out_once = once(image)
    hook.remove()
    assert calls == [2]  # the encoding conv saw B images, not T*B
    out_repeat = repeat(repeat_over_time(image, t))  # (T, B, C, H, W): the original's repeat-and-run
    for name in FEATURE_NAMES:
        assert out_once[name].shape == out_repeat[name].shape
        torch.testing.assert_close(out_once[name], out_repeat[name], rtol=1e-5, atol=1e-5)
    # BN statistics (running mean/var, batch counter) of every BN, the encoding BN in particular.
    buffers_repeat = dict(repeat.named_buffers())
    for name, buf in once.named_buffers():
        torch.testing.assert_close(buf, buffers_repeat[name], rtol=1e-5, atol=1e-6, msg=name)
    assert once.stem.downsample.bn.num_batches_tracked.item() == 1
    # Gradients of every parameter, to 1e-5 relative to the largest gradient of the same layer (the
    # bias of a conv followed by a training-mode BN has an exact gradient of 0: only rounding is left).
    loss_once = sum((o.float() ** 2).mean() for o in out_once.values())
    loss_repeat = sum((o.float() ** 2).mean() for o in out_repeat.values())
    loss_once.backward()
    loss_repeat.backward()
    params_repeat = dict(repeat.named_parameters())
    for module_name, module in once.named_modules():
        grads = [(n, p.grad) for n, p in module.named_parameters(recurse=False)]
        if not grads:
            continue
        assert all(g is not None for _, g in grads), module_name
        scale = max(g.abs().max().item() for _, g in grads)
        for n, g in grads:
            other = params_repeat[f"{module_name}.{n}" if module_name else n].grad
            err = (g - other).abs().max().item()
            assert err <= 1e-5 * scale + 1e-7, f"{module_name}.{n}: {err} (scale {scale})"


@pytest.mark.parametrize("t", [1, 4])
def test_encode_once_equals_repeat_in_eval(t):
    once, repeat = _pair(t)
    once.eval(), repeat.eval()
    image = torch.randn(1, 3, 32, 32) * 2
    with torch.no_grad():
        out_once, out_repeat = once(image), repeat(repeat_over_time(image, t))
    for name in FEATURE_NAMES:
        torch.testing.assert_close(out_once[name], out_repeat[name], rtol=1e-5, atol=1e-5)
