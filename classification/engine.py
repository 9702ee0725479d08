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

__all__ = ["train_one_epoch", "evaluate", "is_main_process", "all_reduce_sum"]

logger = logging.getLogger(__name__)


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
    loss_sum, n_seen, bad_steps, start = 0.0, 0, 0, time.time()
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
            scaler.unscale_(optimizer)
            # the total norm is also a health check: a non-finite norm without a GradScaler (bf16 / fp32) means
            # the step is lost (timm's LAMB zeroes the gradients when its global norm overflows)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads).item()
            if clip_grad and math.isfinite(grad_norm):  # (clipping by a non-finite norm would write NaNs)
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip_grad, grad_norm)
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                bad_steps += 1
                if bad_steps == 1:
                    logger.warning("epoch %d step %d: gradient norm %s; steps like this do not train the model "
                                   "(classification/README.md, 'Silent attention')", epoch, step, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
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
    total_loss, total_n, bad_steps = all_reduce_sum([loss_sum, n_seen, bad_steps], device)
    elapsed = time.time() - start
    return {"train_loss": total_loss / max(total_n, 1), "lr": lr, "train_images": int(total_n),
            "train_img_per_s": total_n / max(elapsed, 1e-9), "train_time_s": elapsed,
            "nonfinite_grad_steps": int(bad_steps)}


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
