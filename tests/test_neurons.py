"""The LIF neuron: equations, statelessness, surrogate gradient, time helpers."""
import pytest
import torch
from spikingjelly.activation_based import neuron

from metaspike_d2.neurons import MultiStepLIF, mean_over_time, repeat_over_time, seq_apply


def _spikingjelly_lif(threshold, tau=2.0):
    """The same neuron on spikingjelly's own CPU op (the reference for the project's CPU kernels)."""
    lif = MultiStepLIF(v_threshold=threshold, tau=tau)
    lif.cpu_kernel = False  # instance attribute: only this neuron
    return lif


def test_lif_matches_hand_computed_sequence():
    # tau = 2: H = (V + X) / 2; spike when H >= 1; hard reset to 0.
    x = torch.tensor([[1.0], [1.5], [2.0], [0.4], [4.0], [-1.0]])
    # V: 0 -> H .5 (no) V .5 -> H 1.0 (spike) V 0 -> H 1.0 (spike) V 0 -> H .2 V .2 -> H 2.1 (spike) V 0 -> H -.5
    expected = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0]])
    assert torch.equal(MultiStepLIF()(x), expected)


def test_lif_threshold_is_configurable():
    x = torch.tensor([[1.0], [0.0]])  # H = 0.5 at t=0
    assert MultiStepLIF(v_threshold=0.5)(x)[0].item() == 1.0
    assert MultiStepLIF(v_threshold=1.0)(x)[0].item() == 0.0


def test_lif_is_a_spikingjelly_lifnode_with_the_papers_settings():
    lif = MultiStepLIF()
    assert isinstance(lif, neuron.LIFNode)
    assert (lif.tau, lif.v_threshold, lif.v_reset, lif.detach_reset, lif.decay_input) == (2.0, 1.0, 0.0, True, True)
    assert lif.surrogate_function.alpha == 4.0
    assert list(lif.parameters()) == [] and list(lif.buffers()) == []


@pytest.mark.parametrize("training", [True, False])
def test_no_state_leaks_between_calls(training):
    lif = MultiStepLIF().train(training)
    x = torch.rand(4, 3, 8) * 3
    first = lif(x)
    lif(torch.rand(4, 5, 2) * 3)  # a different batch shape in between must not matter either
    assert torch.equal(first, lif(x))


def test_surrogate_gradient_is_sigmoid_alpha_4():
    x = torch.tensor([[1.6]], requires_grad=True)  # T=1: H = 0.8
    MultiStepLIF()(x).sum().backward()
    sg = torch.sigmoid(torch.tensor(4 * (0.8 - 1.0)))
    expected = 4 * sg * (1 - sg) * 0.5  # dS/dH * dH/dX
    assert torch.allclose(x.grad, expected.view(1, 1), atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("tau", [2.0, 3.0])  # 2: the T=1 kernel compares X with tau * V_th; 3: it divides first
def test_cpu_kernels_match_spikingjelly_bit_for_bit(t, threshold, tau):
    """Forward (with and without autograd) gives spikingjelly's exact spikes; the surrogate BPTT gradient
    matches spikingjelly's to float rounding, with gradients flowing into every time step."""
    torch.manual_seed(t)
    x = torch.randn(t, 3, 5, 7, 7) * 2
    x[0, 0, 0, 0, :3] = tau * threshold  # at threshold at t=0: H = X / tau = V_th exactly when tau = 2: must fire
    ours, reference = MultiStepLIF(v_threshold=threshold, tau=tau), _spikingjelly_lif(threshold, tau)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
    grad_out = torch.randn_like(x)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    spikes = [lif(xi) for lif, xi in zip((ours, reference), xs)]
    assert spikes[0].grad_fn.name().startswith("LIFSurrogateCPU")  # the project's kernel ran
    assert torch.equal(spikes[0], spikes[1])
    assert spikes[0][0, 0, 0, 0, :3].eq(1).all() or tau != 2.0
    for s in spikes:
        (s * grad_out).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    if t > 1:  # the membrane carries gradient backwards in time: a loss on the last step reaches t=0
        x0 = x.clone().requires_grad_(True)
        ours(x0)[-1].sum().backward()
        assert x0.grad[0].abs().sum() > 0


def test_cpu_training_kernel_keeps_the_input_dtype():
    x = (torch.randn(2, 4, 6) * 2).double().requires_grad_(True)
    s = MultiStepLIF()(x)
    s.sum().backward()
    assert s.dtype == torch.float64 and x.grad.dtype == torch.float64


def test_time_helpers():
    img = torch.rand(2, 3, 4, 4)
    seq = repeat_over_time(img, 3)
    assert seq.shape == (3, 2, 3, 4, 4) and torch.equal(seq[2], img)
    assert torch.allclose(mean_over_time(seq), img, atol=1e-7)
    conv = torch.nn.Conv2d(3, 5, 1)
    out = seq_apply(conv, seq)
    assert out.shape == (3, 2, 5, 4, 4) and torch.allclose(out[1], conv(img))
    with pytest.raises(ValueError, match="T must be >= 1"):
        repeat_over_time(img, 0)


def test_cpu_inference_kernel_keeps_the_membrane_in_float32_for_bfloat16_inputs():
    from metaspike_d2.neurons import lif_inference_cpu
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 7, 5, 5) * 2).to(torch.bfloat16)
    for tau, v_th in ((2.0, 0.5), (3.0, 1.0)):
        for t in (1, 4):
            out = lif_inference_cpu(x[:t], tau, v_th)
            assert out.dtype == torch.bfloat16
            assert torch.equal(out, lif_inference_cpu(x[:t].float(), tau, v_th).to(torch.bfloat16))
