"""Energy tool and firing-rate hook on Detectron2 models (synthetic images, tiny variants, CPU)."""
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = {
    "detection": "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml",
    "segmentation": "configs/quickstart/semfpn_metaspike_tiny_shapes.yaml",
}
# The segmentation quickstart feeds only stem..stage2 to its neck (docs/segmentation.md), so stages 3-4 never run.
BACKBONE_STAGES = {
    "detection": {"stem", "stage1", "stage2", "stage3", "stage4"},
    "segmentation": {"stem", "stage1", "stage2"},
}


def load_tool():
    spec = importlib.util.spec_from_file_location("analyze_energy", os.path.join(ROOT, "tools", "analyze_energy.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_config_runs_through_the_tool(task, tmp_path):
    cfg = os.path.join(ROOT, CONFIGS[task])
    _write_image(tmp_path)
    report = load_tool().main(["--config-file", cfg, "--num-images", "1", "--input-size", "64", "--time-steps", "2",
                               "--output", str(tmp_path), "--image", str(tmp_path / "img.png")])
    data = json.loads((tmp_path / "energy.json").read_text())
    assert data["time_steps"] == 2 and data["num_images"] == 1
    layers = data["layers"]
    macs = [l for l in layers if l["kind"] == "mac"]
    assert macs and macs[0]["name"].endswith("stem.downsample.conv") and macs[0]["time_steps_run"] == 1
    stages = {l["stage"] for l in layers}
    assert BACKBONE_STAGES[task] <= stages and len(stages) > len(BACKBONE_STAGES[task])  # plus neck / heads
    assert sum(l["energy_mj"] for l in layers) == pytest.approx(data["energy_mj_per_image"], rel=1e-9)
    assert data["energy_mj_per_image"] == pytest.approx(report.totals.energy_mj_per_image)
    for name in ("layers.csv", "firing_rates.png", "spike_maps.png"):
        assert (tmp_path / name).stat().st_size > 0


def _write_image(tmp_path):
    from PIL import Image

    from metaspike_d2.energy.data import synthetic_images

    Image.fromarray(synthetic_images(1, (64, 80), seed=1)[0]).save(tmp_path / "img.png")


class _Trainer:
    def __init__(self, model, storage):
        self.model, self.storage, self.iter = model, storage, 0


def test_firing_rate_hook_logs_stage_means_every_period():
    from detectron2.utils.events import EventStorage

    from metaspike_d2.backbone import MetaSpikeFormer
    from metaspike_d2.d2.energy_hook import FiringRateHook
    from metaspike_d2.neurons import MultiStepLIF

    model = MetaSpikeFormer(variant="tiny", time_steps=2, out_features=("stage4",))
    # independent reference: spikes and elements of every neuron, per stage
    counts = {}

    def ref_hook(name):
        stage = name.split(".")[0]

        def hook(_m, _i, out):
            c = counts.setdefault(stage, [0, 0])
            c[0] += int(out.count_nonzero())
            c[1] += out.numel()
        return hook

    for name, m in model.named_modules():
        if isinstance(m, MultiStepLIF):
            m.register_forward_hook(ref_hook(name))
    x = torch.randn(2, 3, 32, 32) * 3
    hook = FiringRateHook(period=2)
    with EventStorage(0) as storage:
        hook.trainer = _Trainer(model, storage)
        hook.before_train()
        logged = []
        for it in range(4):
            hook.trainer.iter = storage.iter = it
            hook.before_step()
            counts.clear()
            with torch.no_grad():
                model(x * (it + 1))
            hook.after_step()
            history = storage.histories()
            logged.append({k: v.latest() for k, v in history.items() if k.startswith("firing_rate/")})
            if it in (1, 3):
                expected = {f"firing_rate/{s}": c[0] / c[1] for s, c in counts.items()}
                assert set(logged[-1]) == set(expected) == {f"firing_rate/{s}" for s in
                                                           ("stem", "stage1", "stage2", "stage3", "stage4")}
                for k, v in expected.items():
                    assert logged[-1][k] == pytest.approx(v, rel=1e-12)
        hook.after_train()
    assert logged[0] == {}  # iteration 0 is not a logging iteration
    assert logged[1] != logged[3]  # a new value at iteration 3 (inputs scaled differently)


def test_hook_is_built_from_config_and_placed_before_the_writers():
    from detectron2.config import get_cfg
    from detectron2.engine import hooks as d2_hooks

    from metaspike_d2.d2.energy_hook import FiringRateHook, build_firing_rate_hook, register_firing_rate_hook

    from metaspike_d2.d2 import add_metaspike_config

    cfg = get_cfg()
    assert build_firing_rate_hook(cfg) is None  # no MODEL.METASPIKE node: off
    add_metaspike_config(cfg)
    assert cfg.MODEL.METASPIKE.FIRING_RATE_PERIOD == 0  # the key exists and is off by default
    assert build_firing_rate_hook(cfg) is None

    class FakeTrainer:
        def __init__(self):
            self._hooks = [d2_hooks.IterationTimer(), d2_hooks.PeriodicWriter([], period=20)]

    trainer = FakeTrainer()
    assert register_firing_rate_hook(trainer, cfg) is None and len(trainer._hooks) == 2
    cfg.MODEL.METASPIKE.FIRING_RATE_PERIOD = 50
    hook = register_firing_rate_hook(trainer, cfg)
    assert isinstance(hook, FiringRateHook) and hook.period == 50
    assert [type(h) for h in trainer._hooks] == [d2_hooks.IterationTimer, FiringRateHook, d2_hooks.PeriodicWriter]
