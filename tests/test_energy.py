"""Energy accounting (metaspike_d2.energy): hand-computed counts on known spike tensors, the paper vs naive
accounting on the real blocks, the report files and the tool on the tiny model."""
import csv
import json

import pytest
import torch
from torch import nn

from metaspike_d2.blocks import SpikeDrivenSelfAttention
from metaspike_d2.energy import PRESETS, EnergyConstants, EnergyReport, SpikeCounter, exact_synops, stage_of
from metaspike_d2.energy.runner import analyze_classifier, calibrate_batchnorm

T = 2


class HandNet(nn.Module):
    """An analog encoding conv, a 1x1 conv on (T*B)-flattened spikes and a linear layer on (T, B, C) spikes."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.pw = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, image, spikes, vec):
        self.enc(image)
        self.pw(spikes.flatten(0, 1))
        self.fc(vec)


def known_inputs():
    image = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)         # analog: not binary
    spikes = torch.zeros(T, 1, 2, 4, 4)
    spikes[0].view(-1)[:8] = 1                                    # t=0: 8 of 32 fire (0.25)
    spikes[1].view(-1)[::2] = 1                                   # t=1: 16 of 32 fire (0.5)
    vec = torch.tensor([[[1.0, 0, 0, 0]], [[1.0, 1, 1, 1]]])      # (T, B, 4): 0.25 then 1.0
    return image, spikes, vec


def count_hand(times=1):
    net = HandNet()
    with SpikeCounter(net, time_steps=T) as counter:
        for _ in range(times):
            with counter.count(batch_size=1):
                net(*known_inputs())
    return counter


def test_hand_network_counts_equal_hand_computation():
    counter = count_hand(times=3)  # three identical images: per-image numbers are unchanged
    assert counter.num_images == 3
    layers = {l.name: l for l in counter.layers("paper")}
    assert list(layers) == ["enc", "pw", "fc"]
    enc, pw, fc = layers["enc"], layers["pw"], layers["fc"]
    # encoding conv: analog input -> MAC, runs once per image: 4*4 positions * 2 out * 1 in * 9
    assert (enc.kind, enc.flops, enc.time_steps_run, enc.macs, enc.sops, enc.firing_rate) == ("mac", 288, 1, 288, 0, None)
    # 1x1 conv on spikes: 16 positions * 2 in * 4 out = 128 per step; rates 0.25 / 0.5
    assert (pw.kind, pw.flops, pw.time_steps_run) == ("ac", 128, T)
    assert pw.firing_rate_per_step == [0.25, 0.5]
    assert pw.firing_rate == 0.375
    assert pw.sops == 0.375 * T * 128 == 96 and pw.macs == 0
    # linear on (T, B, C) spikes: 4 * 3 = 12 per step; rates 0.25 / 1.0
    assert (fc.kind, fc.flops, fc.firing_rate_per_step, fc.firing_rate, fc.sops) == ("ac", 12, [0.25, 1.0], 0.625, 15)

    report = EnergyReport.from_counter(counter, PRESETS["fp32"])
    totals = report.totals
    assert totals.total_macs == 288 and totals.total_sops == 111 and totals.total_flops == 288 + 128 + 12
    assert totals.mac_energy_mj == pytest.approx(4.6 * 288 * 1e-9, rel=1e-12)
    assert totals.ac_energy_mj == pytest.approx(0.9 * 111 * 1e-9, rel=1e-12)
    assert totals.energy_mj_per_image == pytest.approx((4.6 * 288 + 0.9 * 111) * 1e-9, rel=1e-12)
    assert totals.ann_equivalent_energy_mj == pytest.approx(4.6 * 428 * 1e-9, rel=1e-12)


def test_presets_and_overrides():
    assert (PRESETS["fp32"].e_mac_pj, PRESETS["fp32"].e_ac_pj) == (4.6, 0.9)
    assert (PRESETS["fp16"].e_mac_pj, PRESETS["fp16"].e_ac_pj) == (1.5, 0.4)
    assert (PRESETS["int8"].e_mac_pj, PRESETS["int8"].e_ac_pj) == (0.23, 0.03)
    custom = EnergyConstants.from_preset("fp16", e_ac_pj=0.1)
    assert (custom.e_mac_pj, custom.e_ac_pj, custom.preset) == (1.5, 0.1, "custom")
    with pytest.raises(ValueError):
        EnergyConstants.from_preset("fp8")
    totals = EnergyReport.from_counter(count_hand(), PRESETS["int8"]).totals
    assert totals.energy_mj_per_image == pytest.approx((0.23 * 288 + 0.03 * 111) * 1e-9, rel=1e-12)


def test_spikingjelly_synop_counter_agrees_on_pointwise_layers():
    """For 1x1 convs and linear layers on spikes, SOPs = rate x FLOPs is exactly spikingjelly's count of
    weight uses (border effects only exist for k > 1)."""
    net = HandNet()
    exact = exact_synops(net, lambda: net(*known_inputs()))
    layers = {l.name: l for l in count_hand().layers("naive")}
    assert exact["pw"] == layers["pw"].sops == 96
    assert exact["fc"] == layers["fc"].sops == 15
    assert exact["enc"] == 0  # analog input: no synaptic operation


def sdsa_counts(dim=16, heads=4, hw=4):
    """SDSA at T=1 fed with known head spikes: at T=1 a LIF (threshold 1, tau 2) fires iff its input >= 2."""
    torch.manual_seed(0)
    attn = SpikeDrivenSelfAttention(dim, heads).eval()
    with torch.no_grad():  # make Q/K/V fire often enough to be non-trivial
        for bn in (attn.q_bn, attn.k_bn, attn.v_bn):
            bn.bias.fill_(2.0)  # fires where the RepConv output is >= 0
    x = torch.zeros(1, 1, dim, hw, hw)
    x.view(-1)[: dim * hw * hw // 4] = 4.0  # exactly a quarter of the head spikes fire
    captured = {}
    attn.k_lif.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o.detach().clone()))
    attn.q_lif.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o.detach().clone()))
    with SpikeCounter(attn, time_steps=1) as counter:
        with counter.count(batch_size=1):
            attn(x)
    return counter, captured, dim, heads, hw


def test_attention_and_repconv_paper_vs_naive():
    counter, captured, dim, heads, hw = sdsa_counts()
    n, d_h = hw * hw, dim // heads
    paper = {l.name: l for l in counter.layers("paper")}
    naive = {l.name: l for l in counter.layers("naive")}
    # paper: each RepConv is one dense 3x3 conv dim->dim on its input spikes
    q = paper["q_conv"]
    assert (q.kind, q.flops, q.firing_rate) == ("ac", 9 * dim * dim * n, 0.25)
    assert q.sops == 0.25 * 9 * dim * dim * n
    assert "q_conv.pw1" not in paper and "q_conv.dw" not in paper
    # naive: only pw1 sees spikes; dw and pw2 are MACs on real values
    assert (naive["q_conv.pw1"].kind, naive["q_conv.pw1"].flops, naive["q_conv.pw1"].firing_rate) == ("ac", dim * dim * n, 0.25)
    assert (naive["q_conv.dw"].kind, naive["q_conv.dw"].macs) == ("mac", 9 * dim * n)
    assert (naive["q_conv.pw2"].kind, naive["q_conv.pw2"].macs) == ("mac", dim * dim * n)
    # attention products: d_h accumulates per K (resp. Q) spike, per head
    k_nnz, q_nnz = int(captured["k"].count_nonzero()), int(captured["q"].count_nonzero())
    assert 0 < k_nnz < dim * n and 0 < q_nnz < dim * n
    for name, nnz in (("attn_kv", k_nnz), ("attn_qkv", q_nnz)):
        for table in (paper, naive):
            layer = table[name]
            assert (layer.kind, layer.flops) == ("ac", heads * n * d_h * d_h)
            assert layer.sops == nnz * d_h
            assert layer.firing_rate == nnz / (dim * n)
    order = [l.name for l in counter.layers("paper")]
    assert order == ["q_conv", "k_conv", "v_conv", "attn_kv", "attn_qkv", "proj_conv"]


def tiny_report(time_steps=2, size=32, n=2, calibrate=True):
    import timm

    import metaspike_d2  # noqa: F401

    model = timm.create_model("metaspikeformer_tiny", num_classes=10, time_steps=time_steps)
    x = torch.rand(n, 3, size, size) * 4 - 2
    if calibrate:
        calibrate_batchnorm(model, [lambda: model(x)])
    return model, x, analyze_classifier(model, x, batch_size=1, model_name="tiny")


def test_tiny_model_encoding_layer_is_the_only_paper_mac():
    model, x, report = tiny_report()
    c0h = model.widths[0] // 2
    macs = [l for l in report.layers if l.kind == "mac"]
    assert [l.name for l in macs] == ["stem.downsample.conv"]
    enc = macs[0]
    assert enc.flops == enc.macs == 7 * 7 * 3 * c0h * 16 * 16 and enc.time_steps_run == 1
    assert all(l.time_steps_run == 2 for l in report.layers if l.kind == "ac")
    # SepConv: dw 7x7 + pw2 fold into a dense 7x7 conv 2C->C on the spikes in front of the dw conv
    sep = next(l for l in report.layers if l.name == "stem.blocks.0.sepconv.dwconv+pwconv2")
    assert sep.flops == 49 * 2 * c0h * c0h * 16 * 16
    naive = {l.name: l for l in report.naive_layers}
    assert naive["stem.blocks.0.sepconv.pwconv2"].kind == "mac"
    assert naive["stem.blocks.0.sepconv.dwconv"].firing_rate == sep.firing_rate
    assert naive["stage3.blocks.0.attn.q_conv.dw"].kind == "mac"
    # the paper accounting has no MAC but the encoding conv, so it differs from the naive one
    assert report.naive_totals.mac_energy_mj > report.totals.mac_energy_mj
    # stage firing rates come from the neurons and lie in (0, 1) after BN calibration
    rates = report.stage_firing_rates
    assert set(rates) == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
    assert all(0 < rates[s] < 1 for s in ("stem", "stage1", "stage2", "stage3"))


def test_calibrate_batchnorm_sets_statistics_from_the_images():
    import timm

    import metaspike_d2  # noqa: F401

    model = timm.create_model("metaspikeformer_tiny", num_classes=10, time_steps=2)
    x = torch.rand(2, 3, 32, 32)
    calibrate_batchnorm(model, [lambda: model(x)])
    with torch.no_grad():
        y = model.stem.downsample.conv(x)
    bn = model.stem.downsample.bn
    assert torch.allclose(bn.running_mean, y.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and model.training  # restored


def test_report_files_recompute(tmp_path):
    _, _, report = tiny_report()
    paths = report.write(str(tmp_path))
    data = json.loads(open(paths["json"]).read())
    for key in ("time_steps", "num_images", "energy_mj_per_image", "mac_energy_mj", "ac_energy_mj",
                "ann_equivalent_energy_mj", "constants", "layers"):
        assert key in data
    assert data["time_steps"] == 2 and data["num_images"] == 2
    e_mac, e_ac = data["constants"]["e_mac_pj"], data["constants"]["e_ac_pj"]
    layers = data["layers"]
    assert {tuple(sorted(l)) for l in layers} >= {tuple(sorted({"name", "kind", "flops", "firing_rate", "sops",
                                                               "energy_mj", "stage", "op", "macs",
                                                               "time_steps_run", "firing_rate_per_step"}))}
    mac = sum(e_mac * l["macs"] for l in layers if l["kind"] == "mac") / 1e9
    ac = sum(e_ac * l["sops"] for l in layers if l["kind"] == "ac") / 1e9
    assert mac == pytest.approx(data["mac_energy_mj"], rel=1e-9)
    assert ac == pytest.approx(data["ac_energy_mj"], rel=1e-9)
    assert sum(l["energy_mj"] for l in layers) == pytest.approx(data["energy_mj_per_image"], rel=1e-9)
    for l in layers:
        if l["kind"] == "ac":
            assert l["sops"] == pytest.approx(l["firing_rate"] * l["time_steps_run"] * l["flops"], rel=1e-9)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == len(layers) + len(data["naive"]["layers"])
    assert {r["accounting"] for r in rows} == {"paper", "naive"}


def test_stage_of():
    assert stage_of("stage3.blocks.0.attn.q_conv") == "stage3"
    assert stage_of("backbone.bottom_up.stem.downsample.conv") == "stem"
    assert stage_of("backbone.fpn_lateral2") == "neck"
    assert stage_of("backbone.lateral_lifs.0") == "neck"
    assert stage_of("roi_heads.box_head.fc1") == "roi_heads"
    assert stage_of("head") == "head" and stage_of("lif") == "head"


def test_tool_writes_outputs(tmp_path):
    from PIL import Image

    from metaspike_d2.energy.data import synthetic_images

    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "analyze_energy", os.path.join(os.path.dirname(__file__), "..", "tools", "analyze_energy.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_images(1, (40, 48), seed=3)[0]).save(img)
    out = tmp_path / "out"
    report = tool.main(["--model", "metaspikeformer_tiny", "-T", "2", "--num-images", "2", "--input-size", "32",
                        "--num-classes", "10", "--output", str(out), "--image", str(img), "--energy-preset", "fp16"])
    for name in ("energy.json", "layers.csv", "firing_rates.png", "spike_maps.png"):
        assert (out / name).stat().st_size > 0
    for name in ("firing_rates.png", "spike_maps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "energy.json").read_text())
    assert data["constants"] == {"e_mac_pj": 1.5, "e_ac_pj": 0.4, "preset": "fp16"}
    assert data["bn_calibrated"] is True and data["num_images"] == 2
    assert data["energy_mj_per_image"] == pytest.approx(report.totals.energy_mj_per_image)
