"""Energy report: totals from per-layer counts, stdout table, ``energy.json`` and ``layers.csv``.

Energy per image (Spike-driven Transformer accounting, ``docs/energy.md``)::

    E = E_MAC * sum(macs over "mac" layers) + E_AC * sum(sops over "ac" layers)
      = E_MAC * FLOPs(encoding conv) + E_AC * T * sum(firing rate * FLOPs)      (paper accounting)

``ann_equivalent_energy_mj`` is the same architecture run as a non-spiking network (one pass, every layer a
MAC): ``E_MAC * sum(flops)`` over the same layers.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .constants import PJ_PER_MJ, EnergyConstants
from .counter import LayerCount, NeuronCount, SpikeCounter

__all__ = ["EnergyReport", "Totals", "layer_to_dict", "totals_of"]


@dataclass
class Totals:
    energy_mj_per_image: float
    mac_energy_mj: float
    ac_energy_mj: float
    ann_equivalent_energy_mj: float
    total_flops: float
    total_macs: float
    total_sops: float
    ann_flops: float


def totals_of(layers: List[LayerCount], constants: EnergyConstants,
              ann_layers: Optional[List[LayerCount]] = None) -> Totals:
    """Totals of ``layers``; the ANN equivalent is ``E_MAC * sum(flops)`` over ``ann_layers`` (default
    ``layers``): the report passes the naive (as-executed) layers, i.e. the same network run once as an ANN
    with its separable and RepConv convs as they are (folding them would only add multiplications)."""
    macs = sum(l.macs for l in layers)
    sops = sum(l.sops for l in layers)
    flops = sum(l.flops for l in layers)
    ann_flops = sum(l.flops for l in (layers if ann_layers is None else ann_layers))
    mac_mj = constants.e_mac_pj * macs / PJ_PER_MJ
    ac_mj = constants.e_ac_pj * sops / PJ_PER_MJ
    return Totals(mac_mj + ac_mj, mac_mj, ac_mj, constants.e_mac_pj * ann_flops / PJ_PER_MJ, flops, macs, sops,
                  ann_flops)


def layer_to_dict(layer: LayerCount, constants: EnergyConstants) -> Dict[str, object]:
    return {
        "name": layer.name, "stage": layer.stage, "op": layer.op, "kind": layer.kind,
        "flops": layer.flops, "time_steps_run": layer.time_steps_run,
        "firing_rate": layer.firing_rate, "firing_rate_per_step": layer.firing_rate_per_step,
        "sops": layer.sops, "macs": layer.macs,
        "energy_mj": layer.energy_pj(constants.e_mac_pj, constants.e_ac_pj) / PJ_PER_MJ,
    }


@dataclass
class EnergyReport:
    """Everything the tool writes. ``layers`` use the paper accounting; ``naive_layers`` the operator-level one."""

    model: str
    time_steps: int
    num_images: int
    constants: EnergyConstants
    layers: List[LayerCount]
    naive_layers: List[LayerCount]
    neurons: List[NeuronCount] = field(default_factory=list)
    stage_firing_rates: Dict[str, float] = field(default_factory=dict)
    input_size: Optional[List[int]] = None
    dataset: str = ""

    @classmethod
    def from_counter(cls, counter: SpikeCounter, constants: EnergyConstants, model: str = "",
                     input_size: Optional[List[int]] = None, dataset: str = "") -> "EnergyReport":
        return cls(model, counter.time_steps, counter.num_images, constants, counter.layers("paper"),
                   counter.layers("naive"), counter.neurons(), counter.stage_firing_rates(), input_size, dataset)

    @property
    def spike_levels(self) -> int:
        """D of the counted model's neurons (1: binary)."""
        return max((n.spike_levels for n in self.neurons), default=1)

    @property
    def totals(self) -> Totals:
        return totals_of(self.layers, self.constants, self.naive_layers)

    @property
    def naive_totals(self) -> Totals:
        return totals_of(self.naive_layers, self.constants, self.naive_layers)

    def to_dict(self) -> Dict[str, object]:
        t, nt = self.totals, self.naive_totals
        return {
            "model": self.model,
            "dataset": self.dataset,
            "input_size": self.input_size,
            "time_steps": self.time_steps,
            "spike_levels": self.spike_levels,
            "num_images": self.num_images,
            "accounting": "paper (after re-parameterization)",
            "energy_mj_per_image": t.energy_mj_per_image,
            "mac_energy_mj": t.mac_energy_mj,
            "ac_energy_mj": t.ac_energy_mj,
            "ann_equivalent_energy_mj": t.ann_equivalent_energy_mj,
            "total_flops": t.total_flops,
            "total_macs": t.total_macs,
            "total_sops": t.total_sops,
            "ann_flops": t.ann_flops,
            "constants": self.constants.to_dict(),
            "stage_firing_rates": self.stage_firing_rates,
            "layers": [layer_to_dict(l, self.constants) for l in self.layers],
            "naive": {
                "accounting": "naive (operator level, as executed)",
                "energy_mj_per_image": nt.energy_mj_per_image,
                "mac_energy_mj": nt.mac_energy_mj,
                "ac_energy_mj": nt.ac_energy_mj,
                "ann_equivalent_energy_mj": nt.ann_equivalent_energy_mj,
                "total_flops": nt.total_flops,
                "total_macs": nt.total_macs,
                "total_sops": nt.total_sops,
                "layers": [layer_to_dict(l, self.constants) for l in self.naive_layers],
            },
            "neurons": [
                {"name": n.name, "stage": n.stage, "firing_rate": n.firing_rate,
                 "firing_rate_per_step": n.firing_rate_per_step, "spike_levels": n.spike_levels,
                 "binary_rate": n.binary_rate} for n in self.neurons
            ],
        }

    # ------------------------------------------------------------------ files
    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def write_csv(self, path: str) -> None:
        """One row per layer of both accountings (column ``accounting``)."""
        fields = ["accounting", "name", "stage", "op", "kind", "flops", "time_steps_run", "firing_rate",
                  "firing_rate_per_step", "sops", "macs", "energy_mj"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for accounting, layers in (("paper", self.layers), ("naive", self.naive_layers)):
                for layer in layers:
                    row = layer_to_dict(layer, self.constants)
                    row["accounting"] = accounting
                    row["firing_rate"] = "" if row["firing_rate"] is None else row["firing_rate"]
                    per_step = row["firing_rate_per_step"]
                    row["firing_rate_per_step"] = "" if per_step is None else " ".join(f"{v:.6g}" for v in per_step)
                    w.writerow(row)

    def write(self, output_dir: str) -> Dict[str, str]:
        os.makedirs(output_dir, exist_ok=True)
        paths = {"json": os.path.join(output_dir, "energy.json"), "csv": os.path.join(output_dir, "layers.csv")}
        self.write_json(paths["json"])
        self.write_csv(paths["csv"])
        return paths

    # ------------------------------------------------------------------ text
    def format_table(self, max_rows: Optional[int] = None) -> str:
        """Per-layer table (paper accounting), stage summary and totals of both accountings."""
        c = self.constants
        lines = [f"{'layer':<52} {'op':<30} {'kind':<4} {'FLOPs(M)':>10} {'fr':>6} {'SOPs(M)':>10} {'E(mJ)':>9}"]
        lines.append("-" * len(lines[0]))
        shown = self.layers if max_rows is None else self.layers[:max_rows]
        for l in shown:
            fr = "-" if l.firing_rate is None else f"{l.firing_rate:.3f}"
            name = l.name if len(l.name) <= 52 else "~" + l.name[-51:]
            lines.append(f"{name:<52} {l.op[:30]:<30} {l.kind:<4} {l.flops / 1e6:>10.2f} {fr:>6} "
                         f"{l.sops / 1e6:>10.2f} {l.energy_pj(c.e_mac_pj, c.e_ac_pj) / PJ_PER_MJ:>9.4f}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers in layers.csv")
        lines.append("")
        lines.append(f"{'stage':<18} {'fr(all)':>8} {'FLOPs(G)':>10} {'SOPs(G)':>9} {'energy(mJ)':>12}")
        for stage in dict.fromkeys(l.stage for l in self.layers):
            ls = [l for l in self.layers if l.stage == stage]
            e = sum(l.energy_pj(c.e_mac_pj, c.e_ac_pj) for l in ls) / PJ_PER_MJ
            fr = self.stage_firing_rates.get(stage)
            frs = "-" if fr is None else f"{fr:.4f}"
            lines.append(f"{stage:<18} {frs:>8} {sum(l.flops for l in ls) / 1e9:>10.3f} "
                         f"{sum(l.sops for l in ls) / 1e9:>9.3f} {e:>12.4f}")
        t, nt = self.totals, self.naive_totals
        lines.append("")
        levels = self.spike_levels
        if levels > 1:
            counts = [n for n in self.neurons if n.spike_levels > 1]
            mean = sum(n.firing_rate * n.numel_per_image for n in counts) / max(sum(n.numel_per_image for n in counts), 1)
            lines.append(f"integer spikes (D={levels}): mean count per neuron and step {mean:.4f}; binary firing rate "
                         f"of the expanded model (D slots per step) {mean / levels:.4f}; 'fr' above is the mean count")
        lines.append(f"model {self.model}  T={self.time_steps}  D={levels}  images={self.num_images}  input={self.input_size}  "
                     f"E_MAC={c.e_mac_pj} pJ  E_AC={c.e_ac_pj} pJ ({c.preset})")
        for label, tot in (("paper (re-parameterized)", t), ("naive (operator level)", nt)):
            lines.append(f"{label:<26} energy/image {tot.energy_mj_per_image:9.4f} mJ = MAC {tot.mac_energy_mj:.4f} "
                         f"+ AC {tot.ac_energy_mj:.4f}   (FLOPs {tot.total_flops / 1e9:.3f} G, "
                         f"SOPs {tot.total_sops / 1e9:.3f} G, MACs {tot.total_macs / 1e9:.3f} G)")
        lines.append(f"{'ANN equivalent':<26} energy/image {t.ann_equivalent_energy_mj:9.4f} mJ "
                     f"(the naive layers run once as an ANN, all MAC: {t.ann_flops / 1e9:.3f} GFLOPs)")
        return "\n".join(lines)
