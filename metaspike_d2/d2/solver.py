"""Optimizer and LR schedule of the detection/segmentation configs.

* ``SOLVER.OPTIMIZER: "ADAMW"``: AdamW (``SOLVER.BETAS``, ``SOLVER.WEIGHT_DECAY``) with **no** weight decay
  on normalization parameters and biases; ``"SGD"`` is Detectron2's default optimizer.
* ``SOLVER.LR_SCHEDULER_NAME: "WarmupLinearLR"``: linear warm-up, then a linear decay from 1 to
  ``SOLVER.LINEAR_END_FACTOR`` at ``MAX_ITER`` (the original's ``LinearLR``); every Detectron2 schedule
  name (``WarmupMultiStepLR`` for step decay, ``WarmupCosineLR``, ...) works as usual.
* ``"WarmupPolyLR"`` (semantic segmentation): Detectron2's DeepLab poly schedule (``SOLVER.POLY_LR_POWER``,
  ``SOLVER.POLY_LR_CONSTANT_ENDING``); ``SOLVER.LR_MULTIPLIERS`` scales the lr of matching parameters (ADAMW).

Gradient clipping (``SOLVER.CLIP_GRADIENTS``) applies to both optimizers.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from detectron2.projects.deeplab import build_lr_scheduler as deeplab_build_lr_scheduler
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from fvcore.common.param_scheduler import LinearParamScheduler

__all__ = ["build_optimizer", "build_lr_scheduler", "lr_multiplier_func"]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        return d2_build_optimizer(cfg, model)
    if name != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW', got {cfg.SOLVER.OPTIMIZER!r}")
    params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                          weight_decay_norm=0.0, weight_decay_bias=0.0,
                                          lr_factor_func=lr_multiplier_func(cfg.SOLVER.LR_MULTIPLIERS))
    # fused=True: torch's single-kernel AdamW (CPU and CUDA), the same update as the default for-loop
    # implementation in less time (docs/benchmarks.md, Table E).
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        fused=True)


def lr_multiplier_func(multipliers) -> Optional[Callable[[str], float]]:
    """``SOLVER.LR_MULTIPLIERS`` (``[[substring, factor], ...]``) -> ``f(parameter name) -> factor`` (first
    matching substring; 1.0 when none matches), or ``None`` when the list is empty."""
    pairs = [(str(sub), float(factor)) for sub, factor in multipliers]
    if not pairs:
        return None

    def factor_of(name: str) -> float:
        return next((factor for sub, factor in pairs if sub in name), 1.0)

    return factor_of


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":  # semantic segmentation (DeepLab project's schedule)
        return deeplab_build_lr_scheduler(cfg, optimizer)
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupLinearLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    sched = WarmupParamScheduler(
        LinearParamScheduler(1.0, cfg.SOLVER.LINEAR_END_FACTOR),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
        cfg.SOLVER.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
