"""Meta-SpikeFormer backbone (``Spiking_vit_MetaFormer``) and its variants table.

Stage layout (widths ``C = [C0, C1, C2, C3]``; spiking tensors are ``(T, B, C, H, W)``):

================  ==========================================  ========  ======
feature           layers                                      channels  stride
================  ==========================================  ========  ======
``stem``          encoding conv 7x7 s2 (no LIF) + 1 ConvBlock  C0/2      2
``stage1``        LIF-conv 3x3 s2 + 1 ConvBlock                C0        4
``stage2``        LIF-conv 3x3 s2 + 2 ConvBlocks               C1        8
``stage3``        LIF-conv 3x3 s2 + 6 TransformerBlocks        C2        16
``stage4``        LIF-conv 3x3 s1|s2 + 2 TransformerBlocks     C3        16|32
================  ==========================================  ========  ======

The paper's stage 4 keeps stride 16 (``stage4_stride=1``); detection uses ``stage4_stride=2`` so that
features sit at 4/8/16/32 as FPN anchors and RoI pooling assume (docs/deviations.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterable, Sequence, Tuple

import torch
from torch import nn

from .blocks import PROJ_BN_EPS, ConvBlock, Downsample, SpikeDrivenSelfAttention, TransformerBlock
from .neurons import SPIKING_NEURONS

__all__ = ["VARIANTS", "Variant", "MetaSpikeFormer", "FEATURE_NAMES", "FeatureInfo", "V_THRESHOLD",
           "ORIGINAL_V_THRESHOLD", "NEURON_SETTINGS", "OWN_BUFFERS"]

#: Firing threshold of the backbone's neurons in new models (the attention neurons get half of it). At T=1
#: a neuron fires where its input reaches tau * V_th, i.e. 1 here: ~16 % of BN-normalized inputs at
#: initialization, where the original's 1.0 (input >= 2) fires ~2 % and trains far more slowly from
#: scratch (docs/deviations.md).
V_THRESHOLD = 0.5
#: The original code's threshold; converted original checkpoints carry it.
ORIGINAL_V_THRESHOLD = 1.0
#: Buffers of :class:`MetaSpikeFormer` that store the neuron settings with the weights, so a checkpoint
#: restores the settings it was trained with whatever the model was built with.
NEURON_SETTINGS = ("v_threshold", "attn_proj_bn_eps")
#: Every buffer this project stores that the original's checkpoints do not have (the converter writes them).
OWN_BUFFERS = (*NEURON_SETTINGS, "spike_levels")


@dataclass(frozen=True)
class Variant:
    """One row of the variants table: stage widths and the paper's nominal size."""

    widths: Tuple[int, int, int, int]
    description: str


#: The published widths (and ``tiny``, not in the paper, for quickstarts and tests). The original's
#: factory names ``metaspikformer_8_{384,512,768}`` are named after the stage-3 width C2.
VARIANTS: Dict[str, Variant] = {
    "tiny": Variant((16, 32, 64, 96), "about 1.1M parameters; quickstarts and tests (not in the paper)"),
    "15m": Variant((64, 128, 256, 360), "15.1M; det/seg '15M' configs"),
    "31m": Variant((96, 192, 384, 480), "31.3M; metaspikformer_8_384"),
    "55m": Variant((128, 256, 512, 640), "55.4M; metaspikformer_8_512 (80.0% ImageNet at T=4)"),
    "123m": Variant((192, 384, 768, 960), "123.7M; metaspikformer_8_768 (not in the paper)"),
}

FEATURE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class FeatureInfo:
    channels: int
    stride: int


