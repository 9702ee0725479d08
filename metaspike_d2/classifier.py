"""Meta-SpikeFormer image classifier and its timm registration.

``timm.create_model("metaspikeformer_55m", num_classes=1000, T=4, kd=True, spike_levels=1)`` (``spike_levels=4``:
integer I-LIF neurons); the original's factory
names ``metaspikformer_8_{384,512,768}`` are registered as aliases. Our checkpoints
(``{"model": state_dict, ...}``) load with ``checkpoint_path=FILE`` (timm loads with ``weights_only=True``
and ``strict=True``); the original's checkpoints go through ``tools/convert_original.py`` first.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .backbone import V_THRESHOLD, VARIANTS, MetaSpikeFormer
from .blocks import PROJ_BN_EPS
from .neurons import mean_over_time, spiking_neuron

__all__ = ["MetaSpikeFormerClassifier", "MODEL_NAMES", "ALIASES"]


class MetaSpikeFormerClassifier(MetaSpikeFormer):
    """Backbone + spiking classification head. Image ``(B, 3, H, W)`` -> logits ``(B, num_classes)``.

    Head: global average pool of the stage-4 membrane ``(T, B, C3, H, W) -> (T, B, C3)`` -> LIF -> Linear,
    logits averaged over T. With ``kd=True`` a second head ``head_kd`` (DeiT-style distillation token
    head, fed by the same spikes) exists: training returns ``(logits, kd_logits)``, eval their mean.

    ``head_input="membrane"`` feeds the main head the pooled membrane instead of the spikes, as the
    original code did before its commit d95ad13; ``"spikes"`` is the released form.
    """

    def __init__(
        self,
        widths: Sequence[int] | None = None,
        *,
        variant: str | None = None,
        num_classes: int = 1000,
        time_steps: int = 1,
        kd: bool = False,
        head_input: str = "spikes",
        in_chans: int = 3,
        num_heads: int = 8,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_proj_bn_eps: float = PROJ_BN_EPS,
        v_threshold: float = V_THRESHOLD,
        spike_levels: int = 1,
    ):
        super().__init__(widths, variant=variant, time_steps=time_steps, in_chans=in_chans,
                         num_heads=num_heads, drop_path_rate=drop_path_rate, attn_proj_bn_eps=attn_proj_bn_eps,
                         v_threshold=v_threshold, spike_levels=spike_levels, out_features=("stage4",))
        if head_input not in ("spikes", "membrane"):
            raise ValueError(f"head_input must be 'spikes' or 'membrane', got {head_input!r}")
        self.head_input = head_input
        self.num_features = self.widths[3]
        self.lif = spiking_neuron(v_threshold, spike_levels)
        self.head_drop = nn.Dropout(drop_rate)
        self.kd = kd
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """(Re)create the head(s) for ``num_classes`` (0: no head, ``forward`` returns pooled features)."""
        self.num_classes = num_classes
        make = lambda: nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()  # noqa: E731
        self.head = make()
        self.head_kd = make() if self.kd else None
        for head in (self.head, self.head_kd):
            if isinstance(head, nn.Linear):
                nn.init.trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (T, B, C3, H/16, W/16)`` stage-4 membrane."""
        return super().forward(x)["stage4"]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        pooled = x.flatten(3).mean(3)  # (T, B, C3)
        spikes = self.head_drop(self.lif(pooled))
        if pre_logits:
            return mean_over_time(spikes)
        logits = mean_over_time(self.head(spikes if self.head_input == "spikes" else pooled))
        if self.head_kd is None:
            return logits
        kd_logits = mean_over_time(self.head_kd(spikes))
        return (logits, kd_logits) if self.training else (logits + kd_logits) / 2

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.downsample.conv", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


#: timm model name -> variant key of :data:`~metaspike_d2.backbone.VARIANTS`.
MODEL_NAMES = {f"metaspikeformer_{key}": key for key in VARIANTS}
#: The original's factory names (suffix = stage-3 width) -> our model names.
ALIASES = {
    "metaspikformer_8_384": "metaspikeformer_31m",
    "metaspikformer_8_512": "metaspikeformer_55m",
    "metaspikformer_8_768": "metaspikeformer_123m",
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in (*MODEL_NAMES, *ALIASES)})


def _create(model_name: str, variant: str, pretrained: bool = False, **kwargs) -> MetaSpikeFormerClassifier:
    if pretrained:
        raise ValueError(
            f"{model_name}: no weights can be downloaded; pass checkpoint_path=FILE to timm.create_model "
            "(convert the original's checkpoints with tools/convert_original.py)")
    if "T" in kwargs:  # the paper's name for the number of time steps
        kwargs["time_steps"] = kwargs.pop("T")
    return build_model_with_cfg(partial(MetaSpikeFormerClassifier, variant=variant), model_name, pretrained=False,
                                **kwargs)


def _register(model_name: str, variant: str):
    def factory(pretrained: bool = False, **kwargs) -> MetaSpikeFormerClassifier:
        return _create(model_name, variant, pretrained, **kwargs)

    factory.__name__ = model_name
    factory.__qualname__ = model_name
    factory.__doc__ = f"Meta-SpikeFormer {variant} (widths {list(VARIANTS[variant].widths)}): {VARIANTS[variant].description}."
    factory.__module__ = __name__
    return register_model(factory)


for _name, _variant in MODEL_NAMES.items():
    globals()[_name] = _register(_name, _variant)
for _alias, _target in ALIASES.items():
    globals()[_alias] = _register(_alias, MODEL_NAMES[_target])
