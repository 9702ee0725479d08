"""Training-loop pieces that work on CPUs as well as GPUs.

* :func:`create_ddp_model`: Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``,
  which ``DistributedDataParallel`` rejects for a CPU model; here ``device_ids`` is only set for CUDA
  models, so ``launch(..., num_gpus_per_machine=N)`` with ``MODEL.DEVICE cpu`` trains with gloo.
* :func:`build_train_loop`: :class:`GuardedSimpleTrainer` (a ``SimpleTrainer``), or :class:`GuardedAMPTrainer`
  (an ``AMPTrainer``) when ``SOLVER.AMP.ENABLED``. Detectron2's AMPTrainer (fp16 + GradScaler) asserts CUDA; on
  the CPU it is refused with a clear error instead. Both skip iterations whose gradients are non-finite and stop
  with :class:`~metaspike_d2.divergence.TrainingDivergedError` after 20 such iterations in a row.
* :func:`apply_backbone_norm`: ``MODEL.METASPIKE.NORM`` = "BN" (default) or "SyncBN" (every BatchNorm of
  the Meta-SpikeFormer backbone becomes a SyncBatchNorm, BN-and-pad keeping its border,
  :func:`metaspike_d2.blocks.convert_sync_batchnorm`). torch's SyncBatchNorm only runs on GPUs, so
  SyncBN with several CPU processes is refused at build time.
* :class:`ResumableSampler` / :func:`build_resumable_train_loader`: on ``--resume`` the training sample
  stream continues where the interrupted run stopped instead of starting over.
* :func:`resolve_num_processes`: how many processes ``tools/train_net.py`` launches (``--num-gpus``, or
  ``CPU_PROCESSES`` for CPU configs: data-parallel training on a multi-core CPU).
* :class:`AverageBuffersHook`: with several processes, BatchNorm running statistics differ per process
  (``broadcast_buffers=False``); they are averaged before every checkpoint that is evaluated, so each
  process evaluates, and ``model_final.pth`` holds, the same model.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time

import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel

from ..backbone import MetaSpikeFormer
from ..blocks import convert_sync_batchnorm
from ..divergence import TrainingDivergedError, describe_bad_gradients, diverged_message, total_grad_norm

__all__ = ["create_ddp_model", "build_train_loop", "GuardedSimpleTrainer", "GuardedAMPTrainer",
           "TrainingDivergedError", "apply_backbone_norm", "model_device", "ResumableSampler",
           "build_resumable_train_loader", "resolve_num_processes", "log_cpu_processes", "AverageBuffersHook"]

logger = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when there are several processes (else ``model``); CPU-aware."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and model_device(model).type == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def build_train_loop(cfg, model, data_loader, optimizer, *, max_consecutive_skips=None) -> SimpleTrainer:
    """:class:`GuardedAMPTrainer` if ``SOLVER.AMP.ENABLED`` (CUDA only: a clear error on the CPU), else
    :class:`GuardedSimpleTrainer`: both stop with :class:`TrainingDivergedError` after ``max_consecutive_skips``
    (default 20) iterations in a row whose gradients were non-finite."""
    if not cfg.SOLVER.AMP.ENABLED:
        return GuardedSimpleTrainer(model, data_loader, optimizer, max_consecutive_skips=max_consecutive_skips)
    if model_device(model).type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.ENABLED=True needs a CUDA model (MODEL.DEVICE is {cfg.MODEL.DEVICE!r}): Detectron2's "
            "AMPTrainer trains in float16 with a GradScaler on the GPU. Set SOLVER.AMP.ENABLED False for CPU training.")
    return GuardedAMPTrainer(model, data_loader, optimizer, max_consecutive_skips=max_consecutive_skips)


D2_REMEDIES = ("a lower SOLVER.BASE_LR (and / or a longer SOLVER.WARMUP_ITERS)",
               "gradient clipping: SOLVER.CLIP_GRADIENTS.ENABLED True (e.g. CLIP_TYPE full_model, CLIP_VALUE 1.0)",
               "check the input normalization: MODEL.PIXEL_MEAN / MODEL.PIXEL_STD and INPUT.FORMAT must match the "
               "images and the pretrained weights")


class _DivergenceGuard:
    """Bookkeeping shared by the two trainers: counts skipped iterations (in total and in a row), records
    ``skipped_steps`` in the event storage every iteration, warns on the first skip and raises
    :class:`TrainingDivergedError` after ``max_consecutive_skips`` skipped iterations in a row."""

    max_consecutive_skips = 20
    warn_on_first_skip = True

    def _init_guard(self, max_consecutive_skips) -> None:
        if max_consecutive_skips is not None:
            if max_consecutive_skips < 1:
                raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
            self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_steps = 0  # in this process's run (not restored on --resume)
        self.consecutive_skips = 0
        self._streak_start = None  # first iteration of the current run of skipped iterations
        self._streak_param = None
        self._streak_desc = ""
        self._warned = False

    def _count_step(self, skipped: bool, grad_norm: float, reason: str) -> None:
        """Call after each iteration's optimizer step (or its skip), while the gradients are still there."""
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips == 1:
                self._streak_start = self.iter
                self._streak_param, self._streak_desc = describe_bad_gradients(self.model)
                if self.warn_on_first_skip and not self._warned:
                    self._warned = True
                    logger.warning("iteration %d: total gradient norm %s (%s); %s. After %d such iterations in a "
                                   "row training stops (docs/troubleshooting.md#training-diverged)", self.iter,
                                   grad_norm, self._streak_desc, reason, self.max_consecutive_skips)
        else:
            self.consecutive_skips = 0
        get_event_storage().put_scalar("skipped_steps", self.skipped_steps, smoothing_hint=False, cur_iter=self.iter)
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDivergedError(diverged_message(
                f"the gradients were non-finite (inf/NaN) in {self.consecutive_skips} iterations in a row "
                f"(iterations {self._streak_start}-{self.iter}; {self.skipped_steps} skipped iterations in total) "
                f"and {reason} each time, so the weights were not updated",
                f"at iteration {self._streak_start}, the first of them, {self._streak_desc}", D2_REMEDIES),
                skipped=self.consecutive_skips, total=self.skipped_steps, first_param=self._streak_param)


