"""Spiking neurons and the helpers that move tensors across the time dimension.

Every spiking tensor in this project has the layout ``(T, B, ...)`` (time first). Neurons are
*stateless per call*: each forward consumes a whole ``(T, B, ...)`` sequence starting from a zero
membrane, so no state survives between calls (no ``reset_net``, no leaks between test images, nothing
hidden from DDP or ``torch.compile``). This fixes the original's scattered ``reset_net`` calls
(docs/deviations.md).
"""
from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

__all__ = ["MultiStepLIF", "seq_apply", "repeat_over_time", "mean_over_time"]


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

    def __init__(self, v_threshold: float = 1.0, tau: float = 2.0, surrogate_alpha: float = 4.0):
        super().__init__(
            tau=float(tau),
            decay_input=True,
            v_threshold=float(v_threshold),
            v_reset=0.0,
            surrogate_function=surrogate.Sigmoid(alpha=float(surrogate_alpha)),
            detach_reset=True,
            step_mode="m",
        )

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if x_seq.dim() < 2:
            raise ValueError(f"MultiStepLIF expects a (T, B, ...) tensor, got shape {tuple(x_seq.shape)}")
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

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold}, tau={self.tau}, surrogate={self.surrogate_function}"


def seq_apply(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a stateless module to a ``(T, B, ...)`` tensor with T folded into the batch.

    This is the one place where ``(T, B, C, H, W) -> (T*B, C, H, W) -> (T, B, C', H', W')`` happens;
    batch norms therefore pool their statistics over T and B, as in the original.
    """
    t, b = x.shape[:2]
    y = module(x.flatten(0, 1))
    return y.reshape(t, b, *y.shape[1:])


def repeat_over_time(x: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Direct encoding: ``(B, ...) -> (T, B, ...)`` by repeating the analog input T times (a view)."""
    if time_steps < 1:
        raise ValueError(f"time steps T must be >= 1, got {time_steps}")
    return x.unsqueeze(0).expand(time_steps, *x.shape)


def mean_over_time(x: torch.Tensor) -> torch.Tensor:
    """Where T ends: ``(T, B, ...) -> (B, ...)`` by averaging over time (logits, T-mean necks)."""
    return x.mean(0)
