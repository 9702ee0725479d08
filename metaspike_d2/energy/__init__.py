"""Energy, firing rates and spike maps of Meta-SpikeFormer models (no Detectron2 imports here).

Python API::

    from metaspike_d2.energy import analyze_classifier, EnergyConstants
    report = analyze_classifier(model, images, time_steps=4)      # images: (N, 3, H, W) tensor
    print(report.format_table()); report.write("out/")

Method and accounting: ``docs/energy.md``.
"""
from .constants import PRESETS, EnergyConstants
from .counter import LayerCount, NeuronCount, SpikeCounter, exact_synops, stage_of
from .report import EnergyReport, Totals, totals_of
from .runner import analyze, analyze_classifier

__all__ = [
    "PRESETS",
    "EnergyConstants",
    "EnergyReport",
    "LayerCount",
    "NeuronCount",
    "SpikeCounter",
    "Totals",
    "analyze",
    "analyze_classifier",
    "exact_synops",
    "stage_of",
    "totals_of",
]