class GuardedSimpleTrainer(_DivergenceGuard, SimpleTrainer):
    """Detectron2's ``SimpleTrainer`` that does not let non-finite gradients into the optimizer.

    Detectron2 raises ``FloatingPointError`` on a non-finite loss (``_write_metrics``), but a finite loss with
    inf / NaN gradients would reach ``optimizer.step()`` and poison the weights. Here the total gradient norm
    (one fused reduction per iteration) is checked after ``backward()``: when it is non-finite the step is
    skipped (the gradients are zeroed), counted, recorded as ``skipped_steps`` in the event storage, warned about
    the first time (naming the first parameter with a non-finite gradient), and ``max_consecutive_skips`` (20)
    skipped iterations in a row raise :class:`TrainingDivergedError`. The LR scheduler hook still steps, so the
    schedule stays aligned. With DDP the gradients are already all-reduced, so every process sees the same norm
    and skips (or raises) together. Gradient clipping (``SOLVER.CLIP_GRADIENTS``) happens inside
    ``optimizer.step()``, after this check. Everything else is ``SimpleTrainer.run_step``'s.
    """

    def __init__(self, model, data_loader, optimizer, *args, max_consecutive_skips=None, **kwargs):
        super().__init__(model, data_loader, optimizer, *args, **kwargs)
        self._init_guard(max_consecutive_skips)

    def run_step(self):
        assert self.model.training, "[SimpleTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            losses = loss_dict
            loss_dict = {"total_loss": loss_dict}
        else:
            losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()

        self.after_backward()
        grad_norm = total_grad_norm(self.model.parameters())  # after the hooks: what the optimizer would get

        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)  # raises FloatingPointError on a non-finite loss

        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self._count_step(not finite, grad_norm, "the optimizer step was skipped")
        if not finite:
            self.optimizer.zero_grad()


class GuardedAMPTrainer(_DivergenceGuard, AMPTrainer):
    """Detectron2's ``AMPTrainer``, unchanged per iteration (its GradScaler already skips fp16 overflow steps and
    lowers the scale; a few of those early on are normal, so they are not warned about). It only counts the
    iterations the GradScaler skipped (the scale went down), records ``skipped_steps`` in the event storage and
    raises :class:`TrainingDivergedError` after ``max_consecutive_skips`` (20) in a row: the scale has then
    fallen by 2**20, i.e. the gradients overflow whatever the scale."""

    warn_on_first_skip = False

    def __init__(self, model, data_loader, optimizer, *args, max_consecutive_skips=None, **kwargs):
        super().__init__(model, data_loader, optimizer, *args, **kwargs)
        self._init_guard(max_consecutive_skips)

    def run_step(self):
        assert self.model.training, "[AMPTrainer] model was changed to eval mode!"
        assert torch.cuda.is_available(), "[AMPTrainer] CUDA is required for AMP training!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast("cuda", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()

        self.grad_scaler.scale(losses).backward()

        if self.log_grad_scaler:
            storage = get_event_storage()
            storage.put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())

        self.after_backward()

        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)

        scale = self.grad_scaler.get_scale()  # the scale of this iteration's backward
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if self.grad_scaler.is_enabled():
            skipped = self.grad_scaler.get_scale() < scale  # update() backs the scale off after an inf / NaN
            # (the gradients are unscaled in place by step(), so a skipped one still names its parameter)
            self._count_step(skipped, float("nan"), "the GradScaler skipped the optimizer step")


