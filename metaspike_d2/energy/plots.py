"""PNG plots: input firing rate per layer (bars coloured by stage) and per-stage spike maps over an image."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np
import torch
from torch import nn

from ..backbone import Stage
from ..neurons import MultiStepLIF
from .counter import LayerCount, stage_of

__all__ = ["plot_firing_rates", "capture_stage_spikes", "plot_spike_maps"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_firing_rates(layers: Sequence[LayerCount], path: str, title: str = "") -> str:
    """Bar chart of each spike-driven layer's input firing rate, in network order, coloured by stage."""
    plt = _pyplot()
    ac = [l for l in layers if l.firing_rate is not None]
    stages = list(dict.fromkeys(l.stage for l in ac))
    cmap = plt.get_cmap("tab10")
    colours = {s: cmap(i % 10) for i, s in enumerate(stages)}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(ac) + 2), 4.5))
    x = np.arange(len(ac))
    ax.bar(x, [l.firing_rate for l in ac], color=[colours[l.stage] for l in ac], width=0.85)
    for s in stages:
        idx = [i for i, l in enumerate(ac) if l.stage == s]
        mean = sum(ac[i].firing_rate * ac[i].flops for i in idx) / max(sum(ac[i].flops for i in idx), 1e-30)
        ax.hlines(mean, idx[0] - 0.4, idx[-1] + 0.4, colors="black", linewidth=1)
        ax.bar(0, 0, color=colours[s], label=f"{s} (FLOPs-weighted {mean:.3f})")
    ax.set_xlim(-1, len(ac))
    ax.set_xlabel("spike-driven layer (network order)")
    ax.set_ylabel("input firing rate")
    ax.set_title(title or "Input firing rate per layer")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def capture_stage_spikes(model: nn.Module, run: Callable[[], object]) -> Dict[str, torch.Tensor]:
    """Spikes of each backbone stage's output, for the first image of whatever ``run()`` executes.

    The stage output is a membrane-like tensor; the spikes shown are those a LIF (threshold 1, as in every
    downsampling layer) emits from it, i.e. what the next stage receives. Returns ``{stage: (T, C, H, W)}``.
    """
    captured: Dict[str, torch.Tensor] = {}
    handles = []
    lif = MultiStepLIF()
    for name, module in model.named_modules():
        if isinstance(module, Stage) and len(module.blocks):
            stage = stage_of(name)

            def hook(_m, _inp, out, stage=stage):
                if torch.is_tensor(out) and out.dim() == 5:
                    captured[stage] = lif(out.detach()[:, :1].float())[:, 0].cpu()

            handles.append(module.blocks[-1].register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return captured


def plot_spike_maps(image: np.ndarray, spikes: Dict[str, torch.Tensor], path: str, title: str = "") -> str:
    """Grid: one row per stage, the image then one spike map per time step (fraction of channels firing
    at each position)."""
    plt = _pyplot()
    stages = list(spikes)
    if not stages:
        raise ValueError("no stage spikes were captured (is this a Meta-SpikeFormer model?)")
    t = max(s.shape[0] for s in spikes.values())
    fig, axes = plt.subplots(len(stages), t + 1, figsize=(2.2 * (t + 1), 2.2 * len(stages)), squeeze=False)
    for r, stage in enumerate(stages):
        s = spikes[stage]
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(f"{stage}\n{tuple(s.shape[1:])}", fontsize=8)
        rates = s.float().mean(1).numpy()  # (T, H, W): fraction of channels firing
        vmax = max(float(rates.max()), 1e-6)  # one colour scale per stage, shared by its time steps
        for step in range(t):
            ax = axes[r, step + 1]
            if step < s.shape[0]:
                ax.imshow(rates[step], cmap="magma", vmin=0.0, vmax=vmax)
                ax.set_title(f"t={step} fr={float(s[step].float().mean()):.3f}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or "Spike maps (fraction of channels firing) per stage and time step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
