"""Spiking neurons and the helpers that move tensors across the time dimension.

Every spiking tensor in this project has the layout ``(T, B, ...)`` (time first). Neurons are
*stateless per call*: each forward consumes a whole ``(T, B, ...)`` sequence starting from a zero
membrane, so no state survives between calls (no ``reset_net``, no leaks between test images, nothing
hidden from DDP or ``torch.compile``). This fixes the original's scattered ``reset_net`` calls
(docs/deviations.md).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron, surrogate
from spikingjelly.activation_based.layer import SpikeCountToBinary

__all__ = ["MultiStepLIF", "MultiStepILIF", "SPIKING_NEURONS", "spiking_neuron", "LIFSurrogateCPU", "lif_inference_cpu",
           "ILIFSurrogateCPU", "ilif_inference_cpu", "lif_graph", "ilif_graph", "is_spike_count", "binary_slots", "seq_apply", "repeat_over_time",
           "mean_over_time"]


#: tau of the binary neurons (MultiStepLIF's default).
LIF_TAU = 2.0


class MultiStepLIF(neuron.LIFNode):
    """Multi-step leaky integrate-and-fire neuron of Meta-SpikeFormer (the paper's "spike neuron layer").

    Per time step, with a membrane that starts at 0 in every call::

        H[t] = V[t-1] + (X[t] - V[t-1]) / tau          (charge, decay_input=True, v_reset=0)
        S[t] = Heaviside(H[t] - v_threshold)            (fire; backward: sigmoid'(alpha * x))
        V[t] = H[t] * (1 - S[t])                        (hard reset to 0, reset path detached)

    Input and output: ``(T, B, ...)``; the output is a binary spike tensor of the input's dtype.
    It is a spikingjelly ``LIFNode`` (so spikingjelly's monitors and op counters recognise it) whose
    forward calls spikingjelly's functional multi-step LIF with an explicit zero initial membrane:
    on CUDA spikingjelly picks its fused kernel (native CUDA or Triton), on the CPU the torch path.
    """

    def __init__(self, v_threshold: float = 1.0, tau: float = LIF_TAU, surrogate_alpha: float = 4.0):
        super().__init__(
            tau=float(tau),
            decay_input=True,
            v_threshold=float(v_threshold),
            v_reset=0.0,
            surrogate_function=surrogate.Sigmoid(alpha=float(surrogate_alpha)),
            detach_reset=True,
            step_mode="m",
        )

    #: On the CPU, use this project's LIF kernels instead of spikingjelly's torch path: without autograd
    #: :func:`lif_inference_cpu` (bit-identical spikes, no surrogate bookkeeping), with autograd
    #: :class:`LIFSurrogateCPU` (bit-identical spikes, the same surrogate gradient; docs/benchmarks.md,
    #: Table E). Set to False to time spikingjelly's CPU path (benchmarks/run.py does). CUDA
    #: always uses spikingjelly's fused kernels.
    cpu_kernel: bool = True

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.dim() < 2:
            raise ValueError(f"MultiStepLIF expects a (T, B, ...) tensor, got shape {tuple(x_seq.shape)}")
        if _exporting():
            return lif_graph(x_seq, self.tau, self.v_threshold)
        if self.cpu_kernel and x_seq.device.type == "cpu":
            if torch.is_grad_enabled() and x_seq.requires_grad:
                return LIFSurrogateCPU.apply(x_seq, self.tau, self.v_threshold, self.surrogate_function.alpha)
            return lif_inference_cpu(x_seq, self.tau, self.v_threshold)
        v0 = torch.zeros(x_seq.shape[1:], dtype=torch.float32, device=x_seq.device)
        spikes, _, _ = sj_functional.lif_multi_step(
            x_seq,
            v0,
            self.tau,
            self.decay_input,
            self.v_threshold,
            self.v_reset,
            self.surrogate_function,
            self.detach_reset,
        )
        return spikes

    def set_threshold(self, v_threshold: float) -> None:
        """Firing threshold V_th (the same call sets an I-LIF's count unit from the binary V_th)."""
        self.v_threshold = float(v_threshold)

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold}, tau={self.tau}, surrogate={self.surrogate_function}"


def lif_inference_cpu(x_seq: torch.Tensor, tau: float, v_threshold: float) -> torch.Tensor:
    """Forward-only multi-step LIF (zero initial membrane, hard reset to 0, ``decay_input=True``).

    Performs the same float operations as spikingjelly's CPU forward, so spikes are bit-identical, but
    without its bookkeeping (no saved charge sequence, no stacking, no zero membrane to allocate). At T=1
    the membrane starts at 0, so ``H = X / tau`` and the neuron is the closed form ``X / tau >= V_th``
    (for tau a power of two, ``X >= tau * V_th``: division by it is exact).
    """
    tau = float(tau)
    if x_seq.shape[0] == 1 and _divides_exactly(tau, v_threshold):
        return _fire(x_seq, tau * v_threshold, x_seq.dtype)  # exact in any float dtype (bf16 -> fp32 is exact)
    out = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
    if x_seq.dtype in (torch.float16, torch.bfloat16):
        x_seq = x_seq.float()  # the membrane in float32, as spikingjelly computes it
    if x_seq.shape[0] == 1:
        return _fire(x_seq.div(tau), v_threshold, out.dtype)
    v = None
    for t in range(x_seq.shape[0]):
        if v is None:
            h = x_seq[t].div(tau)  # 0 + (x - 0) / tau
        else:
            h = x_seq[t].sub(v).div_(tau).add_(v)  # v + (x - v) / tau
        spike = h.ge(v_threshold)
        out[t] = spike
        v = h.masked_fill_(spike, 0.0)  # hard reset: v = 0 * s + (1 - s) * h
    return out


class LIFSurrogateCPU(torch.autograd.Function):
    """Multi-step LIF with the sigmoid surrogate gradient, for training on the CPU. ``(T, B, ...)`` -> spikes.

    The forward performs spikingjelly's CPU float operations (``H = V + (X - V) / tau``, ``S = H >= V_th``,
    ``V = H * (1 - S)``), so spikes are bit-identical; the backward is spikingjelly's BPTT with a detached
    reset: ``dH[t] = dS[t] * sg'(H[t] - V_th) + dV[t] * (1 - S[t])``, ``dX[t] = dH[t] / tau``,
    ``dV[t-1] = dH[t] * (1 - 1/tau)``, with ``sg'(z) = alpha * sigmoid(alpha z) * (1 - sigmoid(alpha z))``.
    Written by hand because spikingjelly's CPU op validates, stacks and allocates a zero membrane and its
    gradient on every call, which at T=1 (the detection quickstart) costs more than the arithmetic
    (the quickstart's training step: 1.4x faster with this kernel; docs/benchmarks.md, Table E).
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, tau: float, v_threshold: float, alpha: float) -> torch.Tensor:
        tau, v_threshold = float(tau), float(v_threshold)
        x = x_seq.float()
        ctx.constants = (tau, v_threshold, float(alpha))
        ctx.saved_input = x.shape[0] == 1 and _divides_exactly(tau, v_threshold)
        if ctx.saved_input:
            # the membrane starts at 0: H = X / tau, and H >= V_th <=> X >= tau * V_th (no division needed)
            ctx.save_for_backward(x)
            return _fire(x, tau * v_threshold, x_seq.dtype)
        if x.shape[0] == 1:
            charge = x / tau  # the membrane starts at 0: H = 0 + (X - 0) / tau
            ctx.save_for_backward(charge)
            return _fire(charge, v_threshold, x_seq.dtype)
        charge = torch.empty_like(x, memory_format=torch.contiguous_format)
        spikes = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        v = torch.zeros_like(x[0])
        for t in range(x.shape[0]):
            h = v + (x[t] - v) / tau
            charge[t] = h
            torch.ge(h, v_threshold, out=spikes[t])
            v = h.masked_fill(spikes[t], 0.0)
        ctx.save_for_backward(charge, spikes)
        return spikes.to(x_seq.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # in-place arithmetic: no double backward
    def backward(ctx, grad_spikes: torch.Tensor):
        saved, *spikes = ctx.saved_tensors
        tau, v_threshold, alpha = ctx.constants
        if ctx.saved_input:  # X, with alpha (H - V_th) = (X - tau V_th) alpha / tau
            sig = saved.sub(tau * v_threshold).mul_(alpha / tau).sigmoid_()
        else:  # the charge H
            sig = saved.sub(v_threshold).mul_(alpha).sigmoid_()
        grad = torch.ops.aten.sigmoid_backward(grad_spikes.float(), sig)  # dS * sg'(H - V_th) / alpha
        if saved.shape[0] == 1:
            return grad.mul_(alpha / tau).to(grad_spikes.dtype), None, None, None
        charge = saved
        grad.mul_(alpha)  # dS * sg'
        carry = torch.zeros_like(grad[0])
        for t in range(charge.shape[0] - 1, -1, -1):
            grad[t].add_(carry.masked_fill_(spikes[0][t], 0.0))  # dH[t] = dS[t] sg' + dV[t] * (1 - S[t])
            carry = grad[t] - grad[t] / tau
        return grad.div_(tau).to(grad_spikes.dtype), None, None, None


#: Membrane decay of the integer neuron, ``beta = 1 - 1/tau = 0.25`` (SpikeYOLO's I-LIF; spikingjelly's default).
ILIF_TAU = 4.0 / 3.0


class MultiStepILIF(neuron.ILIFNode):
    """Multi-step integer leaky integrate-and-fire neuron (I-LIF, SpikeYOLO): ``D``-level "integer spikes".

    Per time step, with a membrane that starts at 0 in every call::

        H[t] = beta * V[t-1] + X[t]                     (charge, beta = 1 - 1/tau = 0.25)
        C[t] = round(clip(H[t] / V_th, 0, D))           (fire a count of 0..D unit spikes)
        V[t] = H[t] - C[t] * V_th                       (soft reset, reset path detached)

    Backward: straight-through, ``dC/dH = 1/V_th`` where ``H / V_th`` lies in ``[0, D]`` and 0 elsewhere
    (spikingjelly's ``MultiLevelSpikeCount`` window). Input and output ``(T, B, ...)``; the output holds
    integer counts in the input's dtype. At inference each count is ``D`` binary events
    (:func:`metaspike_d2.expand_spikes`). It is spikingjelly's ``ILIFNode`` (monitors and op counters see
    it; CUDA runs its kernels); on the CPU this project's kernels compute the same float operations.
    """

    #: As :attr:`MultiStepLIF.cpu_kernel`: False times spikingjelly's CPU path instead of this project's.
    cpu_kernel: bool = True

    def __init__(self, v_threshold: float = 1.0, spike_levels: int = 4, tau: float = ILIF_TAU):
        if int(spike_levels) != spike_levels or spike_levels < 2:
            raise ValueError(f"MultiStepILIF needs spike_levels D >= 2 (D = 1 is MultiStepLIF), got {spike_levels!r}")
        super().__init__(tau=float(tau), v_threshold=float(v_threshold),
                         surrogate_function=surrogate.MultiLevelSpikeCount(int(spike_levels)),
                         detach_reset=True, step_mode="m")

    @property
    def spike_levels(self) -> int:
        """D, the largest count one neuron emits per time step."""
        return int(self.surrogate_function.max_spike_count)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.dim() < 2:
            raise ValueError(f"MultiStepILIF expects a (T, B, ...) tensor, got shape {tuple(x_seq.shape)}")
        if _exporting():
            return ilif_graph(x_seq, self.tau, self.v_threshold, self.spike_levels)
        if self.cpu_kernel and x_seq.device.type == "cpu":
            if torch.is_grad_enabled() and x_seq.requires_grad:
                return ILIFSurrogateCPU.apply(x_seq, self.tau, self.v_threshold, self.spike_levels)
            return ilif_inference_cpu(x_seq, self.tau, self.v_threshold, self.spike_levels)
        v0 = torch.zeros(x_seq.shape[1:], dtype=torch.float32, device=x_seq.device)
        spikes, _, _ = sj_functional.ilif_multi_step(x_seq, v0, self.tau, self.v_threshold, self.surrogate_function,
                                                     self.detach_reset)
        return spikes

    def set_threshold(self, v_threshold: float) -> None:
        """The count unit from a binary neuron's V_th: ``tau_LIF * V_th`` (see :func:`spiking_neuron`)."""
        self.v_threshold = LIF_TAU * float(v_threshold)

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold}, spike_levels={self.spike_levels}, tau={self.tau:.4g}"


#: The neuron classes of this project (binary and integer).
SPIKING_NEURONS = (MultiStepLIF, MultiStepILIF)


def spiking_neuron(v_threshold: float, spike_levels: int = 1, tau: float = LIF_TAU,
                   surrogate_alpha: float = 4.0) -> neuron.BaseNode:
    """The paper's spike neuron layer with ``D = spike_levels``: binary LIF for D = 1, I-LIF for D >= 2.

    The I-LIF's count unit is ``tau * v_threshold``, the input at which the binary LIF (charging
    ``X / tau`` from rest) fires at T=1: with the default V_th 0.5 that is 1, SpikeYOLO's unit threshold
    (the attention neurons, at half the threshold, count in units of 0.5).
    """
    if spike_levels == 1:
        return MultiStepLIF(v_threshold, tau=tau, surrogate_alpha=surrogate_alpha)
    return MultiStepILIF(float(tau) * float(v_threshold), spike_levels)


def _ilif_count(charge: torch.Tensor, v_threshold: float, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """``round(clip(H / V_th, 0, D))``, the float operations of spikingjelly's CPU I-LIF, as ``dtype``."""
    return charge.div(v_threshold).clamp_(0, levels).round_().to(dtype)


def ilif_inference_cpu(x_seq: torch.Tensor, tau: float, v_threshold: float, levels: int) -> torch.Tensor:
    """Forward-only multi-step I-LIF from a zero membrane (soft reset), bit-identical to spikingjelly's CPU
    op without its checks, stacking and saved charges. At T=1 the membrane is the input (``0.25 * 0 + X``)."""
    x = x_seq.float() if x_seq.dtype in (torch.float16, torch.bfloat16) else x_seq
    if x.shape[0] == 1:
        return _ilif_count(x, v_threshold, levels, x_seq.dtype)
    out = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
    decay, v = 1 - 1 / float(tau), torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        h = decay * v + x[t]
        out[t] = count = _ilif_count(h, v_threshold, levels, h.dtype)
        v = h - count * v_threshold
    return out


class ILIFSurrogateCPU(torch.autograd.Function):
    """Multi-step I-LIF with the rectangular straight-through gradient, for training on the CPU.

    The forward is :func:`ilif_inference_cpu`'s (spikingjelly's float operations); the backward is
    spikingjelly's with a detached reset: ``dH[t] = dC[t] * [0 <= H[t]/V_th <= D] / V_th + beta * dH[t+1]``,
    ``dX[t] = dH[t]``. Only the window mask is saved (a bool per element; spikingjelly keeps the charges).
    Written by hand for the reason given at :class:`LIFSurrogateCPU`: per-call overhead at T=1.
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, tau: float, v_threshold: float, levels: int) -> torch.Tensor:
        x = x_seq.float()
        decay, v_threshold = 1 - 1 / float(tau), float(v_threshold)
        ctx.constants = (decay, v_threshold)
        counts = torch.empty_like(x, memory_format=torch.contiguous_format)
        window = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        v, steps = None, x.shape[0]
        for t in range(steps):
            h = x[t] if v is None else decay * v + x[t]
            scaled = h / v_threshold
            torch.logical_and(scaled >= 0, scaled <= levels, out=window[t])
            torch.round(scaled.clamp_(0, levels), out=counts[t])
            if t + 1 < steps:  # the membrane after the last step is not an output
                v = h - counts[t] * v_threshold
        ctx.save_for_backward(window)
        return counts.to(x_seq.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_counts: torch.Tensor):
        (window,) = ctx.saved_tensors
        decay, v_threshold = ctx.constants
        g = grad_counts.float()
        grad = torch.empty_like(g, memory_format=torch.contiguous_format)
        carry = None
        for t in range(g.shape[0] - 1, -1, -1):
            gh = torch.div(g[t], v_threshold, out=grad[t]).masked_fill_(~window[t], 0.0)
            if carry is not None:
                gh.add_(carry)
            carry = gh * decay
        return grad.to(grad_counts.dtype), None, None, None


def _exporting() -> bool:
    """True while ``torch.jit.trace`` / ``torch.onnx.export`` records the model: the neurons then emit plain
    tensor operations (no autograd Function, no ``out=`` buffers), which every graph runtime can run."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def lif_graph(x_seq: torch.Tensor, tau: float, v_threshold: float) -> torch.Tensor:
    """:func:`lif_inference_cpu` in plain, traceable tensor operations (the exported form of the LIF).

    The same float operations in the same order, so an exported graph fires exactly where PyTorch does: at
    T=1 one comparison (``X >= tau * V_th`` for tau a power of two), for T > 1 the time loop unrolled.
    """
    tau, v_threshold = float(tau), float(v_threshold)
    if x_seq.shape[0] == 1 and _divides_exactly(tau, v_threshold):
        return (x_seq >= tau * v_threshold).to(x_seq.dtype)
    x = x_seq.float() if x_seq.dtype in (torch.float16, torch.bfloat16) else x_seq
    spikes, v = [], None
    for t in range(x.shape[0]):
        h = x[t] / tau if v is None else (x[t] - v) / tau + v
        fired = h >= v_threshold
        spikes.append(fired.to(x_seq.dtype))
        v = torch.where(fired, torch.zeros_like(h), h)
    return torch.stack(spikes)


def ilif_graph(x_seq: torch.Tensor, tau: float, v_threshold: float, levels: int) -> torch.Tensor:
    """:func:`ilif_inference_cpu` in plain, traceable tensor operations (the exported form of the I-LIF):
    ``round(clip(H / V_th, 0, D))`` per step with a soft reset, the loop over T unrolled."""
    x = x_seq.float() if x_seq.dtype in (torch.float16, torch.bfloat16) else x_seq
    decay, v_threshold = 1 - 1 / float(tau), float(v_threshold)
    counts, v = [], None
    for t in range(x.shape[0]):
        h = x[t] if v is None else decay * v + x[t]
        count = torch.round(torch.clamp(h / v_threshold, 0, levels))
        counts.append(count.to(x_seq.dtype))
        v = h - count * v_threshold
    return torch.stack(counts)


def _divides_exactly(tau: float, v_threshold: float) -> bool:
    """True when ``X / tau >= V_th`` and ``X >= tau * V_th`` agree for every float X: tau is a power of two
    (dividing by it is exact) and ``tau * V_th`` is finite."""
    mantissa, _ = math.frexp(tau)
    return mantissa == 0.5 and math.isfinite(tau * v_threshold)


def _fire(charge: torch.Tensor, v_threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """``S = H >= V_th`` as a ``dtype`` tensor, written directly (no bool result to convert afterwards)."""
    return torch.ge(charge, v_threshold, out=torch.empty(charge.shape, dtype=dtype, device=charge.device))


def is_spike_count(x: torch.Tensor, levels: int | None = None) -> bool:
    """True when every element of ``x`` is a non-negative integer (at most ``levels`` if given): the output of
    a neuron, binary or I-LIF."""
    ok = (x >= 0) & (x == x.round())
    if levels is not None:
        ok &= x <= levels
    return x.is_floating_point() and x.numel() > 0 and bool(ok.all())


def binary_slots(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer spike counts ``(...)`` in ``0..D`` -> their ``D`` binary slots ``(D, ...)`` (slot d fires where
    count > d; the slots sum to the counts): spikingjelly's ``SpikeCountToBinary``, with the range checked."""
    if levels < 1:
        raise ValueError(f"binary_slots: levels D must be >= 1, got {levels}")
    bad = (counts < 0) | (counts > levels) | (counts != counts.round())
    if bool(bad.any()):
        value = counts[bad].flatten()[0].item()
        raise ValueError(f"binary_slots: expected integer spike counts in 0..{levels}, found {value!r}")
    return SpikeCountToBinary(levels, always_convert=True)(counts.unsqueeze(0))


def seq_apply(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to a ``(T, B, ...)`` tensor with T folded into the batch.

    This is the one place where ``(T, B, C, H, W) -> (T*B, C, H, W) -> (T, B, C', H', W')`` happens;
    batch norms therefore pool their statistics over T and B, as in the original. B is recovered as ``-1``:
    in an exported graph a B of 0 (no detections for a mask head) would otherwise read as ONNX's "copy
    this dimension".
    """
    t = x.shape[0]
    y = module(x.flatten(0, 1))
    return y.reshape(t, -1, *y.shape[1:])


def repeat_over_time(x: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Direct encoding: ``(B, ...) -> (T, B, ...)`` by repeating the analog input T times (a view)."""
    if time_steps < 1:
        raise ValueError(f"time steps T must be >= 1, got {time_steps}")
    return x.unsqueeze(0).expand(time_steps, *x.shape)


def mean_over_time(x: torch.Tensor) -> torch.Tensor:
    """Where T ends: ``(T, B, ...) -> (B, ...)`` by averaging over time (logits, T-mean necks)."""
    return x.mean(0)
