"""Building blocks of Meta-SpikeFormer (Yao et al., ICLR 2024, "Spike-Driven Transformer V2").

Shapes: spiking tensors are ``(T, B, C, H, W)``; stateless layers run on ``T*B`` through
:func:`~metaspike_d2.neurons.seq_apply`. Every conv/linear whose input comes from a
:class:`~metaspike_d2.neurons.MultiStepLIF` is driven by binary spikes (by integer counts from a
:class:`~metaspike_d2.neurons.MultiStepILIF` when ``spike_levels`` D >= 2); residual paths add real-valued
("membrane shortcut") values, as in the paper's ``ms`` model.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import drop_path as timm_drop_path
from torch import nn

from .neurons import binary_slots, spiking_neuron, seq_apply

__all__ = [
    "BNAndPad",
    "RepConv",
    "SepConv",
    "ConvBlock",
    "SpikeDrivenSelfAttention",
    "SpikeMLP",
    "TransformerBlock",
    "Downsample",
    "DropPath",
    "SyncBNAndPad",
    "convert_sync_batchnorm",
]


class BNAndPad(nn.BatchNorm2d):
    """BatchNorm2d followed by a 1-pixel border filled with the BN's output for a zero input.

    ``(N, C, H, W) -> (N, C, H + 2p, W + 2p)``. The border value per channel is
    ``beta - mu_running * gamma / sqrt(var_running + eps)`` (running statistics, also in training,
    detached), which is what makes ``1x1 conv -> BN -> 3x3 conv`` foldable into one 3x3 conv.
    """

    def __init__(self, num_features: int, pad: int = 1):
        super().__init__(num_features)
        self.pad = pad

    def pad_values(self) -> torch.Tensor:
        scale = self.weight.detach() / torch.sqrt(self.running_var + self.eps)
        return self.bias.detach() - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.pad == 0:
            return y
        p = self.pad
        y = F.pad(y, [p, p, p, p])
        border = torch.ones_like(y[:1, :1], dtype=torch.bool)
        border[..., p:-p, p:-p] = False
        return torch.where(border, self.pad_values().view(1, -1, 1, 1).to(y.dtype), y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pad={self.pad}"


class SyncBNAndPad(BNAndPad, nn.SyncBatchNorm):
    """:class:`BNAndPad` whose batch statistics are synchronized across processes (multi-GPU training).

    Method resolution puts ``SyncBatchNorm.forward`` under ``BNAndPad.forward``, so the padding is kept
    and ``isinstance(m, BNAndPad)`` still holds (re-parameterization and energy accounting rely on it).
    """


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm -> SyncBatchNorm, keeping :class:`BNAndPad`'s padding (torch's own converter would
    turn it into a plain SyncBatchNorm and silently drop the border). Weights and statistics are kept."""
    if isinstance(module, BNAndPad) and not isinstance(module, SyncBNAndPad):
        new = SyncBNAndPad(module.num_features, pad=module.pad)
        new.eps, new.momentum, new.process_group = module.eps, module.momentum, process_group
        new.load_state_dict(module.state_dict())
        return new.train(module.training).to(module.weight.device)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise conv (``groups = channels``, no bias). ``(N, C, H, W) -> (N, C, H', W')``, contiguous.

    When autograd will run its backward on the CPU, the conv runs in channels_last: oneDNN's NHWC
    depthwise kernels give the same outputs, and their backward is faster than the NCHW one
    (docs/benchmarks.md, Table E). Inference and CUDA keep the NCHW path.
    """

    #: Set to False to time (or compare against) the NCHW path everywhere.
    cpu_channels_last: bool = True

    def __init__(self, channels: int, kernel_size: int, padding: int):
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_backward = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.cpu_channels_last and needs_backward and x.device.type == "cpu":
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return super().forward(x)


class RepConv(nn.Module):
    """Re-parameterizable conv of the paper: ``1x1 conv -> BN-and-pad -> depthwise 3x3 -> 1x1 conv -> BN``.

    ``(N, C_in, H, W) -> (N, C_out, H, W)``. The chain is linear, so at inference it folds into a single
    3x3 conv (+ bias), see :mod:`metaspike_d2.reparam`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pw1 = nn.Conv2d(in_channels, in_channels, 1, bias=False)
        self.bn_pad = BNAndPad(in_channels, pad=1)
        self.dw = DepthwiseConv2d(in_channels, 3, padding=0)
        self.pw2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pw2(self.dw(self.bn_pad(self.pw1(x)))))


