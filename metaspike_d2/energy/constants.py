"""Energy per operation (pJ) used to turn operation counts into energy.

The presets are spikingjelly's :class:`~spikingjelly.activation_based.op_counter.SimpleEnergyCostConfig`
presets (Horowitz, ISSCC 2014, 45 nm): ``fp32`` E_MAC = 4.6 pJ, E_AC = 0.9 pJ (the pair every
Spike-driven Transformer paper uses); ``fp16`` 1.5 / 0.4 pJ; ``int8`` 0.23 / 0.03 pJ. They are read from
spikingjelly rather than copied, so the two stay in step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from spikingjelly.activation_based.op_counter import SimpleEnergyCostConfig

__all__ = ["EnergyConstants", "PRESETS", "PJ_PER_MJ"]

#: 1 mJ = 1e9 pJ.
PJ_PER_MJ = 1e9


@dataclass(frozen=True)
class EnergyConstants:
    """Energy of one multiply-accumulate (``e_mac_pj``) and one accumulate (``e_ac_pj``), in pJ."""

    e_mac_pj: float = 4.6
    e_ac_pj: float = 0.9
    preset: str = "fp32"

    def __post_init__(self):
        for field in ("e_mac_pj", "e_ac_pj"):
            value = getattr(self, field)
            if not value >= 0:
                raise ValueError(f"{field} must be a non-negative number, got {value!r}")

    @classmethod
    def from_preset(cls, name: str, e_mac_pj: Optional[float] = None,
                    e_ac_pj: Optional[float] = None) -> "EnergyConstants":
        """A preset (``fp32``, ``fp16``, ``int8``), optionally with either constant overridden
        (the preset is then reported as ``custom``)."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown energy preset {name!r}; known: {sorted(PRESETS)}")
        base = PRESETS[key]
        if e_mac_pj is None and e_ac_pj is None:
            return base
        return cls(base.e_mac_pj if e_mac_pj is None else float(e_mac_pj),
                   base.e_ac_pj if e_ac_pj is None else float(e_ac_pj), "custom")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def _from_spikingjelly(name: str) -> EnergyConstants:
    cfg = getattr(SimpleEnergyCostConfig, name)()
    return EnergyConstants(float(cfg.e_mac_pj), float(cfg.e_ac_pj), name)


#: Named presets, 45 nm (Horowitz 2014), via spikingjelly.
PRESETS: Dict[str, EnergyConstants] = {name: _from_spikingjelly(name) for name in ("fp32", "fp16", "int8")}
