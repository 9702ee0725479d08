"""Integer spiking neurons (I-LIF, spike_levels D >= 2): spikingjelly's ILIFNode counts exactly, D = 1 unchanged,
the binary expansion exact on every variant and on the Detectron2 models, energy counts of integer spikes."""
import copy
import os

import pytest
import timm
import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

import metaspike_d2  # noqa: F401  (registers the timm models)
from metaspike_d2 import VARIANTS, MultiStepILIF, MultiStepLIF, expand_spikes, reparameterize
from metaspike_d2.checkpoint import convert_original_state_dict
from metaspike_d2.classifier import MetaSpikeFormerClassifier
from metaspike_d2.energy.counter import SpikeCounter
from metaspike_d2.blocks import ATTN_REF_TOKENS, SpikeDrivenSelfAttention
from metaspike_d2.neurons import binary_slots, is_spike_count, seq_apply, spiking_neuron
from metaspike_d2.spike_expansion import BinarySlotLayer, spike_levels_of

from .test_reparam import TOL, activate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_ilif(v_threshold, levels):
    return neuron.ILIFNode(tau=4.0 / 3.0, v_threshold=v_threshold, surrogate_function=surrogate.MultiLevelSpikeCount(levels),
                           detach_reset=True, step_mode="m")


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("levels,v_threshold", [(2, 1.0), (4, 1.0), (4, 0.7), (8, 0.5)])
def test_counts_and_gradient_match_spikingjelly(t, levels, v_threshold):
    torch.manual_seed(levels * 10 + t)
    x = (torch.randn(t, 3, 8, 5, 5) * 3).requires_grad_()
    ours = MultiStepILIF(v_threshold, levels)
    ref = reference_ilif(v_threshold, levels)
    y = ours(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    ref.reset()
    y_ref = ref(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    with torch.no_grad():
        y_inf = ours(x)
    assert torch.equal(y, y_ref) and torch.equal(y_inf, y_ref)  # bit-identical counts, training and inference paths
    assert set(y_ref.unique().tolist()) == set(range(levels + 1))  # every level occurs: the test is not trivial
    assert torch.allclose(gx, gx_ref, rtol=0, atol=1e-6)  # the straight-through gradient, to rounding
    assert (gx != 0).any() and (gx == 0).any()  # inside and outside the gradient window


def test_soft_reset_and_decay_by_hand():
    """One neuron, T=3, V_th 1, D 4: H = 0.25 V + X, C = round(clip(H, 0, 4)), V = H - C."""
    x = torch.tensor([2.6, 0.2, 5.0]).view(3, 1)
    # t0: H 2.6 -> C 3, V -0.4; t1: H -0.1 + 0.2 = 0.1 -> C 0, V 0.1; t2: H 0.025 + 5 -> C 4 (clipped)
    assert MultiStepILIF(1.0, 4)(x).flatten().tolist() == [3.0, 0.0, 4.0]


def test_cpu_kernel_is_what_runs_and_spikingjelly_path_agrees(monkeypatch):
    import metaspike_d2.neurons as neurons

    x = torch.randn(2, 4, 6) * 2
    ilif = MultiStepILIF(1.0, 4)
    calls = []
    real_inference = neurons.ilif_inference_cpu
    monkeypatch.setattr(neurons, "ilif_inference_cpu", lambda *a: calls.append("inference") or real_inference(*a))
    with torch.no_grad():
        fast = ilif(x)
    trained = ilif(x.clone().requires_grad_())
    assert calls == ["inference"] and type(trained.grad_fn).__name__ == "ILIFSurrogateCPUBackward"
    MultiStepILIF.cpu_kernel = False  # spikingjelly's CPU op
    try:
        slow = ilif(x.clone().requires_grad_())
    finally:
        MultiStepILIF.cpu_kernel = True
    assert calls == ["inference"] and "ILIFSurrogateCPU" not in type(slow.grad_fn).__name__
    assert torch.equal(fast, slow) and torch.equal(trained, slow)


def test_neuron_choice():
    assert type(spiking_neuron(0.5, 1)) is MultiStepLIF
    ilif = spiking_neuron(0.5, 4)
    assert isinstance(ilif, MultiStepILIF) and isinstance(ilif, neuron.ILIFNode)
    assert ilif.spike_levels == 4 and ilif.v_threshold == 1.0  # the unit: tau_LIF * V_th, SpikeYOLO's 1
    with pytest.raises(ValueError, match="D >= 2"):
        MultiStepILIF(1.0, 1)
    with pytest.raises(ValueError, match="spike_levels"):
        MetaSpikeFormerClassifier(variant="tiny", num_classes=2, spike_levels=0)


def test_timm_models_choose_their_neurons_everywhere():
    binary = timm.create_model("metaspikeformer_tiny", num_classes=3)
    integer = timm.create_model("metaspikeformer_tiny", num_classes=3, spike_levels=4)
    kinds = lambda m: {type(n) for n in m.modules() if isinstance(n, neuron.BaseNode)}  # noqa: E731
    assert kinds(binary) == {MultiStepLIF} and kinds(integer) == {MultiStepILIF}
    assert sum(isinstance(n, neuron.BaseNode) for n in binary.modules()) == \
        sum(isinstance(n, neuron.BaseNode) for n in integer.modules())  # the same neurons, another kind
    assert {n.v_threshold for n in integer.modules() if isinstance(n, MultiStepILIF)} == {1.0, 0.5}  # attention: half
    assert spike_levels_of(integer) == 4 and int(integer.spike_levels) == 4 and int(binary.spike_levels) == 1
    x = torch.randn(2, 3, 32, 32)
    loss = integer(x).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in integer.parameters() if p.requires_grad)


def test_spike_levels_travel_with_the_weights():
    integer = timm.create_model("metaspikeformer_tiny", num_classes=3, spike_levels=4)
    binary = timm.create_model("metaspikeformer_tiny", num_classes=3)
    with pytest.raises(RuntimeError, match="trained with spike_levels=4, the model was built with spike_levels=1"):
        binary.load_state_dict(integer.state_dict())
    assert int(binary.spike_levels) == 1  # a refused load leaves the model describing its own neurons
    timm.create_model("metaspikeformer_tiny", num_classes=3, spike_levels=4).load_state_dict(integer.state_dict())


def test_converted_original_checkpoints_are_binary():
    # the converter stamps D = 1: a converted original checkpoint never loads into an integer-spike model
    from .test_from_scratch import _original_like_state_dict
    original = _original_like_state_dict()
    converted = convert_original_state_dict(original)
    assert int(converted["spike_levels"]) == 1
    MetaSpikeFormerClassifier(variant="tiny", num_classes=4).load_state_dict(converted)
    with pytest.raises(RuntimeError, match="spike_levels=1"):
        MetaSpikeFormerClassifier(variant="tiny", num_classes=4, spike_levels=4).load_state_dict(converted)


def test_binary_slots():
    counts = torch.tensor([[0.0, 1.0, 4.0], [3.0, 2.0, 0.0]])
    slots = binary_slots(counts, 4)
    assert slots.shape == (4, 2, 3) and set(slots.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(slots.sum(0), counts)
    assert slots[:, 0, 2].tolist() == [1.0, 1.0, 1.0, 1.0] and slots[:, 1, 0].tolist() == [1.0, 1.0, 1.0, 0.0]
    for bad in (5.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="integer spike counts in 0..4"):
            binary_slots(torch.tensor([bad]), 4)
        assert not is_spike_count(torch.tensor([0.0, bad]), 4)
    assert is_spike_count(counts, 4) and is_spike_count(torch.tensor([7.0])) and not is_spike_count(torch.tensor([7.0]), 4)


def _inner_inputs(model):
    """Records the set of values each expanded layer's inner (bias-free) op sees on the binary path."""
    seen = {}

    def patch(layer, name):
        original = layer._bias_free

        def recording(s):
            seen.setdefault(name, set()).update(s.unique().tolist())
            return original(s)
        layer._bias_free = recording

    for name, m in model.named_modules():
        if isinstance(m, BinarySlotLayer):
            patch(m, name)
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_expansion_exact_on_every_variant(variant):
    small = variant in ("tiny", "15m")
    size, steps = (64, (1, 4)) if small else (32, (1,))  # wide variants at T=1 (the D=4 configs' T), to keep it short
    model = MetaSpikeFormerClassifier(variant=variant, num_classes=7, kd=True, spike_levels=4).double()
    activate(model).eval()
    x = torch.randn(2 if small else 1, 3, size, size, dtype=torch.float64) * 2
    expanded = expand_spikes(model)
    for t in steps:
        model.time_steps = expanded.time_steps = t
        with torch.no_grad():
            ref_features = model.forward_features(x)
            ref = model.forward_head(ref_features)
            seen = _inner_inputs(expanded)
            features = expanded.forward_features(x)
            out = expanded.forward_head(features)
        assert (out - ref).abs().max().item() <= TOL
        assert (features - ref_features).abs().max().item() <= TOL, f"{variant} T={t}"
        binary_layers = {n for n, v in seen.items() if v}
        assert all(seen[n] <= {0.0, 1.0} for n in binary_layers)  # every expanded layer ran on binary spikes
        dense = {n for n, m in expanded.named_modules() if isinstance(m, BinarySlotLayer) and m.dense_calls}
        assert dense == {"stem.downsample.conv"}  # only the encoding conv multiplies (the analog image)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in expanded.modules())
    assert all(isinstance(parent, BinarySlotLayer) for parent in expanded.modules()
               for child in parent.children() if isinstance(child, (nn.Conv2d, nn.Linear)))  # every layer wrapped


def test_expansion_uses_counts_above_one():
    """The exactness test is only meaningful if the integer model emits counts > 1 somewhere."""
    model = MetaSpikeFormerClassifier(variant="tiny", num_classes=7, spike_levels=4)
    activate(model).eval()
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.update(o.unique().tolist()))
             for m in model.modules() if isinstance(m, MultiStepILIF)]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2)
    for h in hooks:
        h.remove()
    assert seen == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_expansion_of_a_binary_model_is_the_spike_mode():
    model = activate(MetaSpikeFormerClassifier(variant="tiny", num_classes=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    expanded = expand_spikes(model)
    with torch.no_grad():
        assert (expanded(x) - model(x)).abs().max().item() <= TOL
    assert {m.levels for m in expanded.modules() if isinstance(m, BinarySlotLayer)} == {1}


def _d2_model(path, t):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import metaspike_d2.d2 as md2

    cfg = get_cfg()
    md2.add_metaspike_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.METASPIKE.T", t])
    torch.manual_seed(0)
    return activate(build_model(cfg)).eval(), cfg


@pytest.mark.parametrize("name", ["mask_rcnn_metaspike_tiny_shapes_d4.yaml", "semfpn_metaspike_tiny_shapes_d4.yaml",
                                  "semfpn_metaspike_tiny_real_d4.yaml"])
def test_expansion_exact_on_detectron2_models(name):
    path = os.path.join(ROOT, "configs", "quickstart", name)
    for t in (1, 4):
        model32, cfg = _d2_model(path, t)
        assert cfg.MODEL.METASPIKE.SPIKE_LEVELS == 4
        assert {type(n) for n in model32.modules() if isinstance(n, neuron.BaseNode)} == {MultiStepILIF}
        model = copy.deepcopy(model32).double()  # float64: no count lies within rounding of a boundary
        size = 64
        image = torch.rand(3, size, size, dtype=torch.float64) * 255
        x = ((image - model.pixel_mean) / model.pixel_std)[None]
        expanded = expand_spikes(model)
        fast = reparameterize(model, "fast")
        with torch.no_grad():
            ref_feats, feats, fast_feats = model.backbone(x), expanded.backbone(x), fast.backbone(x)
            for k in ref_feats:
                assert (feats[k] - ref_feats[k]).abs().max().item() <= TOL, f"{name} T={t} {k}"
                assert (fast_feats[k] - ref_feats[k]).abs().max().item() <= TOL, f"{name} fast T={t} {k}"
            if hasattr(model, "sem_seg_head"):
                ref = model.sem_seg_head.layers(ref_feats)
                out = expanded.sem_seg_head.layers(feats)
                assert (out - ref).abs().max().item() <= TOL
                continue
            from detectron2.structures import ImageList
            # proposals from the float32 model (Detectron2's anchors are float32), then the box head of both
            # float64 models on the same proposals (box head: spiking convs and FCs, spike-driven when expanded)
            feats32 = model32.backbone(x.float())
            proposals, _ = model32.proposal_generator(ImageList(x.float(), [(size, size)]), feats32)
            for p in proposals:
                p.proposal_boxes.tensor = p.proposal_boxes.tensor.double()
            boxes = [p.proposal_boxes for p in proposals]

            def box_outputs(m, f):  # pooler (T folded) -> spiking box head -> predictor: (scores, deltas)
                pooled = m.roi_heads.box_pooler([f[k] for k in m.roi_heads.box_in_features], boxes)
                return m.roi_heads.box_predictor(m.roi_heads.box_head(pooled))

            for r, o in zip(box_outputs(model, ref_feats), box_outputs(expanded, feats)):
                assert r.numel() > 0 and (o - r).abs().max().item() <= TOL
            mask_ref = model.roi_heads.mask_head.layers(model.roi_heads.mask_pooler(
                [ref_feats[k] for k in model.roi_heads.mask_in_features], boxes))
            mask_out = expanded.roi_heads.mask_head.layers(expanded.roi_heads.mask_pooler(
                [feats[k] for k in expanded.roi_heads.mask_in_features], boxes))
            assert (mask_out - mask_ref).abs().max().item() <= TOL
            # and the RPN head's raw outputs
            levels = [ref_feats[f] for f in model.proposal_generator.in_features]
            ref_rpn = model.proposal_generator.rpn_head(levels)
            out_rpn = expanded.proposal_generator.rpn_head([feats[f] for f in model.proposal_generator.in_features])
            for r, o in zip([*ref_rpn[0], *ref_rpn[1]], [*out_rpn[0], *out_rpn[1]]):
                assert (o - r).abs().max().item() <= TOL
        binary = {n for n, m in expanded.named_modules() if isinstance(m, BinarySlotLayer) and m.binary_calls}
        dense = {n for n, m in expanded.named_modules() if isinstance(m, BinarySlotLayer) and m.dense_calls}
        head = "roi_heads.box_head" if "mask_rcnn" in name else "sem_seg_head"
        assert any(n.startswith(head) for n in binary) and any(n.startswith("backbone.") and "stage" in n for n in binary)
        assert all(n.endswith("stem.downsample.conv") or not n.startswith("backbone") for n in dense), dense


def attention_counts_at_init(spike_levels: int, size: int) -> float:
    """Mean output of the 8 SDSA attention neurons of a fresh tiny classifier (train mode, batch statistics)."""
    torch.manual_seed(0)
    model = MetaSpikeFormerClassifier(variant="tiny", num_classes=3, spike_levels=spike_levels).train()
    counts = []
    hooks = [m.attn_lif.register_forward_hook(lambda _m, _i, o: counts.append(o.float().mean().item()))
             for m in model.modules() if isinstance(m, SpikeDrivenSelfAttention)]
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    assert len(counts) == 8
    return sum(counts) / len(counts)


def test_integer_attention_is_not_saturated_at_init_at_any_size():
    """With the fixed 0.125 of binary Q, K, V, D = 4 attention neurons start at mean counts ~1.7 (64 px, 16 tokens
    per map) and ~3.7 of 4 (192 px, 144 tokens): saturated, no gradient through the I-LIF window. The normalized
    product (operands as count / D, tokens relative to N_ref) keeps them at ~0.3 at both sizes."""
    small, large = attention_counts_at_init(4, 64), attention_counts_at_init(4, 192)
    assert 0.1 <= small <= 1.0 and 0.1 <= large <= 1.0, (small, large)
    assert abs(small - large) <= 0.1, (small, large)  # independent of the token count


def test_attention_product_scale():
    integer = SpikeDrivenSelfAttention(16, num_heads=2, spike_levels=4)
    assert ATTN_REF_TOKENS == 196 and integer.ref_tokens == ATTN_REF_TOKENS
    for n in (16, 49, 196, 300):
        assert integer.product_scale(n) == 0.125 * 196 / (n * 4 ** 3)
    binary = SpikeDrivenSelfAttention(16, num_heads=2)
    assert binary.ref_tokens == 0 and all(binary.product_scale(n) == 0.125 for n in (16, 196, 300))
    # D decides the scale, and D travels with the weights: D = 4 models normalize, D = 1 models keep 0.125
    for levels, ref in ((4, ATTN_REF_TOKENS), (1, 0.0)):
        model = MetaSpikeFormerClassifier(variant="tiny", num_classes=3, spike_levels=levels)
        assert {m.ref_tokens for m in model.modules() if isinstance(m, SpikeDrivenSelfAttention)} == {ref}
    # converted original checkpoints keep exactly their keys (no new buffer)
    assert "attn_ref_tokens" not in MetaSpikeFormerClassifier(variant="tiny", num_classes=3, spike_levels=4).state_dict()


def test_binary_attention_unchanged():
    """D = 1: the attention neuron's input is exactly 0.125 Q (K^T V), bit for bit, at any token count."""
    torch.manual_seed(0)
    attn = activate(SpikeDrivenSelfAttention(16, num_heads=2, attn_threshold=0.25, v_threshold=0.5)).eval()
    seen = {}
    attn.attn_lif.register_forward_hook(lambda _m, i, _o: seen.update(y=i[0]))
    for hw in (3, 7):
        x = torch.randn(1, 2, 16, hw, hw) * 2
        with torch.no_grad():
            attn(x)
            h = attn.head_lif(x)
            q, k, v = (attn._heads(lif(seq_apply(lambda s: bn(conv(s)), h))) for conv, bn, lif in (
                (attn.q_conv, attn.q_bn, attn.q_lif), (attn.k_conv, attn.k_bn, attn.k_lif),
                (attn.v_conv, attn.v_bn, attn.v_lif)))
            ref = (q @ (k.transpose(-2, -1) @ v) * 0.125).transpose(-1, -2).reshape(1, 2, 16, hw, hw)
        assert torch.equal(seen["y"], ref)
    assert 0.2 < attention_counts_at_init(1, 128) < 0.3  # the binary model's rate at init, as before (0.245)


def test_energy_counts_integer_spikes_by_hand():
    """A linear layer fed by an I-LIF: SOPs = sum of the counts x out_features; firing rate = mean count."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = MultiStepILIF(1.0, 4)
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(self.lif(x))

    net = Net()
    x = torch.tensor([[[0.2, 1.2, 2.6]], [[4.4, 0.0, 9.0]]])  # (T=2, B=1, 3)
    counts = net.lif(x)  # t0: 0, 1, 3; t1: V = H - C -> H = 0.25 V + X
    with SpikeCounter(net, time_steps=2) as counter:
        with counter.count(batch_size=1):
            net(x)
    layer = next(l for l in counter.layers() if l.name == "fc")
    assert layer.kind == "ac"
    assert layer.sops == pytest.approx(float(counts.sum()) * 5)
    assert layer.flops == 3 * 5 and layer.time_steps_run == 2
    (n,) = counter.neurons()
    assert n.firing_rate == pytest.approx(float(counts.mean())) and n.spike_levels == 4
    assert n.binary_rate == pytest.approx(float(counts.mean()) / 4)


def test_classification_trains_integer_spikes_and_hands_them_to_detectron2(tmp_path):
    """--spike-levels 4: the checkpoint carries D; the exported backbone loads where MODEL.METASPIKE.SPIKE_LEVELS
    is 4 and is refused, naming both values, where it is 1."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from classification import export, train
    from classification.data import make_synthetic_imagefolder
    from metaspike_d2.checkpoint import load_checkpoint_file
    from metaspike_d2.d2 import MetaSpikeCheckpointer, add_metaspike_config
    from metaspike_d2.d2.backbone import build_metaspike_backbone

    data = tmp_path / "data"
    make_synthetic_imagefolder(str(data), train_per_class=2, val_per_class=1)
    out = tmp_path / "run"
    stats = train.main(train.parse_args([
        "--model", "metaspikeformer_tiny", "--data-path", "synthetic", "--synthetic-dir", str(data),
        "--synthetic-per-class", "2", "1", "--input-size", "32", "--batch-size", "10", "--num-workers", "0",
        "--epochs", "1", "--warmup-epochs", "0", "--no-amp", "--spike-levels", "4", "--output-dir", str(out)]))
    assert stats["train_loss"] == stats["train_loss"] and stats["nonfinite_grad_steps"] == 0
    ckpt = load_checkpoint_file(out / train.CHECKPOINT_LAST)
    assert int(ckpt["model"]["spike_levels"]) == 4 and ckpt["args"]["spike_levels"] == 4
    weights = tmp_path / "backbone.pth"
    export.main(["--input", str(out / train.CHECKPOINT_LAST), "--output", str(weights)])
    for levels in (4, 1):
        cfg = get_cfg()
        add_metaspike_config(cfg)
        cfg.MODEL.METASPIKE.VARIANT = "tiny"
        cfg.MODEL.METASPIKE.SPIKE_LEVELS = levels
        model = nn.Module()
        model.backbone = build_metaspike_backbone(cfg, ShapeSpec(channels=3))
        if levels == 4:
            MetaSpikeCheckpointer(model).load(str(weights))
            assert torch.equal(model.backbone.stem.downsample.conv.weight, ckpt["model"]["stem.downsample.conv.weight"])
        else:
            with pytest.raises(RuntimeError, match="trained with spike_levels=4, the model was built with spike_levels=1"):
                MetaSpikeCheckpointer(model).load(str(weights))


@pytest.mark.parametrize("name", ["15m_t1", "55m_t1", "synthetic_tiny"])
def test_classification_d4_configs_inherit_their_base(name, tmp_path):
    from classification import train

    configs = os.path.join(ROOT, "classification", "configs")
    base = vars(train.parse_args(["--config", os.path.join(configs, f"{name}.yaml")]))
    d4 = vars(train.parse_args(["--config", os.path.join(configs, f"{name}_d4.yaml")]))
    assert base["spike_levels"] == 1 and d4["spike_levels"] == 4
    assert {k for k in base if base[k] != d4[k]} == {"config", "spike_levels", "output_dir"}
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\nepochs: 3\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(SystemExit, match="_base_ chain loops"):
        train.parse_args(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(SystemExit, match="missing.yaml.*the _base_ of"):
        train.parse_args(["--config", str(tmp_path / "c.yaml")])