def apply_backbone_norm(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """Apply ``MODEL.METASPIKE.NORM`` ("BN" or "SyncBN") to every Meta-SpikeFormer in ``model`` (in place)."""
    norm = cfg.MODEL.METASPIKE.get("NORM", "BN")
    if norm == "BN":
        return model
    if norm != "SyncBN":
        raise ValueError(f"MODEL.METASPIKE.NORM must be 'BN' or 'SyncBN', got {norm!r}")
    if model_device(model).type != "cuda" and comm.get_world_size() > 1:
        raise ValueError(
            "MODEL.METASPIKE.NORM='SyncBN' needs GPUs (torch's SyncBatchNorm has no CPU kernel) but this is a "
            f"{comm.get_world_size()}-process run with MODEL.DEVICE={cfg.MODEL.DEVICE!r}. Use NORM 'BN' on the CPU.")
    for name, module in list(model.named_modules()):
        if isinstance(module, MetaSpikeFormer):
            for child_name, child in list(module.named_children()):
                module.add_module(child_name, convert_sync_batchnorm(child))
            logger.info("MODEL.METASPIKE.NORM=SyncBN: BatchNorms of %s converted to SyncBatchNorm", name or "model")
    return model


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps Detectron2's infinite training sampler; the first ``skip`` indices of its stream are dropped.

    ``Trainer.resume_or_load`` sets ``skip`` to the number of samples this process consumed before the
    checkpoint, so a resumed run sees the samples an uninterrupted run would have seen next (exactly so
    when the stream is seeded, ``SEED >= 0``; Detectron2's own samplers restart from the beginning).
    It must be set before the loader is first iterated (the training loop iterates lazily, so it is).
    """

    def __init__(self, sampler: torch.utils.data.Sampler):
        super().__init__()
        self.sampler = sampler
        self.skip = 0

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def build_resumable_train_loader(cfg, mapper):
    """``build_detection_train_loader(cfg, mapper)`` with its sampler wrapped in :class:`ResumableSampler`.

    Returns ``(loader, sampler)``. Uses Detectron2's own ``_train_loader_from_config`` so that the dataset,
    the sampler choice (``DATALOADER.SAMPLER_TRAIN``) and every other loader setting stay Detectron2's.
    """
    kwargs = _train_loader_from_config(cfg, mapper=mapper)
    kwargs["sampler"] = ResumableSampler(kwargs["sampler"])
    return build_detection_train_loader(**kwargs), kwargs["sampler"]


def resolve_num_processes(cfg, num_gpus: int | None) -> int:
    """Processes per machine for ``launch``: ``--num-gpus`` when given, else ``CPU_PROCESSES`` for a CPU
    config (``MODEL.DEVICE`` "cpu") and 1 otherwise."""
    if num_gpus is not None:
        if num_gpus < 1:
            raise ValueError(f"--num-gpus must be >= 1, got {num_gpus}")
        return num_gpus
    if cfg.MODEL.DEVICE != "cpu":
        return 1
    if cfg.CPU_PROCESSES < 1:
        raise ValueError(f"CPU_PROCESSES must be >= 1, got {cfg.CPU_PROCESSES}")
    return cfg.CPU_PROCESSES


def log_cpu_processes(cfg) -> None:
    """In a multi-process CPU run, say so, and warn when the processes' threads (this process's torch threads,
    once ``CPU_THREADS`` is applied) outnumber the cores."""
    procs = comm.get_world_size()
    if procs == 1 or cfg.MODEL.DEVICE != "cpu":
        return
    threads = torch.get_num_threads()
    logger.info("training data-parallel in %d CPU processes (gloo), images per process and step: %d",
                procs, cfg.SOLVER.IMS_PER_BATCH // procs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores is not None and threads * procs > cores:
        logger.warning("%d processes x %d threads on %d cores: the processes share cores and every step takes "
                       "longer (CPU_PROCESSES 1 runs the same total batch in one process)", procs, threads, cores)


class AverageBuffersHook(HookBase):
    """Averages the BatchNorm running statistics over the processes (timm's ``distribute_bn``, an all-reduce
    of every ``running_mean`` / ``running_var``) after the last iteration and after every ``eval_period``-th
    one, before the checkpointer and the evaluation hook run (insert it before them; only in multi-process runs).

    With ``broadcast_buffers=False`` each process keeps the statistics of its own images: without this, each
    process would evaluate its share of the test set with a different model, and ``model_final.pth`` (written
    by the main process) would not be the model whose results are printed.
    """

    def __init__(self, eval_period: int):
        self._period = eval_period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0 and next_iter % self._period == 0):
            distribute_bn(self.trainer.model, comm.get_world_size(), reduce=True)
