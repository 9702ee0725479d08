"""Spike-driven inference of integer-spike models: every count of 0..D becomes D binary events.

An I-LIF neuron (:class:`~metaspike_d2.neurons.MultiStepILIF`) emits a count ``C`` in ``0..D`` per time
step. For a weight layer, ``W C = sum_{d<D} W S_d`` with the binary slots ``S_d = [C > d]``
(spikingjelly's ``SpikeCountToBinary``), so the layer can run on binary spikes only, i.e. by accumulation
(AC) instead of integer-by-weight multiply-accumulates. ``expand_spikes(model)`` returns an inference copy
that does exactly that:

1. :func:`~metaspike_d2.reparameterize` in ``"spike"`` mode: every BN is folded, every RepConv and SepConv
   tail becomes one dense conv on the neuron output, so each conv and linear layer after a neuron is a
   single ``W x + b``;
2. every weight layer (``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``, Detectron2's ``Conv2d``) is
   wrapped in :class:`BinarySlotLayer`: an input of integer counts in ``0..D`` is split into its D binary
   slots, the bias-free layer runs on the slots (folded into the batch), the results are summed and the
   bias is added once (then a Detectron2 conv's non-foldable norm, e.g. GroupNorm, and activation);
   an input that is not a spike count (the encoding conv's image, the real-valued inputs of the final
   predictors) runs as it is, as multiply-accumulates;
3. each spike-driven self-attention computes ``K^T V = sum_{d,e} K_d^T V_e`` and
   ``Q (K^T V) = sum_d Q_d (K^T V)`` from the slots (binary coincidences, then row additions).

Exactness: by linearity the expanded model computes the same function as the integer model in exact
arithmetic. Biases and BN shifts are added once per logical time step, never once per slot (a fixed-slot
device would add ``b / D`` in each of the D slots instead: the same sum). In floating point the sums run
in another order, so outputs agree to ~1e-6 relative (float32); a pre-activation within rounding of a
threshold or of a count's rounding boundary can then flip, which float64 removes (tests run both).
Not expanded (they are not driven by spikes in the integer model either): the encoding conv (analog
image, the paper's MAC layer), the final predictors fed by T-averaged real values, RoIAlign, pooling
and upsampling, which act on the real-valued membrane paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SpikeDrivenSelfAttention
from .neurons import MultiStepILIF, binary_slots, is_spike_count
from .reparam import reparameterize

__all__ = ["expand_spikes", "BinarySlotLayer", "spike_levels_of"]


def spike_levels_of(model: nn.Module) -> int:
    """D of a model: the largest ``spike_levels`` of its neurons (1 when all are binary)."""
    return max([m.spike_levels for m in model.modules() if isinstance(m, MultiStepILIF)], default=1)


class BinarySlotLayer(nn.Module):
    """A weight layer run on the D binary slots of its integer-count input. ``x -> layer(x)``, exactly.

    For counts ``C`` (``(N, C_in, ...)``, integers in ``0..D``): ``y = sum_d layer_nobias(S_d) + b`` with
    ``S_d = [C > d]``, then a Detectron2 conv's ``norm`` / ``activation``. Other inputs run through
    ``layer`` unchanged (``binary_calls`` / ``dense_calls`` count which path ran).
    """

    def __init__(self, layer: nn.Module, levels: int):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            raise TypeError(f"BinarySlotLayer wraps Conv2d, ConvTranspose2d or Linear, not {type(layer).__name__}")
        self.layer = layer
        self.levels = int(levels)
        self.binary_calls = 0
        self.dense_calls = 0

    def _bias_free(self, s: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(s, layer.weight)
        if isinstance(layer, nn.ConvTranspose2d):
            return F.conv_transpose2d(s, layer.weight, None, layer.stride, layer.padding, layer.output_padding,
                                      layer.groups, layer.dilation)
        return layer._conv_forward(s, layer.weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_spike_count(x, self.levels):
            self.dense_calls += 1
            return self.layer(x)
        self.binary_calls += 1
        slots = binary_slots(x, self.levels)  # (D, *x.shape), binary
        y = self._bias_free(slots.flatten(0, 1)).unflatten(0, (self.levels, -1)).sum(0)
        layer = self.layer
        if layer.bias is not None:
            y = y + (layer.bias if isinstance(layer, nn.Linear) else layer.bias.view(1, -1, *([1] * (y.dim() - 2))))
        if getattr(layer, "norm", None) is not None:  # detectron2.layers.Conv2d with a norm BN folding left
            y = layer.norm(y)
        if getattr(layer, "activation", None) is not None:
            y = layer.activation(y)
        return y

    def __getattr__(self, name: str):
        """The wrapped layer's attributes (``weight``, ``out_channels``, ...) stay readable through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def expand_spikes(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Eval-mode copy of ``model`` whose weight layers and attention products run on binary spikes only
    (see the module doc). Works on the classifier, the backbone and the Detectron2 models."""
    levels = spike_levels_of(model)
    out = reparameterize(model, mode="spike", inplace=inplace)
    for name, module in list(out.named_modules()):
        if isinstance(module, SpikeDrivenSelfAttention):
            module.binary_slots = levels
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and not isinstance(module, BinarySlotLayer):
                setattr(module, child_name, BinarySlotLayer(child, levels))
    return out
