"""One training epoch and one evaluation pass (DDP-aware, AMP, gradient accumulation, EMA, progress bar)."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
from timm.utils import accuracy
from tqdm import tqdm

from metaspike_d2.divergence import (TROUBLESHOOTING, TrainingDivergedError, describe_bad_gradients,
                                     diverged_message, total_grad_norm)

__all__ = ["train_one_epoch", "evaluate", "is_main_process", "all_reduce_sum", "LossTrendMonitor",
           "TrainingDivergedError"]

logger = logging.getLogger(__name__)

REMEDIES = ("a lower learning rate (--lr / --blr; a longer --warmup-epochs)",
            "gradient clipping: --clip-grad (e.g. 1.0)",
            "check the input normalization (mean / std of the images; a constant or unnormalized input)")


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(values, device) -> list:
    """Sum a list of numbers over all processes (identity without DDP)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, device, epoch: int, *,
                    autocast_ctx, accum_iter: int = 1, clip_grad: Optional[float] = None, mixup_fn=None,
                    model_ema=None, max_steps: Optional[int] = None, writer=None, log_every: int = 20) -> Dict[str, float]:
    """Train one epoch; the scheduler is stepped per optimizer update (``step_update``). Returns the mean loss
    over all processes and samples, the last lr, and the throughput."""
    model.train()
    updates_per_epoch = math.ceil(len(loader) / accum_iter)
    num_updates = epoch * updates_per_epoch
    loss_sum, n_seen, bad_steps, opt_steps, start = 0.0, 0, 0, 0, time.time()
    first_bad_param: Optional[str] = None  # the first parameter with a non-finite gradient in this epoch
    bad_grads = ""  # where the first skipped step was and what its gradients looked like
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True,
               file=sys.stderr, mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = float("nan")
    for step, (images, targets) in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        last_micro = (step + 1) % accum_iter == 0 or step + 1 == len(loader)
        # DDP: all-reduce gradients only on the micro-step that updates
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast_ctx():
                outputs = model(images)
                # the loss in float32 (CPU bf16 autocast would otherwise leave the logits in bf16)
                outputs = tuple(o.float() for o in outputs) if isinstance(outputs, (tuple, list)) else outputs.float()
                loss = criterion(images, outputs, targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {step}; stopping")
            scaler.scale(loss / accum_iter).backward()
        if last_micro:
            opt_steps += 1
            scaler.unscale_(optimizer)
            # the total norm is also a health check: a non-finite norm without a GradScaler (bf16 / fp32) means
            # the step would poison the weights (or be silently zeroed: timm's LAMB)
            grad_norm = total_grad_norm(model.parameters())
            finite = math.isfinite(grad_norm)
            if clip_grad and finite:  # (clipping by a non-finite norm would write NaNs)
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip_grad, grad_norm)
            # with a GradScaler (CUDA fp16) an overflow is normal early on: scaler.step skips it and lowers the scale
            skip = not finite and not scaler.is_enabled()
            if skip:
                bad_steps += 1
                if bad_steps == 1:
                    first_bad_param, desc = describe_bad_gradients(model)
                    bad_grads = f"at step {step}, the first skipped one, {desc}"
                    logger.warning("epoch %d step %d: gradient norm %s (%s); the optimizer step is skipped. If more "
                                   "than half of an epoch's steps are skipped, training stops (%s; for a small "
                                   "model at small inputs also classification/README.md, 'Training from scratch, small data')",
                                   epoch, step, grad_norm, desc, TROUBLESHOOTING)
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            # the scheduler steps on skipped updates too, so the lr schedule stays aligned with the epoch count
            # (and with a resumed run, which counts updates the same way)
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None and not skip:
                model_ema.update(getattr(model, "module", model), step=num_updates)
            lr = optimizer.param_groups[0]["lr"]
        bs = images.shape[0]
        loss_sum += loss_value * bs
        n_seen += bs
        elapsed = time.time() - start
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{n_seen / max(elapsed, 1e-9):.1f}",
                        gnorm=f"{grad_norm:.2g}")
        if writer is not None and step % log_every == 0:
            writer.add_scalar("train/loss_step", loss_value, epoch * len(loader) + step)
    bar.close()
    total_loss, total_n, bad_steps, opt_steps = all_reduce_sum([loss_sum, n_seen, bad_steps, opt_steps], device)
    elapsed = time.time() - start
    bad_steps, opt_steps = int(bad_steps), int(opt_steps)
    if bad_steps * 2 > opt_steps:  # more than half (summed over processes: every process raises together)
        raise TrainingDivergedError(diverged_message(
            f"{bad_steps} of {opt_steps} optimizer steps in epoch {epoch} were skipped because the total gradient "
            "norm was non-finite (inf/NaN), and this epoch's weights were not saved",
            bad_grads or "the first skipped step was on another process", REMEDIES),
            skipped=bad_steps, total=opt_steps, first_param=first_bad_param)
    return {"train_loss": total_loss / max(total_n, 1), "lr": lr, "train_images": int(total_n),
            "train_img_per_s": total_n / max(elapsed, 1e-9), "train_time_s": elapsed,
            "nonfinite_grad_steps": bad_steps, "optimizer_steps": opt_steps}


class LossTrendMonitor:
    """Says once when the training loss has not fallen: after ``min_epochs`` or more epochs (of this run), if the
    latest epoch's mean training loss is not at least ``min_drop`` (relative) below the first epoch's.

    A warning only, never a stop: ``update(loss)`` returns the message the first time the condition holds, else
    ``None``. With ``--resume`` the first epoch is the first one of this invocation.
    """

    def __init__(self, min_epochs: int = 3, min_drop: float = 0.02):
        self.min_epochs, self.min_drop = min_epochs, min_drop
        self.losses: list = []
        self.warned = False

    def update(self, loss: float) -> Optional[str]:
        self.losses.append(float(loss))
        n, first, last = len(self.losses), self.losses[0], self.losses[-1]
        if self.warned or n < self.min_epochs or last <= first - self.min_drop * abs(first):
            return None
        self.warned = True
        return (f"the training loss has not fallen in {n} epochs ({first:.4f} -> {last:.4f}): it is not "
                f"{100 * self.min_drop:.0f}% below the first epoch's; the model may not be learning: check the "
                "learning rate / recipe, see classification/README.md ('Training from scratch, small data')")


@torch.no_grad()
def evaluate(model, loader, device, *, autocast_ctx, max_steps: Optional[int] = None) -> Dict[str, float]:
    """Top-1 / top-5 (percent) and cross-entropy over the whole (sharded) val set, summed over processes."""
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for step, (images, targets) in enumerate(tqdm(loader, desc="eval", disable=not is_main_process(),
                                                  dynamic_ncols=True, file=sys.stderr, mininterval=1.0)):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_ctx():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        acc1, acc5 = accuracy(logits, targets, topk=(1, k))
        bs = images.shape[0]
        correct1 += acc1.item() * bs / 100
        correct5 += acc5.item() * bs / 100
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        n += bs
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], device)
    n = max(n, 1)
    return {"val_top1": 100 * correct1 / n, "val_top5": 100 * correct5 / n, "val_loss": loss_sum / n,
            "val_images": int(n)}
