"""Counting operations and firing rates of a spiking network, layer by layer.

What is counted (``docs/energy.md`` has the full method and a worked example):

* every weight layer (``nn.Conv1d/2d``, ``nn.ConvTranspose2d``, ``nn.Linear``) as it runs: the dense
  multiply-accumulates of the call (the paper's "FLOPs": ``k^2 * C_in/groups * C_out * H_out * W_out``,
  ``in * out`` for a linear layer; BN is folded into the convs and not counted, nor are residual adds,
  pooling, the attention scale or the neurons themselves), and whether its input is a spike tensor:
  binary (spikingjelly's :func:`~spikingjelly.activation_based.op_counter.base.is_binary_tensor`) or the
  integer counts of I-LIF neurons (``0..D``, each count being that many unit events after
  :func:`~metaspike_d2.expand_spikes`). Spike input: accumulate-only ("ac") with
  ``SOPs = firing rate x dense ops``, the firing rate being the mean count per input element and time step
  (for D > 1 that is D x the binary firing rate of the expanded model, as SpikeYOLO counts it); anything
  else: multiply-accumulate ("mac");
* the two spike-driven matrix products of every :class:`~metaspike_d2.blocks.SpikeDrivenSelfAttention`
  (``K^T V`` and ``Q (K^T V)``), which are not modules: from the K and Q spikes, ``d_h`` accumulates per
  spike (per unit of a count);
* every spiking neuron's output (spikingjelly :class:`~spikingjelly.activation_based.monitor.OutputMonitor`
  on ``neuron.BaseNode``, which sees :class:`~metaspike_d2.neurons.MultiStepLIF` and
  :class:`~metaspike_d2.neurons.MultiStepILIF`): spikes (summed counts) per time step.

Two accountings come out of the same run:

``paper`` ("after re-parameterization", the Spike-driven Transformer papers' numbers): each ``RepConv``
(1x1 -> BN-and-pad -> depthwise 3x3 -> 1x1 -> BN, linear) is one dense 3x3 conv ``C_in -> C_out`` driven by
the RepConv's input spikes; in ``SepConv`` the depth-wise 7x7 and the second point-wise conv (no neuron
between them) are one dense 7x7 conv ``2C -> C`` driven by the spikes in front of the depth-wise conv.

``naive`` (operator level, what the code executes): every conv as it runs; inside a RepConv only ``pw1``
sees spikes, ``dw`` and ``pw2`` are MACs on real values (T times per image), and SepConv's ``pwconv2`` is a
MAC on the depth-wise output.

Why not spikingjelly's ``op_counter`` for the main numbers: its counters work per aten call, so they
cannot fold a RepConv/SepConv chain into the conv it becomes after re-parameterization (they give the naive
view); they count a conv on spikes as the exact number of weight uses (fewer than ``rate x k^2 ...`` at
zero-padded borders and for strided convs), not the ``firing rate x FLOPs`` of the papers' formula; and a
binary-by-binary product (``K^T V``) as the number of coincidences. :func:`exact_synops` runs its
``SynOpCounter`` as an opt-in cross-check of the naive view. Spikingjelly's ``monitor`` cannot count the
weight layers either: its hooks hand a module-agnostic function only the input (or only the output), and
the dense ops need the module's kernel and output shape, so weight layers get plain forward hooks here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from spikingjelly.activation_based import monitor, neuron
from spikingjelly.activation_based.op_counter.base import is_binary_tensor
from torch import nn

from ..backbone import FEATURE_NAMES
from ..blocks import RepConv, SepConv, SpikeDrivenSelfAttention
from ..neurons import MultiStepILIF, is_spike_count

__all__ = ["LayerCount", "NeuronCount", "SpikeCounter", "stage_of", "WEIGHT_LAYERS", "exact_synops"]

#: Module types whose calls are counted as weight layers.
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
#: Path components skipped when naming the stage a module belongs to.
_WRAPPERS = {"module", "model", "backbone", "bottom_up", "net", "_orig_mod"}
_HEAD_NAMES = {"head", "head_kd", "lif", "head_drop"}


def stage_of(name: str) -> str:
    """The stage a module name belongs to: a backbone feature name (``stem``, ``stage1``...) if the path
    has one, ``neck`` for the rest of a Detectron2 ``backbone`` (FPN), ``head`` for the classifier head,
    else the first non-wrapper component (``proposal_generator``, ``roi_heads``, ``sem_seg_head``, ...)."""
    parts = [p for p in name.split(".") if p]
    for part in parts:
        if part in FEATURE_NAMES:
            return part
    if parts and parts[0] == "backbone":  # Detectron2: FPN convs, their neurons and top block
        return "neck"
    for part in parts:
        if part not in _WRAPPERS:
            return "head" if part in _HEAD_NAMES else part
    return "model"


@dataclass
class _Accum:
    """Running sums of one counted layer over every call (all images, all time steps)."""

    dense: float = 0.0          # dense multiply-accumulates of the calls (sum over calls)
    weighted: float = 0.0       # sum over binary-input calls of (input firing rate x dense ops) = SOPs
    mac_calls: int = 0          # calls whose input was not binary
    calls: int = 0
    steps: int = 1              # time steps one call covers
    first_call: float = float("inf")  # position of the first call in the forward pass (layer order)
    step_nnz: Optional[List[float]] = None
    step_numel: Optional[List[float]] = None

    def add_steps(self, nnz: Sequence[float], numel: Sequence[float]) -> None:
        if self.step_nnz is None or len(self.step_nnz) != len(nnz):
            if self.step_nnz is not None:  # a different number of steps than before: keep only the total
                self.step_nnz = [sum(self.step_nnz) + sum(nnz)]
                self.step_numel = [sum(self.step_numel) + sum(numel)]
                return
            self.step_nnz = [0.0] * len(nnz)
            self.step_numel = [0.0] * len(numel)
        for i, (a, b) in enumerate(zip(nnz, numel)):
            self.step_nnz[i] += float(a)
            self.step_numel[i] += float(b)

    def scaled(self, factor: float) -> "_Accum":
        """The same inputs driving a layer with ``factor`` times the dense ops (folded convs)."""
        return _Accum(self.dense * factor, self.weighted * factor, self.mac_calls, self.calls, self.steps,
                      self.first_call, None if self.step_nnz is None else list(self.step_nnz),
                      None if self.step_numel is None else list(self.step_numel))


@dataclass
class LayerCount:
    """One counted layer, per image (averaged over the images seen).

    ``flops``: dense multiply-accumulates of one pass (one time step) of the layer; ``time_steps_run``: how
    many passes it makes per image (T for layers inside the spiking network, 1 for the encoding conv,
    which runs once). ``kind == "ac"``: ``sops = firing_rate * time_steps_run * flops``, ``macs = 0``;
    ``kind == "mac"``: ``macs = time_steps_run * flops``, ``sops = 0``, ``firing_rate`` is None.
    """

    name: str
    stage: str
    op: str
    kind: str
    flops: float
    time_steps_run: int
    firing_rate: Optional[float]
    firing_rate_per_step: Optional[List[float]]
    sops: float
    macs: float

    def energy_pj(self, e_mac_pj: float, e_ac_pj: float) -> float:
        return e_mac_pj * self.macs + e_ac_pj * self.sops


@dataclass
class NeuronCount:
    """Output firing rate of one spiking neuron layer, mean and per step: the mean spike count per neuron and
    time step (binary neurons: the fraction that fires; I-LIF neurons: a count in ``0..spike_levels``)."""

    name: str
    stage: str
    firing_rate: float
    firing_rate_per_step: List[float]
    numel_per_image: float
    spike_levels: int = 1

    @property
    def binary_rate(self) -> float:
        """Firing rate of the binary-expanded neuron (D unit-event slots per step): ``firing_rate / D``."""
        return self.firing_rate / self.spike_levels


def _dense_ops(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    """Multiply-accumulates of one dense call of a weight layer (the papers' FLOPs)."""
    if isinstance(module, nn.Linear):
        return float(out.numel()) * module.in_features
    if isinstance(module, nn.ConvTranspose2d):  # every input element meets k^2 * C_out/groups weights
        k = module.kernel_size[0] * module.kernel_size[1]
        return float(x.numel()) * k * module.out_channels / module.groups
    k = 1
    for s in module.kernel_size:
        k *= s
    positions = out.numel() // module.out_channels
    return float(positions) * module.out_channels * (module.in_channels // module.groups) * k


def _op_name(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"linear {module.in_features}->{module.out_features}"
    k = "x".join(str(s) for s in module.kernel_size)
    kind = "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv"
    dw = " dw" if module.groups > 1 and module.groups == module.in_channels else (
        f" g{module.groups}" if module.groups > 1 else "")
    return f"{kind}{k}{dw} {module.in_channels}->{module.out_channels}"


class SpikeCounter:
    """Hooks a model, counts every forward run inside :meth:`count`, and builds per-layer tables.

    ``time_steps``: T of the model (to split flattened ``(T*B, ...)`` inputs into time steps).
    Usage::

        counter = SpikeCounter(model, time_steps=4)
        with counter:
            for images in batches:
                with counter.count(batch_size=len(images)):
                    model(images)
        paper_layers = counter.layers("paper"); naive_layers = counter.layers("naive")
    """

    def __init__(self, model: nn.Module, time_steps: int):
        if int(time_steps) < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        self.model = model
        self.time_steps = int(time_steps)
        self.num_images = 0
        self._batch: Optional[int] = None
        self._active = False
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._neuron_monitor: Optional[monitor.OutputMonitor] = None
        self._stats: Dict[str, _Accum] = {}
        self._modules = dict(model.named_modules())
        self._calls = 0

    # --------------------------------------------------------------------------- hooks
    def __enter__(self) -> "SpikeCounter":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        for name, module in self._modules.items():
            if isinstance(module, WEIGHT_LAYERS):
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        # spikingjelly's monitor records each neuron's spikes per time step (outputs are (T, B, ...)).
        self._neuron_monitor = monitor.OutputMonitor(self.model, instance=neuron.BaseNode,
                                                     function_on_output=_spikes_per_step)
        self._neuron_monitor.disable()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._neuron_monitor is not None:
            self._neuron_monitor.remove_hooks()

    @contextlib.contextmanager
    def count(self, batch_size: int):
        """Count the forward passes run inside this block; they process ``batch_size`` images."""
        if not self._handles:
            raise RuntimeError("SpikeCounter is not attached (use it as a context manager or call attach())")
        self._batch, self._active = int(batch_size), True
        self._neuron_monitor.enable()
        try:
            with torch.no_grad():
                yield self
            self.num_images += int(batch_size)
        finally:
            self._active = False
            self._neuron_monitor.disable()

    def _split_steps(self, module: nn.Module, x: torch.Tensor, spiking: bool) -> Tuple[int, torch.Tensor]:
        """``(steps, x viewed as (steps, -1))``. Inputs inside the spiking network are ``(T*B, ...)``
        (time-major) or, for linear layers, ``(T, B, ..., C)``; the encoding conv gets ``(B, ...)``.
        Other leading sizes (e.g. ``T * num_rois`` in detection heads): spikes come from a neuron, hence
        hold T time-major steps; real values there are T-averaged membranes, used once."""
        t, b, lead = self.time_steps, self._batch, x.shape[0]
        if isinstance(module, nn.Linear) and x.dim() >= 3 and lead == t:
            return t, x.reshape(t, -1)
        if b is not None and lead == t * b:
            return t, x.reshape(t, -1)
        if b is not None and lead == b:
            return 1, x.reshape(1, -1)
        if spiking and lead % t == 0:
            return t, x.reshape(t, -1)
        return 1, x.reshape(1, -1)

    def _make_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if not self._active or not inputs or not torch.is_tensor(inputs[0]) or not torch.is_tensor(output):
                return
            x = inputs[0].detach()
            acc = self._stats.setdefault(name, _Accum())
            if acc.calls == 0:
                acc.first_call = self._calls
            self._calls += 1
            dense = _dense_ops(module, x, output)
            spiking = is_binary_tensor(x) or is_spike_count(x)  # binary spikes or I-LIF counts: accumulate-only
            steps, per_step = self._split_steps(module, x, spiking)
            acc.calls += 1
            acc.dense += dense
            acc.steps = steps
            if spiking:
                nnz = per_step.sum(dim=1, dtype=torch.float64)  # spikes: non-zeros, or the sum of counts
                numel = float(per_step.shape[1])
                acc.weighted += float(nnz.sum()) / (numel * steps) * dense
                acc.add_steps(nnz.tolist(), [numel] * steps)
            else:
                acc.mac_calls += 1
        return hook

    # --------------------------------------------------------------------------- tables
    def _neuron_records(self) -> Dict[str, List[Tuple[torch.Tensor, int]]]:
        mon = self._neuron_monitor
        if mon is None:
            return {}
        return {name: mon[name] for name in mon.monitored_layers if mon[name]}

    def neurons(self) -> List[NeuronCount]:
        """Firing rate of every spiking neuron layer that fired during counting, in module order."""
        out = []
        for name, records in self._neuron_records().items():
            nnz, numel = _sum_records(records)
            per_step = [float(a) / float(b) for a, b in zip(nnz, numel)]
            module = self._modules.get(name)
            levels = module.spike_levels if isinstance(module, MultiStepILIF) else 1
            out.append(NeuronCount(name, stage_of(name), float(sum(nnz)) / float(sum(numel)), per_step,
                                   float(sum(numel)) / max(self.num_images, 1), levels))
        return out

    def stage_firing_rates(self) -> Dict[str, float]:
        """Mean firing rate of all neurons of each stage (non-zero outputs / outputs)."""
        sums: Dict[str, List[float]] = {}
        for name, records in self._neuron_records().items():
            nnz, numel = _sum_records(records)
            s = sums.setdefault(stage_of(name), [0.0, 0.0])
            s[0] += float(sum(nnz))
            s[1] += float(sum(numel))
        return {k: v[0] / v[1] for k, v in sums.items() if v[1] > 0}

    def _attention_layers(self) -> List[Tuple[float, str, str, _Accum]]:
        """``K^T V`` and ``Q (K^T V)`` of every SDSA: per head ``d_h`` accumulates per K (resp. Q) spike."""
        recs = self._neuron_records()
        out = []
        for name, module in self._modules.items():
            if not isinstance(module, SpikeDrivenSelfAttention):
                continue
            prefix = f"{name}." if name else ""
            for operand, suffix, op in (("k_lif", "attn_kv", "matmul K^T V"), ("q_lif", "attn_qkv", "matmul Q (K^T V)")):
                records = recs.get(prefix + operand)
                if not records:
                    continue
                acc = _Accum(steps=self.time_steps)
                for nnz_t, numel_t in records:
                    c = module.q_conv.pw2.out_channels
                    d_h = c // module.num_heads
                    numel = float(numel_t) * len(nnz_t)
                    acc.calls += 1
                    acc.dense += numel * d_h
                    acc.weighted += float(nnz_t.sum()) * d_h
                    acc.add_steps(nnz_t.tolist(), [float(numel_t)] * len(nnz_t))
                    acc.steps = len(nnz_t)
                # placed right before the output projection (whose pw1 runs after both products)
                proj = self._stats.get(prefix + "proj_conv.pw1")
                order = (proj.first_call if proj is not None else float("inf")) - (0.5 if operand == "k_lif" else 0.25)
                out.append((order, prefix + suffix, f"{op} ({module.num_heads} heads)", acc))
        return out

    def layers(self, accounting: str = "paper") -> List[LayerCount]:
        """Per-layer counts averaged per image. ``accounting``: ``"paper"`` or ``"naive"`` (module docstring)."""
        if accounting not in ("paper", "naive"):
            raise ValueError(f"accounting must be 'paper' or 'naive', got {accounting!r}")
        rows: List[Tuple[float, str, str, _Accum]] = []
        consumed = set()
        if accounting == "paper":
            for name, module in self._modules.items():
                prefix = f"{name}." if name else ""
                if isinstance(module, RepConv) and prefix + "pw1" in self._stats:
                    k = module.dw.kernel_size[0] * module.dw.kernel_size[1]
                    factor = k * module.pw2.out_channels / module.pw1.out_channels
                    op = (f"RepConv as conv{module.dw.kernel_size[0]}x{module.dw.kernel_size[1]} "
                          f"{module.pw1.in_channels}->{module.pw2.out_channels}")
                    rows.append((self._stats[prefix + "pw1"].first_call, name, op,
                                 self._stats[prefix + "pw1"].scaled(factor)))
                    consumed.update(prefix + p for p in ("pw1", "dw", "pw2"))
                elif isinstance(module, SepConv) and prefix + "dwconv" in self._stats:
                    dw, pw2 = module.dwconv, module.pwconv2
                    factor = pw2.out_channels * dw.groups / dw.out_channels
                    op = f"dw+pw as conv{dw.kernel_size[0]}x{dw.kernel_size[1]} {dw.in_channels}->{pw2.out_channels}"
                    rows.append((self._stats[prefix + "dwconv"].first_call, prefix + "dwconv+pwconv2", op,
                                 self._stats[prefix + "dwconv"].scaled(factor)))
                    consumed.update((prefix + "dwconv", prefix + "pwconv2"))
        for name, acc in self._stats.items():
            if name not in consumed:
                rows.append((acc.first_call, name, _op_name(self._modules[name]), acc))
        rows.extend(self._attention_layers())
        rows.sort(key=lambda r: (r[0], r[1]))
        n = max(self.num_images, 1)
        return [self._to_layer(name, op, acc, n) for _, name, op, acc in rows if acc.calls]

    @staticmethod
    def _to_layer(name: str, op: str, acc: _Accum, n: int) -> LayerCount:
        steps = max(acc.steps, 1)
        flops = acc.dense / (n * steps)
        if acc.mac_calls == 0:
            rate = acc.weighted / acc.dense if acc.dense else 0.0
            per_step = None
            if acc.step_nnz is not None:
                per_step = [a / b if b else 0.0 for a, b in zip(acc.step_nnz, acc.step_numel)]
            return LayerCount(name, stage_of(name), op, "ac", flops, steps, rate, per_step,
                              sops=acc.weighted / n, macs=0.0)
        return LayerCount(name, stage_of(name), op, "mac", flops, steps, None, None, sops=0.0, macs=acc.dense / n)


def _spikes_per_step(spikes: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """For the neuron monitor: ``(T, B, ...)`` spikes or counts -> (spikes per time step, elements per step)."""
    s = spikes.detach()
    return s.reshape(s.shape[0], -1).sum(dim=1, dtype=torch.float64).cpu(), int(s[0].numel())



def _sum_records(records: Iterable[Tuple[torch.Tensor, int]]) -> Tuple[List[float], List[float]]:
    nnz: List[float] = []
    numel: List[float] = []
    for nnz_t, numel_t in records:
        if not nnz:
            nnz, numel = [0.0] * len(nnz_t), [0.0] * len(nnz_t)
        if len(nnz_t) != len(nnz):  # different T between calls: fold into one bucket
            nnz, numel = [sum(nnz) + float(nnz_t.sum())], [sum(numel) + float(numel_t) * len(nnz_t)]
            continue
        for i, v in enumerate(nnz_t.tolist()):
            nnz[i] += v
            numel[i] += float(numel_t)
    return nnz, numel


def exact_synops(model: nn.Module, run: Callable[[], object]) -> Dict[str, int]:
    """Cross-check with spikingjelly's ``SynOpCounter``: exact spike-driven weight uses per module scope
    (naive, operator-level view) of whatever ``run()`` executes. Slow (it checks every aten call)."""
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    counter = SynOpCounter()
    with torch.no_grad(), DispatchCounterMode([counter]):
        run()
    root = type(model).__name__
    out = {}
    for scope, v in counter.get_counts().items():
        if scope.startswith(root + "."):
            scope = scope[len(root) + 1:]
        elif scope == root:
            scope = "model"
        out[scope] = int(sum(v.values()))
    return out
