"""Detectron2 side of the energy tools (``metaspike_d2.energy`` itself never imports Detectron2).

* :class:`FiringRateHook`: a training hook that, every ``period`` iterations, records the spikes of every
  neuron during that iteration's forward pass and puts the mean firing rate of each stage
  (``stem``, ``stage1``..``stage4``, ``neck``, ``proposal_generator``, ``roi_heads``, ``sem_seg_head``...)
  into the event storage as ``firing_rate/<stage>`` (so TensorBoard and the JSON writer show it).
  Enabled by ``MODEL.METASPIKE.FIRING_RATE_PERIOD > 0`` (see :func:`build_firing_rate_hook`).
* :func:`build_d2_energy_model`: a Detectron2 model from a config for ``tools/analyze_energy.py``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.engine import HookBase
from spikingjelly.activation_based import monitor, neuron
from torch import nn

from ..energy.counter import _spikes_per_step, stage_of

__all__ = ["FiringRateHook", "build_firing_rate_hook", "register_firing_rate_hook", "build_d2_energy_model",
           "stage_firing_rates"]


def stage_firing_rates(records: Dict[str, List[Tuple[torch.Tensor, int]]]) -> Dict[str, float]:
    """``{neuron name: [(spikes per step, elements per step), ...]}`` -> mean firing rate per stage."""
    sums: Dict[str, List[float]] = {}
    for name, recs in records.items():
        s = sums.setdefault(stage_of(name), [0.0, 0.0])
        for nnz, numel in recs:
            s[0] += float(nnz.sum())
            s[1] += float(numel) * len(nnz)
    return {k: v[0] / v[1] for k, v in sums.items() if v[1] > 0}


class FiringRateHook(HookBase):
    """Log the mean firing rate of each stage to the event storage every ``period`` iterations.

    Only the forward pass of the logged iteration is recorded (spikingjelly ``OutputMonitor`` on every
    ``neuron.BaseNode``, enabled just for that step), so the other iterations cost nothing.
    """

    def __init__(self, period: int, model: Optional[nn.Module] = None, prefix: str = "firing_rate/"):
        if int(period) < 1:
            raise ValueError(f"FiringRateHook period must be >= 1, got {period}")
        self.period = int(period)
        self.prefix = prefix
        self._model = model
        self._monitor: Optional[monitor.OutputMonitor] = None
        self._recording = False
        self.last: Dict[str, float] = {}

    def before_train(self):
        model = self._model if self._model is not None else self.trainer.model
        model = getattr(model, "module", model)  # DistributedDataParallel
        self._monitor = monitor.OutputMonitor(model, instance=neuron.BaseNode, function_on_output=_spikes_per_step)
        self._monitor.disable()

    def before_step(self):
        self._recording = (self.trainer.iter + 1) % self.period == 0
        if self._recording:
            self._monitor.clear_recorded_data()
            self._monitor.enable()

    def after_step(self):
        if not self._recording:
            return
        self._monitor.disable()
        mon = self._monitor
        records = {name: mon[name] for name in mon.monitored_layers if mon[name]}
        self.last = stage_firing_rates(records)
        storage = self.trainer.storage
        for stage, rate in self.last.items():
            storage.put_scalar(self.prefix + stage, rate, smoothing_hint=False)
        mon.clear_recorded_data()
        self._recording = False

    def after_train(self):
        if self._monitor is not None:
            self._monitor.remove_hooks()


def build_firing_rate_hook(cfg, model: Optional[nn.Module] = None) -> Optional[FiringRateHook]:
    """The hook when ``MODEL.METASPIKE.FIRING_RATE_PERIOD`` > 0 (missing key: off), else None."""
    period = int(cfg.MODEL.METASPIKE.get("FIRING_RATE_PERIOD", 0)) if "METASPIKE" in cfg.MODEL else 0
    return FiringRateHook(period, model) if period > 0 else None


def register_firing_rate_hook(trainer, cfg) -> Optional[FiringRateHook]:
    """Add the hook (if the config enables it) to a ``DefaultTrainer``, *before* its writers, so the rates
    of a logging iteration are written in the same iteration (writers skip values older than their last
    write)."""
    import weakref

    from detectron2.engine import hooks as d2_hooks

    hook = build_firing_rate_hook(cfg)
    if hook is None:
        return None
    hook.trainer = weakref.proxy(trainer)
    idx = next((i for i, h in enumerate(trainer._hooks) if isinstance(h, d2_hooks.PeriodicWriter)), len(trainer._hooks))
    trainer._hooks.insert(idx, hook)
    return hook


def build_d2_energy_model(config_file: str, weights: str = "", opts: Sequence[str] = (),
                          time_steps: Optional[int] = None, input_size: Optional[int] = None):
    """Build a model from a Detectron2 config for energy analysis.

    Returns ``(model, cfg, T, prepare)``; ``prepare(images)`` (RGB ``uint8`` arrays) returns a callable
    that runs the model in inference on them with the config's test-time resize, and
    ``prepare(images, backbone_only=True)`` one that runs only ``model.backbone`` (for BN calibration,
    which needs no annotations).
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import transforms as Tr
    from detectron2.modeling import build_model
    from detectron2.structures import ImageList

    from . import add_metaspike_config

    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if time_steps is not None:
        cfg.MODEL.METASPIKE.T = int(time_steps)
    if input_size is not None:
        cfg.INPUT.MIN_SIZE_TEST = int(input_size)
        cfg.INPUT.MAX_SIZE_TEST = max(int(cfg.INPUT.MAX_SIZE_TEST), int(input_size))
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(weights)
    model.eval()
    resize = Tr.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    bgr = cfg.INPUT.FORMAT == "BGR"

    def to_inputs(images):
        inputs = []
        for img in images:
            h, w = img.shape[:2]
            arr = resize.get_transform(img).apply_image(img)
            if bgr:
                arr = arr[:, :, ::-1]
            tensor = torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1)).astype("float32"))
            inputs.append({"image": tensor, "height": h, "width": w})
        return inputs

    def prepare(images, backbone_only: bool = False) -> Callable[[], object]:
        inputs = to_inputs(images)
        if not backbone_only:
            return lambda: model(inputs)
        device = model.pixel_mean.device
        tensors = [(x["image"].to(device) - model.pixel_mean) / model.pixel_std for x in inputs]
        batch = ImageList.from_tensors(tensors, model.backbone.size_divisibility).tensor
        return lambda: model.backbone(batch)

    return model, cfg, int(cfg.MODEL.METASPIKE.T), prepare
