"""The two backbone options the from-scratch quickstarts change; defaults are the original's (the
equivalence tests in test_checkpoint.py run with them).

attn_proj_bn_eps: while the attention neuron is silent, the SDSA projection's three BNs see a constant
input (zero batch variance) and each multiplies the gradient by 1/sqrt(eps); the gradient reaching the
block input then scales as eps^(-3/2) exactly.

v_threshold: the firing threshold of every backbone neuron, the attention neurons at half of it.
"""
import pytest
import timm
import torch
from torch import nn

from metaspike_d2 import MetaSpikeFormer, MultiStepLIF, reparameterize
from metaspike_d2.blocks import SpikeDrivenSelfAttention
from metaspike_d2.classifier import MetaSpikeFormerClassifier
from tests.test_reparam import activate


def silent_attention_input_grad(eps: float) -> float:
    torch.manual_seed(0)
    attn = SpikeDrivenSelfAttention(16, num_heads=1, scale=1e-3, proj_bn_eps=eps).train()
    rates = []
    attn.attn_lif.register_forward_hook(lambda m, i, o: rates.append(o.float().mean().item()))
    x = (torch.randn(1, 4, 16, 6, 6) * 2).requires_grad_()
    out = attn(x)
    (out * torch.randn_like(out)).sum().backward()
    assert rates == [0.0], "the setting must keep the attention neuron silent"
    return x.grad.norm().item()


def test_silent_attention_gradient_scales_as_eps_to_the_minus_three_halves():
    small, large = silent_attention_input_grad(1e-5), silent_attention_input_grad(0.1)
    assert large > 0
    assert small / large == pytest.approx((0.1 / 1e-5) ** 1.5, rel=1e-2)  # 1e6: three BNs at 1/sqrt(eps)


def test_option_reaches_only_the_projection_bns_through_timm_and_d2():
    model = timm.create_model("metaspikeformer_tiny", num_classes=3, attn_proj_bn_eps=0.1)
    proj_bns = set()
    for m in model.modules():
        if isinstance(m, SpikeDrivenSelfAttention):
            proj_bns |= {id(m.proj_conv.bn_pad), id(m.proj_conv.bn), id(m.proj_bn)}
    assert len(proj_bns) == 8 * 3
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.eps == (0.1 if id(m) in proj_bns else 1e-5)
    default = MetaSpikeFormer(variant="tiny")
    assert all(m.eps == 1e-5 for m in default.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    from detectron2.config import get_cfg
    from metaspike_d2.d2 import add_metaspike_config
    from metaspike_d2.d2.backbone import build_metaspike_backbone
    from detectron2.layers import ShapeSpec
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.MODEL.METASPIKE.VARIANT = "tiny"
    cfg.MODEL.METASPIKE.ATTN_PROJ_BN_EPS = 0.1
    cfg.MODEL.METASPIKE.BACKBONE_V_THRESHOLD = 0.5
    backbone = build_metaspike_backbone(cfg, ShapeSpec(channels=3))
    assert {m.proj_bn.eps for m in backbone.modules() if isinstance(m, SpikeDrivenSelfAttention)} == {0.1}
    assert {n.rsplit(".", 1)[-1] == "attn_lif": m.v_threshold for n, m in backbone.named_modules()
            if isinstance(m, MultiStepLIF)} == {True: 0.25, False: 0.5}


def thresholds(model):
    return {(n.rsplit(".", 1)[-1] == "attn_lif", m.v_threshold) for n, m in model.named_modules()
            if isinstance(m, MultiStepLIF)}


def test_v_threshold_sets_every_backbone_neuron_and_halves_the_attention_ones():
    assert thresholds(MetaSpikeFormer(variant="tiny")) == {(False, 1.0), (True, 0.5)}  # the original's
    model = timm.create_model("metaspikeformer_tiny", num_classes=3, v_threshold=0.5)
    assert thresholds(model) == {(False, 0.5), (True, 0.25)}  # the classifier head's neuron included
    # head 1, 4 ConvBlocks x 4, 4 spiking downsamples, 8 transformer blocks x (SDSA 5 + MLP 2)
    assert sum(isinstance(m, MultiStepLIF) for m in model.modules()) == 1 + 4 * 4 + 4 + 8 * 7


def test_a_lower_threshold_fires_more_at_initialization():
    x = torch.randn(4, 3, 64, 64)
    rates = {}
    for v in (1.0, 0.5):
        torch.manual_seed(0)  # the same weights for both
        model = MetaSpikeFormer(variant="tiny", v_threshold=v, out_features=("stage2",)).train()
        spikes = []
        model.stage2.blocks[0].sepconv.lif1.register_forward_hook(lambda m, i, o: spikes.append(o))
        with torch.no_grad():
            model(x)
        rates[v] = spikes[0].mean().item()
    assert 0 < rates[1.0] < rates[0.5] / 3  # BN'd input ~ N(0, 1): P(x >= 2) ~ 2% vs P(x >= 1) ~ 16%


def test_reparameterization_stays_exact_with_a_large_eps():
    model = activate(MetaSpikeFormerClassifier(variant="tiny", num_classes=5, attn_proj_bn_eps=0.1)).eval()
    x = torch.randn(2, 3, 64, 64) * 2
    for t in (1, 2):
        model.time_steps = t
        with torch.no_grad():
            ref = model(x)
        for mode in ("fast", "spike"):
            rep = reparameterize(model, mode)
            with torch.no_grad():
                assert (rep(x) - ref).abs().max().item() <= 1e-4