class SepConv(nn.Module):
    """Inverted separable conv (MetaFormer/MobileNetV2 style), the token mixer of the conv blocks.

    ``(T, B, C, H, W) -> (T, B, C, H, W)``:
    ``LIF -> 1x1 conv C->2C -> BN -> LIF -> depthwise 7x7 -> 1x1 conv 2C->C -> BN``.
    """

    def __init__(self, dim: int, expansion: int = 2, kernel_size: int = 7, v_threshold: float = 1.0,
                 spike_levels: int = 1):
        super().__init__()
        hidden = expansion * dim
        self.lif1 = spiking_neuron(v_threshold, spike_levels)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.lif2 = spiking_neuron(v_threshold, spike_levels)
        self.dwconv = DepthwiseConv2d(hidden, kernel_size, padding=kernel_size // 2)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = seq_apply(lambda s: self.bn1(self.pwconv1(s)), self.lif1(x))
        return seq_apply(lambda s: self.bn2(self.pwconv2(self.dwconv(s))), self.lif2(x))


class DropPath(nn.Module):
    """Stochastic depth on ``(T, B, ...)`` residual branches: one keep/drop decision per *sample*, shared
    over all time steps (timm's ``drop_path`` draws per leading index, so T is moved out of the way)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        return timm_drop_path(x.transpose(0, 1), self.rate, self.training).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class ConvBlock(nn.Module):
    """The paper's "Conv-based SNN block" (``MS_ConvBlock``). ``(T, B, C, H, W) -> (T, B, C, H, W)``::

        x = x + SepConv(x)
        x = x + BN(Conv3x3_{4C->C}(LIF(BN(Conv3x3_{C->4C}(LIF(x))))))
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, v_threshold: float = 1.0, spike_levels: int = 1):
        super().__init__()
        hidden = mlp_ratio * dim
        self.sepconv = SepConv(dim, v_threshold=v_threshold, spike_levels=spike_levels)
        self.lif1 = spiking_neuron(v_threshold, spike_levels)
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.lif2 = spiking_neuron(v_threshold, spike_levels)
        self.conv2 = nn.Conv2d(hidden, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sepconv(x)
        y = seq_apply(lambda s: self.bn1(self.conv1(s)), self.lif1(x))
        return x + seq_apply(lambda s: self.bn2(self.conv2(s)), self.lif2(y))


#: eps of the BatchNorms of each SDSA output projection in new models (see SpikeDrivenSelfAttention).
PROJ_BN_EPS = 0.1
#: The original code's eps there (nn.BatchNorm default); converted original checkpoints carry it.
ORIGINAL_PROJ_BN_EPS = 1e-5
#: N_ref of the normalized SDSA product of integer models (D >= 2): the original's token count per stage-3/4
#: map at its design point, 224 px ImageNet at stride 16 (14 x 14), where its fixed scale 0.125 was set.
ATTN_REF_TOKENS = 196.0


class SpikeDrivenSelfAttention(nn.Module):
    """Spike-driven self-attention (SDSA, ``MS_Attention_RepConv_qkv_id``). ``(T, B, C, H, W) -> same``.

    ``Q, K, V = LIF(BN(RepConv(LIF(x))))`` are binary; per head (``d_h = C / heads``) the product is
    linear attention evaluated as ``Q (K^T V)`` times a fixed ``scale`` (0.125 for every width, as in the
    original), spiked by a neuron with threshold ``attn_threshold`` (0.5), then projected by ``BN(RepConv(.))``.
    ``v_threshold`` is the threshold of the other four neurons (input, Q, K, V; the original's 1.0).
    ``spike_levels`` D >= 2 makes all five integer I-LIF neurons: Q, K, V are then counts in ``0..D``, and the
    fixed scale gives way to the normalized product described below.

    ``proj_bn_eps`` is the eps of the three BatchNorms of that projection. The original's is 1e-5; here it is
    0.1 (:data:`PROJ_BN_EPS`). The projection normalizes the attention neuron's spikes, which at
    initialization are all zero wherever few tokens meet per head (small inputs, narrow models): a BN over
    a constant input then multiplies its input gradient by ``1/sqrt(eps)`` (316 at 1e-5, 3e7 over the
    three BNs: the from-scratch gradient blow-up), and in eval its running variance has decayed to ~0, so
    the first spikes that do arrive are amplified as much (train loss falls, val accuracy stays at
    chance). At 0.1 each BN's gain is at most ~3. The value travels with the weights (converted original
    checkpoints carry 1e-5), so every load restores the eps a model
    was trained with (:class:`~metaspike_d2.backbone.MetaSpikeFormer` stores it with the weights).

    With integer neurons (D >= 2) the fixed scale gives way to a normalized product::

        y = scale * (N_ref / N) * (Q/D) ((K/D)^T (V/D))  =  scale * N_ref / (N D^3) * Q (K^T V)

    with N = H * W tokens per time step and N_ref = :data:`ATTN_REF_TOKENS`. The fixed 0.125 was set for binary
    Q, K, V at the original's design point (224 px ImageNet: N = 14 x 14 = 196 tokens in stages 3-4);
    ``Q (K^T V)`` sums over the N tokens and over d_h channels, so it grows with N, and with counts in ``0..D``
    by up to D^3. Operands as rates ``count / D`` (the NI-LIF idea of Spike2Former applied to the products)
    and the token sum taken relative to N_ref keep the attention neuron out of saturation at every input size
    (docs/integer_spikes.md). It is one scalar on the integer coincidence count, i.e. a threshold of the
    attention neuron: the products stay spike-driven and :func:`~metaspike_d2.expand_spikes` stays exact. D
    alone decides it (D travels with the weights), so binary models, converted originals included, keep 0.125.
    """

    def __init__(self, dim: int, num_heads: int = 8, scale: float = 0.125, v_threshold: float = 1.0,
                 attn_threshold: float = 0.5, proj_bn_eps: float = PROJ_BN_EPS, spike_levels: int = 1):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"SDSA width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = scale
        neuron = partial(spiking_neuron, v_threshold, spike_levels)
        self.head_lif = neuron()
        self.q_conv, self.q_bn, self.q_lif = RepConv(dim, dim), nn.BatchNorm2d(dim), neuron()
        self.k_conv, self.k_bn, self.k_lif = RepConv(dim, dim), nn.BatchNorm2d(dim), neuron()
        self.v_conv, self.v_bn, self.v_lif = RepConv(dim, dim), nn.BatchNorm2d(dim), neuron()
        self.attn_lif = spiking_neuron(attn_threshold, spike_levels)
        #: 0: the products run on the neurons' counts; D: on their D binary slots (set by expand_spikes)
        self.binary_slots = 0
        self.proj_conv, self.proj_bn = RepConv(dim, dim), nn.BatchNorm2d(dim)
        self.set_proj_bn_eps(proj_bn_eps)
        self.spike_levels = int(spike_levels)
        #: N_ref of the normalized product (integer neurons), 0 for the fixed scale (binary neurons)
        self.ref_tokens = ATTN_REF_TOKENS if self.spike_levels >= 2 else 0.0

    def product_scale(self, tokens: int) -> float:
        """The factor of ``Q (K^T V)`` for ``tokens`` = N tokens per time step (see the class doc)."""
        if not self.ref_tokens:
            return self.scale
        return self.scale * self.ref_tokens / (tokens * self.spike_levels ** 3)

    def set_proj_bn_eps(self, eps: float) -> None:
        for bn in (self.proj_conv.bn_pad, self.proj_conv.bn, self.proj_bn):
            bn.eps = float(eps)

    def set_thresholds(self, v_threshold: float, attn_threshold: float) -> None:
        """Firing thresholds of the input, Q, K, V neurons and of the attention neuron."""
        for lif in (self.head_lif, self.q_lif, self.k_lif, self.v_lif):
            lif.set_threshold(v_threshold)
        self.attn_lif.set_threshold(attn_threshold)

    def _heads(self, s: torch.Tensor) -> torch.Tensor:
        """``(T, B, C, H, W) -> (T, B, heads, N, d_h)`` with head-major channels."""
        t, b, c, h, w = s.shape
        return s.reshape(t, b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c, h, w = x.shape
        x = self.head_lif(x)
        q = self._heads(self.q_lif(seq_apply(lambda s: self.q_bn(self.q_conv(s)), x)))
        k = self._heads(self.k_lif(seq_apply(lambda s: self.k_bn(self.k_conv(s)), x)))
        v = self._heads(self.v_lif(seq_apply(lambda s: self.v_bn(self.v_conv(s)), x)))
        y = self._products(q, k, v) * self.product_scale(h * w)  # (T, B, heads, N, d_h)
        y = y.transpose(-1, -2).reshape(t, b, c, h, w)
        y = self.attn_lif(y)
        return seq_apply(lambda s: self.proj_bn(self.proj_conv(s)), y)

    def _products(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``Q (K^T V)``; with :attr:`binary_slots` D, from the D binary slots of each count (spike-driven:
        ``K^T V = sum_{d,e} K_d^T V_e`` are coincidence counts, ``Q (K^T V) = sum_d Q_d (K^T V)`` adds rows)."""
        if not self.binary_slots:
            return q @ (k.transpose(-2, -1) @ v)
        kb, vb, qb = (binary_slots(x, self.binary_slots) for x in (k, v, q))  # (D, T, B, heads, N, d_h)
        kv = sum(kb[d].transpose(-2, -1) @ vb[e] for d in range(len(kb)) for e in range(len(vb)))
        return sum(qb[d] @ kv for d in range(len(qb)))


class SpikeMLP(nn.Module):
    """Channel MLP of the transformer block (``MS_MLP``). ``(T, B, C, H, W) -> same``:
    ``LIF -> 1x1 conv C->rC (bias) -> BN -> LIF -> 1x1 conv rC->C (bias) -> BN``.

    The original used ``Conv1d`` over flattened tokens; a 1x1 ``Conv2d`` is the same map (the converter
    reshapes the weights), and keeps every layer of the network 4-D.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, v_threshold: float = 1.0, spike_levels: int = 1):
        super().__init__()
        hidden = mlp_ratio * dim
        self.lif1 = spiking_neuron(v_threshold, spike_levels)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.lif2 = spiking_neuron(v_threshold, spike_levels)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = seq_apply(lambda s: self.bn1(self.fc1(s)), self.lif1(x))
        return seq_apply(lambda s: self.bn2(self.fc2(s)), self.lif2(x))


class TransformerBlock(nn.Module):
    """The paper's "Transformer-based SNN block" (``MS_Block``). ``(T, B, C, H, W) -> same``::

        x = x + DropPath(SDSA(x));  x = x + DropPath(MLP(x))

    Drop-path is applied (the original built it but never called it; docs/deviations.md).
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: int = 4, drop_path: float = 0.0,
                 attn_proj_bn_eps: float = PROJ_BN_EPS, v_threshold: float = 1.0, spike_levels: int = 1):
        super().__init__()
        # the attention neuron keeps the original's ratio to the others (0.5 : 1)
        self.attn = SpikeDrivenSelfAttention(dim, num_heads, v_threshold=v_threshold, attn_threshold=0.5 * v_threshold,
                                             proj_bn_eps=attn_proj_bn_eps, spike_levels=spike_levels)
        self.mlp = SpikeMLP(dim, mlp_ratio, v_threshold=v_threshold, spike_levels=spike_levels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class Downsample(nn.Module):
    """Downsampling layer (``MS_DownSampling``): ``[LIF] -> conv (bias) -> BN``.

    ``(T, B, C_in, H, W) -> (T, B, C_out, H', W')``. The first layer of the network has no LIF: it is the
    analog *encoding* layer, fed by the image (its multiply-adds are the only MACs in the paper's energy
    accounting). Because its T input copies are identical, the encoding layer accepts the image as
    ``(B, C, H, W)`` and computes conv + BN once, broadcasting over T (same output and BN statistics).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2,
                 padding: int = 1, spiking_input: bool = True, v_threshold: float = 1.0, spike_levels: int = 1):
        super().__init__()
        self.lif = spiking_neuron(v_threshold, spike_levels) if spiking_input else None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lif is not None:
            x = self.lif(x)
        return seq_apply(lambda s: self.bn(self.conv(s)), x)

    def encode(self, image: torch.Tensor, time_steps: int) -> torch.Tensor:
        """Direct encoding of an analog image: ``(B, C, H, W) -> (T, B, C_out, H', W')``.

        Equal to ``forward(image repeated T times)``, but the conv runs once. In training the BN still
        sees the T copies, so its batch statistics and running-statistics update are exactly the
        original's; in eval the BN also runs once and the result is broadcast over T (a view).
        """
        if self.lif is not None:
            raise RuntimeError("encode() is only defined for the analog encoding layer (no input LIF)")
        if time_steps < 1:
            raise ValueError(f"time steps T must be >= 1, got {time_steps}")
        y = self.conv(image)
        if self.training:
            y = y.unsqueeze(0).expand(time_steps, *y.shape).flatten(0, 1)
            return self.bn(y).reshape(time_steps, -1, *y.shape[1:])
        y = self.bn(y)
        return y.unsqueeze(0).expand(time_steps, *y.shape)
