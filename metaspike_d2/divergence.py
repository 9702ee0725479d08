"""Loud divergence: the error both training scripts raise when most optimizer steps had to be skipped.

A step whose total gradient norm is non-finite (inf / NaN) is skipped by both training loops (no optimizer
update); a few such steps are survivable, a run of them means training has diverged. This module is shared by
``classification/engine.py`` and ``metaspike_d2/d2/engine.py`` and imports only torch and the standard library
(no Detectron2). The remedies are explained in docs/troubleshooting.md, section "Training diverged".
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch

__all__ = ["TrainingDivergedError", "TROUBLESHOOTING", "total_grad_norm", "first_nonfinite_grad",
           "describe_bad_gradients", "unwrap_model", "diverged_message"]

TROUBLESHOOTING = "docs/troubleshooting.md#training-diverged"


class TrainingDivergedError(RuntimeError):
    """Training stopped because the gradients (or the loss) were non-finite in too many steps.

    ``skipped``: the skipped steps that stopped training (of the epoch for classification, in a row for
    Detectron2); ``total``: the epoch's optimizer steps (classification) or all skipped iterations so far
    (Detectron2); ``first_param``: the first parameter whose gradient had a non-finite value (``None`` when
    only the norm overflowed).
    """

    def __init__(self, message: str, *, skipped: int = 0, total: int = 0, first_param: Optional[str] = None):
        super().__init__(message)
        self.skipped, self.total, self.first_param = skipped, total, first_param


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, so parameter names carry no ``module.`` prefix."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return model.module
    return model


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The 2-norm over all gradients (one fused reduction, one host sync); 0.0 when no parameter has one."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return torch.nn.utils.get_total_norm(grads).item()


def _named_grads(model: torch.nn.Module):
    return [(n, p.grad) for n, p in unwrap_model(model).named_parameters() if p.grad is not None and p.grad.numel()]


def first_nonfinite_grad(model: torch.nn.Module) -> Optional[str]:
    """Name of the first parameter (``named_parameters()`` order, DDP prefix removed) whose gradient holds
    an inf or NaN; ``None`` if there is none. One host sync; only called on steps already known to be bad."""
    named = _named_grads(model)
    if not named:
        return None
    finite = torch.stack([torch.isfinite(g).all().to(named[0][1].device) for _, g in named]).tolist()
    return next((n for (n, _), ok in zip(named, finite) if not ok), None)


def describe_bad_gradients(model: torch.nn.Module) -> Tuple[Optional[str], str]:
    """``(first_param, description)`` for a step whose total gradient norm is non-finite: the first parameter
    with a non-finite gradient, or (``None``) when every gradient is finite but their norm overflowed, the
    parameter with the largest gradient entry. Only called on bad steps (a pass over the gradients)."""
    first = first_nonfinite_grad(model)
    if first is not None:
        return first, f"the first parameter with a non-finite gradient was '{first}'"
    named = _named_grads(model)
    if not named:
        return None, "no parameter had a gradient"
    largest = torch.stack([g.detach().abs().max().float().to(named[0][1].device) for _, g in named]).tolist()
    i = max(range(len(named)), key=largest.__getitem__)
    return None, (f"every gradient entry was finite, but their total norm overflowed (the largest entry, "
                  f"{largest[i]:.3g}, was in the gradient of '{named[i][0]}')")


def diverged_message(what: str, description: str, remedies: Sequence[str]) -> str:
    """One message: ``what`` (how many steps were skipped), ``description`` (of the gradients, from
    :func:`describe_bad_gradients`) and the remedies with the troubleshooting link."""
    lines = [f"training diverged: {what}; {description}.", "Remedies:"]
    lines += [f"  - {r}" for r in remedies]
    lines.append(f"  - see {TROUBLESHOOTING}")
    return "\n".join(lines)
