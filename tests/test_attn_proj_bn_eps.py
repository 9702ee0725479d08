"""attn_proj_bn_eps: the eps of the SDSA output-projection BNs, and why the quickstarts raise it.

While the attention neuron is silent, the projection's three BNs see a constant input (zero batch
variance) and each multiplies the gradient by 1/sqrt(eps); the gradient reaching the block input then
scales as eps^(-3/2) exactly. The default stays the original's 1e-5 (the equivalence tests use it).
"""
import pytest
import timm
import torch
from torch import nn

from metaspike_d2 import MetaSpikeFormer, reparameterize
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
    backbone = build_metaspike_backbone(cfg, ShapeSpec(channels=3))
    assert {m.proj_bn.eps for m in backbone.modules() if isinstance(m, SpikeDrivenSelfAttention)} == {0.1}


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
