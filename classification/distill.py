"""DeiT-style knowledge distillation (the original's T=1 -> T=4 fine-tune): the loss and the teacher.

timm has no distillation loss, so :class:`DistillationLoss` is written here (DeiT's, 30 lines). The teacher
is built with timm *without* downloading anything and loaded from a local file through the project's one
safe loader.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from metaspike_d2.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_state_dict_strict

__all__ = ["DistillationLoss", "DEFAULT_TEACHER", "build_teacher", "load_teacher_state_dict"]

logger = logging.getLogger(__name__)

#: timm's name for the original's teacher (SAIL ``caformer_b36_in21ft1k.pth``).
DEFAULT_TEACHER = "caformer_b36.sail_in22k_ft_in1k"


class DistillationLoss(nn.Module):
    """DeiT's distillation loss.

    ``outputs`` is ``(logits, kd_logits)`` from a ``kd=True`` student in training (or plain logits, then only
    the base loss applies). ``hard``: ``(1-alpha) * base(logits, y) + alpha * CE(kd_logits, argmax teacher(x))``;
    ``soft``: the second term is ``KL(log_softmax(kd/tau) || log_softmax(teacher/tau)) * tau^2`` (sum over
    classes, mean over the batch, as DeiT). ``none``: ``base(logits, y)``.
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module], distillation_type: str = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ("none", "soft", "hard"):
            raise ValueError(f"distillation_type must be none, soft or hard, got {distillation_type!r}")
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher model")
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        kd_logits = None
        if isinstance(outputs, (tuple, list)):
            outputs, kd_logits = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        if kd_logits is None:
            raise ValueError("distillation needs (logits, kd_logits): build the student with kd=True (--kd)")
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if self.distillation_type == "soft":
            t = self.tau
            kd_loss = F.kl_div(F.log_softmax(kd_logits.float() / t, dim=1),
                               F.log_softmax(teacher_logits.float() / t, dim=1),
                               reduction="sum", log_target=True) * (t * t) / kd_logits.numel()
        else:
            kd_loss = F.cross_entropy(kd_logits, teacher_logits.argmax(dim=1))
        return base_loss * (1 - self.alpha) + kd_loss * self.alpha


def load_teacher_state_dict(path: str, model: nn.Module) -> dict:
    """A teacher state dict from a local ``.pth``/``.bin`` (safe loader) or ``.safetensors`` file, in timm's
    layout; the original SAIL MetaFormer layout is remapped with timm's own ``checkpoint_filter_fn``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"--teacher-weights {path}: file not found. The teacher's weights cannot be downloaded here; save "
            f"them to a local file first (e.g. the SAIL 'caformer_b36_in21ft1k.pth', or the timm/Hugging Face "
            f"'{DEFAULT_TEACHER}' model.safetensors / pytorch_model.bin) and pass its path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state_dict = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file: {e}") from e
    else:
        state_dict = extract_state_dict(load_checkpoint_file(p), str(p))
    module = type(model).__module__
    if module.endswith("metaformer"):  # the SAIL release uses the original MetaFormer key names
        from timm.models.metaformer import checkpoint_filter_fn
        state_dict = checkpoint_filter_fn(state_dict, model)
    return state_dict


def build_teacher(name: str, weights: Optional[str], num_classes: int, device: torch.device) -> nn.Module:
    """timm ``name`` without pretrained download, loaded strictly from ``weights``; eval mode, no grads."""
    if not weights:
        raise ValueError(f"distillation needs the teacher's weights: pass --teacher-weights FILE for {name} "
                         "(no hub access; see classification/README.md)")
    if not Path(weights).expanduser().is_file():  # fail before building a large model
        load_teacher_state_dict(weights, nn.Identity())
    teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
    state_dict = load_teacher_state_dict(weights, teacher)
    report = load_state_dict_strict(teacher, state_dict, source=f"teacher {name} from {weights}")
    logger.info("%s", report.describe())
    teacher.requires_grad_(False)
    return teacher.to(device).eval()
