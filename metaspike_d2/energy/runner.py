"""Run a model over inputs with a :class:`SpikeCounter` attached and build an :class:`EnergyReport`."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .constants import PRESETS, EnergyConstants
from .counter import SpikeCounter
from .report import EnergyReport

__all__ = ["analyze", "analyze_classifier", "calibrate_batchnorm"]


def analyze(model: nn.Module, batches: Iterable[Tuple[Callable[[], object], int]], time_steps: int,
            constants: Optional[EnergyConstants] = None, model_name: str = "",
            input_size: Optional[List[int]] = None, dataset: str = "",
            progress: Optional[Callable[[int], None]] = None) -> EnergyReport:
    """Count every ``run()`` of ``batches`` (pairs ``(run, number_of_images)``) in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with SpikeCounter(model, time_steps) as counter:
            for run, n in batches:
                with counter.count(batch_size=n):
                    run()
                if progress is not None:
                    progress(counter.num_images)
    finally:
        model.train(was_training)
    if counter.num_images == 0:
        raise ValueError("no images were run")
    return EnergyReport.from_counter(counter, constants or PRESETS["fp32"], model=model_name,
                                     input_size=input_size, dataset=dataset)


def analyze_classifier(model: nn.Module, images: torch.Tensor, time_steps: Optional[int] = None,
                       batch_size: int = 1, constants: Optional[EnergyConstants] = None, model_name: str = "",
                       dataset: str = "", progress: Optional[Callable[[int], None]] = None) -> EnergyReport:
    """Energy report of an image classifier / backbone over ``images`` ``(N, 3, H, W)`` (preprocessed).

    ``time_steps`` sets ``model.time_steps`` when given (Meta-SpikeFormer models); else it is read from it.
    """
    if time_steps is not None:
        model.time_steps = int(time_steps)
    t = int(getattr(model, "time_steps"))
    chunks = list(torch.split(images, max(1, int(batch_size))))
    batches = [((lambda x=x: model(x)), int(x.shape[0])) for x in chunks]
    return analyze(model, batches, t, constants, model_name, list(images.shape[1:]), dataset, progress)


def calibrate_batchnorm(model: nn.Module, runs: Iterable[Callable[[], object]]) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``runs`` (train-mode
    forward passes without gradients); returns the number of BN layers reset.

    For *untrained* (randomly initialised) models only: their fresh BNs (mean 0, var 1) leave the conv
    outputs at the small scale of the initialisation, so almost no neuron reaches threshold and the firing
    rates (and energy) are meaningless. After calibration every BN output is normalised on real images,
    which gives firing rates of the order of a trained network's (still not the paper's). Never use it on
    trained weights: it would change the model.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for run in runs:
                run()
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(bns)
