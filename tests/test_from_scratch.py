"""Training from scratch with the defaults, at small and large inputs, and the neuron settings that make it work.

The cause of the from-scratch blow-up: while an SDSA's attention neuron is silent (few tokens per head), its
output projection's three BNs see a constant input, and each multiplies the input gradient by 1/sqrt(eps)
(and, in eval, the decayed running variance amplifies the first spikes as much). New models use eps 0.1 there
and V_th 0.5; both travel with the weights (``MetaSpikeFormer.NEURON_SETTINGS`` buffers), so converted
original checkpoints keep the original's 1e-5 and 1.0 (their logits: tests/test_checkpoint.py).
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from metaspike_d2 import MetaSpikeFormer, MultiStepLIF, reparameterize
from metaspike_d2.backbone import NEURON_SETTINGS, ORIGINAL_V_THRESHOLD, OWN_BUFFERS, V_THRESHOLD
from metaspike_d2.blocks import ORIGINAL_PROJ_BN_EPS, PROJ_BN_EPS, SpikeDrivenSelfAttention
from metaspike_d2.checkpoint import convert_original_state_dict, load_state_dict_strict
from metaspike_d2.classifier import MetaSpikeFormerClassifier
from tests.test_reparam import activate

STAGES = ("stem", "stage1", "stage2", "stage3", "stage4", "head")


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
    small, large = silent_attention_input_grad(ORIGINAL_PROJ_BN_EPS), silent_attention_input_grad(PROJ_BN_EPS)
    assert large > 0
    assert small / large == pytest.approx((PROJ_BN_EPS / ORIGINAL_PROJ_BN_EPS) ** 1.5, rel=1e-2)


def thresholds(model):
    return {(n.rsplit(".", 1)[-1] == "attn_lif", m.v_threshold) for n, m in model.named_modules()
            if isinstance(m, MultiStepLIF)}


def projection_bn_ids(model):
    ids = set()
    for m in model.modules():
        if isinstance(m, SpikeDrivenSelfAttention):
            ids |= {id(m.proj_conv.bn_pad), id(m.proj_conv.bn), id(m.proj_bn)}
    return ids


def eps_by_role(model):
    proj = projection_bn_ids(model)
    return {(id(m) in proj, m.eps) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_defaults_everywhere_are_the_from_scratch_settings():
    model = timm.create_model("metaspikeformer_tiny", num_classes=3)
    assert (V_THRESHOLD, PROJ_BN_EPS) == (0.5, 0.1)
    assert thresholds(model) == {(False, 0.5), (True, 0.25)}  # the classifier head's neuron included
    assert eps_by_role(model) == {(True, 0.1), (False, 1e-5)}  # only the 8 x 3 projection BNs change
    assert len(projection_bn_ids(model)) == 8 * 3
    # head 1, 4 ConvBlocks x 4, 4 spiking downsamples, 8 transformer blocks x (SDSA 5 + MLP 2)
    assert sum(isinstance(m, MultiStepLIF) for m in model.modules()) == 1 + 4 * 4 + 4 + 8 * 7

    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from metaspike_d2.d2 import add_metaspike_config
    from metaspike_d2.d2.backbone import build_metaspike_backbone
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.MODEL.METASPIKE.VARIANT = "tiny"
    backbone = build_metaspike_backbone(cfg, ShapeSpec(channels=3))
    assert thresholds(backbone) == {(False, 0.5), (True, 0.25)}
    assert eps_by_role(backbone) == {(True, 0.1), (False, 1e-5)}
    assert cfg.MODEL.METASPIKE.NEURON.V_THRESHOLD == 0.5  # the spiking neck and heads


def test_neuron_settings_travel_with_the_weights():
    original = MetaSpikeFormer(variant="tiny", v_threshold=ORIGINAL_V_THRESHOLD, attn_proj_bn_eps=ORIGINAL_PROJ_BN_EPS)
    state = original.state_dict()
    assert set(NEURON_SETTINGS) <= set(state)
    fresh = MetaSpikeFormer(variant="tiny")  # built with this project's defaults
    assert thresholds(fresh) == {(False, 0.5), (True, 0.25)}
    load_state_dict_strict(fresh, state)
    assert thresholds(fresh) == {(False, 1.0), (True, 0.5)}
    assert eps_by_role(fresh) == {(True, 1e-5), (False, 1e-5)}
    # and back: a default-trained state dict gives a model built with other settings the defaults
    load_state_dict_strict(original, MetaSpikeFormer(variant="tiny").state_dict())
    assert thresholds(original) == {(False, 0.5), (True, 0.25)} and eps_by_role(original) == {(True, 0.1), (False, 1e-5)}


def _original_like_state_dict():
    """An original-layout state dict: ours with the key map inverted (the converter's input)."""
    from metaspike_d2.checkpoint import original_key_map
    ours = MetaSpikeFormerClassifier(variant="tiny", num_classes=4).state_dict()
    inverse = {v: k for k, v in original_key_map(("head",)).items()}
    out = {}
    for key, value in ours.items():
        if key in OWN_BUFFERS:  # ours only: the converter writes them
            continue
        if ".mlp.fc" in key and key.endswith(".weight"):
            value = value.squeeze(-1)
        out[inverse[key]] = value
    return out


def test_converter_writes_the_original_neuron_settings():
    converted = convert_original_state_dict(_original_like_state_dict())
    assert float(converted["v_threshold"]) == ORIGINAL_V_THRESHOLD
    assert float(converted["attn_proj_bn_eps"]) == ORIGINAL_PROJ_BN_EPS
    model = timm.create_model("metaspikeformer_tiny", num_classes=4)
    load_state_dict_strict(model, converted)
    assert thresholds(model) == {(False, 1.0), (True, 0.5)}
    assert eps_by_role(model) == {(True, 1e-5), (False, 1e-5)}


def stage_grad_norms(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    norms = {}
    for stage in STAGES:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(stage) and p.grad is not None]
        norms[stage] = torch.nn.utils.get_total_norm(grads).item()
    return norms


@pytest.mark.parametrize("size,time_steps", [(32, 1), (32, 4), (64, 1), (224, 1)])
def test_initial_gradients_are_finite_and_balanced_at_every_size(size, time_steps):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    model = timm.create_model("metaspikeformer_tiny", num_classes=10, T=time_steps).train()
    norms = stage_grad_norms(model, x, y)
    assert all(math.isfinite(v) and v > 0 for v in norms.values()), norms
    # no stage gets more than 100x the head's gradient (the original settings: inf or ~1e8 at 32-64 px)
    assert max(norms.values()) < 100 * norms["head"], norms
    if size <= 64 and time_steps == 1:
        torch.manual_seed(0)
        original = timm.create_model("metaspikeformer_tiny", num_classes=10, v_threshold=1.0,
                                     attn_proj_bn_eps=ORIGINAL_PROJ_BN_EPS).train()
        before = stage_grad_norms(original, x, y)
        assert not all(math.isfinite(v) and v < 100 * before["head"] for v in before.values()), before


def two_class_batch(n: int, size: int, seed: int):
    """Bright-top vs bright-bottom images: a task a small model learns in tens of steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    half = size // 2
    x[y == 0, :, :half] += 1.5
    x[y == 1, :, half:] += 1.5
    return x, y


def train_and_eval(model, size: int, steps: int = 40):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    losses = []
    for step in range(steps):
        x, y = two_class_batch(16, size, step)
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert math.isfinite(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        opt.step()
        losses.append(loss.item())
    model.eval()
    x, y = two_class_batch(64, size, 999)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, accuracy


def test_default_model_learns_from_scratch_at_32px_and_eval_matches_training():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("metaspikeformer_tiny", num_classes=2)
    first, last, accuracy = train_and_eval(model, 32)
    assert last < 0.5 * first, (first, last)
    assert accuracy >= 0.9, accuracy  # eval mode (running statistics) agrees with what training learned


def test_reparameterization_stays_exact_with_the_default_settings():
    model = activate(MetaSpikeFormerClassifier(variant="tiny", num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64) * 2
    for t in (1, 2):
        model.time_steps = t
        with torch.no_grad():
            ref = model(x)
        for mode in ("fast", "spike"):
            rep = reparameterize(model, mode)
            with torch.no_grad():
                assert (rep(x) - ref).abs().max().item() <= 1e-4
