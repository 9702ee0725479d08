"""Training-loop pieces that work on CPUs as well as GPUs (issue 7).

* :func:`create_ddp_model`: Detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``,
  which ``DistributedDataParallel`` rejects for a CPU model; here ``device_ids`` is only set for CUDA
  models, so ``launch(..., num_gpus_per_machine=N)`` with ``MODEL.DEVICE cpu`` trains with gloo.
* :func:`build_train_loop`: ``SimpleTrainer``, or ``AMPTrainer`` when ``SOLVER.AMP.ENABLED``. Detectron2's
  AMPTrainer (fp16 + GradScaler) asserts CUDA; on the CPU it is refused with a clear error instead.
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
import os

import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel

from ..backbone import MetaSpikeFormer
from ..blocks import convert_sync_batchnorm

__all__ = ["create_ddp_model", "build_train_loop", "apply_backbone_norm", "model_device", "ResumableSampler",
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


def build_train_loop(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """``AMPTrainer`` if ``SOLVER.AMP.ENABLED`` (CUDA only: a clear error on the CPU), else ``SimpleTrainer``."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    if model_device(model).type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.ENABLED=True needs a CUDA model (MODEL.DEVICE is {cfg.MODEL.DEVICE!r}): Detectron2's "
            "AMPTrainer trains in float16 with a GradScaler on the GPU. Set SOLVER.AMP.ENABLED False for CPU training.")
    return AMPTrainer(model, data_loader, optimizer)


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