class Stage(nn.Module):
    """A downsampling layer followed by a list of blocks. ``(T, B, C_in, H, W) -> (T, B, C, H/s, W/s)``."""

    def __init__(self, downsample: Downsample, blocks: Iterable[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class MetaSpikeFormer(nn.Module):
    """Meta-SpikeFormer backbone: image ``(B, 3, H, W)`` -> named stage features ``(T, B, C, H/s, W/s)``.

    Args:
        widths: ``[C0, C1, C2, C3]`` (or pass ``variant``).
        variant: a key of :data:`VARIANTS` (``"15m"``, ``"55m"``, ...); exclusive with ``widths``.
        time_steps: T. The image is repeated T times (direct encoding); the encoding conv runs once.
        in_chans: input channels of the encoding conv.
        num_heads: SDSA heads in stages 3 and 4.
        drop_path_rate: stochastic depth, linearly increasing over the 8 transformer blocks.
        spike_levels: D, the largest spike count a neuron emits per time step: 1 (binary LIF neurons, the
            paper) or D >= 2 (integer I-LIF neurons, SpikeYOLO; :class:`~metaspike_d2.neurons.MultiStepILIF`).
        v_threshold: firing threshold of the backbone's LIF neurons (:data:`V_THRESHOLD`, 0.5; the original's
            1.0); the attention neurons get half of it, as in the original.
        attn_proj_bn_eps: eps of the BNs in each SDSA output projection (0.1; the original's 1e-5 is what
            converted original checkpoints carry; see :class:`~metaspike_d2.blocks.SpikeDrivenSelfAttention`).
        stage4_stride: 1 (the paper, stride 16) or 2 (stride 32, used for detection).
        out_features: which of :data:`FEATURE_NAMES` ``forward`` returns; computing stops after the last.

    A 5-D input ``(T, B, C, H, W)`` (e.g. event frames) is used as is, and then sets T.

    ``v_threshold`` and ``attn_proj_bn_eps`` are stored as the buffers :data:`NEURON_SETTINGS` of the
    state dict: loading weights applies the settings they were trained with (a converted original
    checkpoint: 1.0 and 1e-5), so no flag has to match the weights. ``spike_levels`` is stored too (the
    ``spike_levels`` buffer): it decides the neuron classes, so loading
    weights of another D is an error that names both. D also decides the attention product's scale: the fixed
    0.125 of the original for D = 1, the token- and D-normalized ``0.125 * N_ref / (N D^3)`` with
    N_ref = :data:`~metaspike_d2.blocks.ATTN_REF_TOKENS` for D >= 2 (no further buffer: binary state dicts,
    converted original checkpoints included, are unchanged; see
    :class:`~metaspike_d2.blocks.SpikeDrivenSelfAttention`).
    """

    def __init__(
        self,
        widths: Sequence[int] | None = None,
        *,
        variant: str | None = None,
        time_steps: int = 1,
        in_chans: int = 3,
        num_heads: int = 8,
        drop_path_rate: float = 0.0,
        attn_proj_bn_eps: float = PROJ_BN_EPS,
        v_threshold: float = V_THRESHOLD,
        spike_levels: int = 1,
        stage4_stride: int = 1,
        out_features: Sequence[str] = ("stage4",),
    ):
        super().__init__()
        widths = resolve_widths(widths, variant)
        if stage4_stride not in (1, 2):
            raise ValueError(f"stage4_stride must be 1 (paper) or 2 (detection), got {stage4_stride}")
        unknown = [f for f in out_features if f not in FEATURE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)} must be a non-empty subset of {FEATURE_NAMES}")
        c0, c1, c2, c3 = widths
        self.widths = tuple(widths)
        self.time_steps = time_steps  # validated by the setter
        self.out_features = tuple(f for f in FEATURE_NAMES if f in out_features)

        if int(spike_levels) != spike_levels or spike_levels < 1:
            raise ValueError(f"spike_levels must be an integer >= 1 (1: binary LIF, >= 2: I-LIF), got {spike_levels!r}")

        dpr = torch.linspace(0, drop_path_rate, 8).tolist()
        neurons = dict(v_threshold=v_threshold, spike_levels=int(spike_levels))
        down = partial(Downsample, **neurons)
        conv = partial(ConvBlock, **neurons)
        block = partial(TransformerBlock, num_heads=num_heads, attn_proj_bn_eps=attn_proj_bn_eps, **neurons)
        self.stem = Stage(down(in_chans, c0 // 2, 7, 2, 3, spiking_input=False), [conv(c0 // 2)])
        self.stage1 = Stage(down(c0 // 2, c0), [conv(c0)])
        self.stage2 = Stage(down(c0, c1), [conv(c1), conv(c1)])
        self.stage3 = Stage(down(c1, c2), [block(c2, drop_path=dpr[i]) for i in range(6)])
        self.stage4 = Stage(down(c2, c3, stride=stage4_stride), [block(c3, drop_path=dpr[6 + i]) for i in range(2)])

        self.register_buffer("v_threshold", torch.tensor(float(v_threshold), dtype=torch.float64))
        self.register_buffer("attn_proj_bn_eps", torch.tensor(float(attn_proj_bn_eps), dtype=torch.float64))
        self.register_buffer("spike_levels", torch.tensor(int(spike_levels), dtype=torch.int64))

        strides = (2, 4, 8, 16, 16 * stage4_stride)
        channels = (c0 // 2, c0, c1, c2, c3)
        self.feature_info: Dict[str, FeatureInfo] = {
            name: FeatureInfo(ch, st) for name, ch, st in zip(FEATURE_NAMES, channels, strides)
        }

    def apply_neuron_settings(self) -> None:
        """Give every neuron and SDSA projection the settings held in the :data:`NEURON_SETTINGS` buffers."""
        v = float(self.v_threshold)
        for module in self.modules():
            if isinstance(module, SPIKING_NEURONS):
                module.set_threshold(v)
        for module in self.modules():
            if isinstance(module, SpikeDrivenSelfAttention):
                module.set_thresholds(v, 0.5 * v)
                module.set_proj_bn_eps(float(self.attn_proj_bn_eps))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, built = prefix + "spike_levels", int(self.spike_levels)
        if key in state_dict and int(state_dict[key]) != built:
            error_msgs.append(f"{key}: the weights were trained with spike_levels={int(state_dict[key])}, the model "
                              f"was built with spike_levels={built}; build it with the weights' value "
                              "(spike_levels= / --spike-levels / MODEL.METASPIKE.SPIKE_LEVELS)")
            state_dict[key] = self.spike_levels.clone()  # the model keeps describing its own neurons
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.apply_neuron_settings()  # the settings the loaded weights were trained with

    @property
    def time_steps(self) -> int:
        return self._time_steps

    @time_steps.setter
    def time_steps(self, value: int) -> None:
        if int(value) != value or value < 1:
            raise ValueError(f"time steps T must be an integer >= 1, got {value!r}")
        self._time_steps = int(value)

    @property
    def size_divisibility(self) -> int:
        """Input sides must be multiples of this so that every stage has an integer size."""
        return self.feature_info["stage4"].stride

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() == 4:
            x = self.stem.downsample.encode(x, self.time_steps)
        elif x.dim() == 5:
            x = self.stem.downsample(x)
        else:
            raise ValueError(f"expected an image batch (B, C, H, W) or a sequence (T, B, C, H, W), got {tuple(x.shape)}")
        for block in self.stem.blocks:
            x = block(x)
        outputs: Dict[str, torch.Tensor] = {}
        last = self.out_features[-1]
        for name in FEATURE_NAMES:
            if name != "stem":
                x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
            if name == last:
                break
        return outputs


def resolve_widths(widths: Sequence[int] | None, variant: str | None) -> Tuple[int, int, int, int]:
    """Widths from either an explicit list or a :data:`VARIANTS` key (exactly one must be given)."""
    if (widths is None) == (variant is None):
        raise ValueError("give exactly one of `widths` or `variant`")
    if variant is not None:
        key = variant.lower()
        if key not in VARIANTS:
            raise ValueError(f"unknown Meta-SpikeFormer variant {variant!r}; known: {sorted(VARIANTS)}")
        return VARIANTS[key].widths
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or any(w <= 0 for w in widths) or widths[0] % 2:
        raise ValueError(f"widths must be 4 positive integers with an even C0, got {list(widths)}")
    return widths

