#!/usr/bin/env python
"""Train or evaluate metaspike-d2 detectors (and semantic segmentation) with Detectron2.

    python tools/train_net.py --config-file configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CFG --eval-only --backend onnxruntime MODEL.WEIGHTS model.onnx
    python tools/train_net.py --config-file CFG --resume            # continue from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --num-gpus 8        # multi-GPU through detectron2's launch

CPU: add ``MODEL.DEVICE cpu`` (the quickstart config sets it). CPU configs launch ``CPU_PROCESSES``
data-parallel processes (gloo) unless ``--num-gpus`` is given (the detection quickstart: 2).

Own data, before the KEY VALUE overrides (README.md, "Train on your own data"; metaspike_d2/data/own_data.py):
``--register-coco NAME JSON IMAGE_DIR``, ``--register-voc NAME IMAGE_DIR ANNOTATION_DIR [--classes a,b]``,
``--register-sem-seg NAME IMAGE_DIR LABEL_DIR CLASSES_TXT [--ignore-label N]``; the class count follows
from the data unless the overrides give it.
"""
import logging
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch  # noqa: E402
from detectron2.engine.train_loop import TrainerBase  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results  # noqa: E402

from metaspike_d2.d2 import (  # noqa: E402
    MetaSpikeCheckpointer,
    add_metaspike_config,
    build_lr_scheduler,
    build_optimizer,
)
from metaspike_d2.d2.config import maybe_reparameterize  # noqa: E402
from metaspike_d2.d2.engine import (  # noqa: E402
    AverageBuffersHook,
    apply_backbone_norm,
    build_resumable_train_loader,
    build_train_loop,
    create_ddp_model,
    log_cpu_processes,
    resolve_num_processes,
)
from metaspike_d2.d2.ema import build_model_ema_hook  # noqa: E402
from metaspike_d2.d2.export import INFERENCE_BACKENDS, build_inference_model  # noqa: E402
from metaspike_d2.d2.energy_hook import register_firing_rate_hook  # noqa: E402
from metaspike_d2.d2.sem_seg import build_sem_seg_evaluator  # noqa: E402
from metaspike_d2.data import build_detection_augmentation, own_data  # noqa: E402
from metaspike_d2.data.image_io import RobustDatasetMapper  # noqa: E402
from metaspike_d2.data.sem_seg_augmentation import build_sem_seg_augmentation  # noqa: E402


def _has_d2_c_ops() -> bool:
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class Trainer(DefaultTrainer):
    """DefaultTrainer with AdamW / linear schedules, the DETR-style crop, safe checkpoints and
    evaluators chosen by the dataset's ``evaluator_type`` ("coco" or "sem_seg")."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with a CPU-aware DDP wrapper (gloo), AMP refused on the CPU,
        # MODEL.METASPIKE.NORM (BN/SyncBN) applied to the backbone (metaspike_d2/d2/engine.py) and the
        # MetaSpikeCheckpointer (weights_only loading, atomic saves; metaspike_d2/d2/checkpoint.py).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = apply_backbone_norm(cfg, self.build_model(cfg))
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        self.train_sampler = data_loader.resumable_sampler  # skips what a resumed run already consumed
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = MetaSpikeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                                  allow_partial=cfg.MODEL.METASPIKE.ALLOW_PARTIAL_WEIGHTS)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        hook_list = super().build_hooks()
        if comm.get_world_size() > 1:  # one model for every process to checkpoint and evaluate
            before = (hooks.PeriodicCheckpointer, hooks.EvalHook)
            first = next(i for i, h in enumerate(hook_list) if isinstance(h, before))
            hook_list.insert(first, AverageBuffersHook(self.cfg.TEST.EVAL_PERIOD))
        # MODEL_EMA: after the LR scheduler, before the checkpointer and the evaluation (metaspike_d2/d2/ema.py)
        ema_hook = build_model_ema_hook(self.cfg, self)
        if ema_hook is not None:
            hook_list.insert(2, ema_hook)
        return hook_list

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        evaluators = []
        if evaluator_type == "coco":
            # a --register-voc set is converted to COCO json again each time: its files may have changed
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=_has_d2_c_ops(),
                                            allow_cached_coco=dataset_name not in own_data.registered_from_args()))
        elif evaluator_type == "sem_seg":
            evaluators.append(build_sem_seg_evaluator(dataset_name, output_folder))
        else:
            raise NotImplementedError(f"no evaluator for dataset {dataset_name} with type {evaluator_type!r}")
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":  # resize -> category-area crop -> color -> flip
            augmentations = build_sem_seg_augmentation(cfg)
        else:
            augmentations = build_detection_augmentation(cfg, True)
        # grayscale / RGBA / palette / 16-bit images converted, unreadable files named (or skipped and
        # counted with DATALOADER.SKIP_BAD_IMAGES); metaspike_d2/data/image_io.py
        mapper = RobustDatasetMapper(cfg, is_train=True, augmentations=augmentations)
        loader, sampler = build_resumable_train_loader(cfg, mapper)
        loader.resumable_sampler = sampler
        return loader

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # continue the sample stream: skip the samples this process consumed before the checkpoint
        self.train_sampler.skip = self.start_iter * (self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # the same image reader; evaluation never skips an image
        return build_detection_test_loader(cfg, dataset_name, mapper=RobustDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def load_config(args):
    """The frozen config of ``--config-file``, the command line's overrides and the class count of the
    ``--register-*`` datasets, which it registers in this process (again: a no-op) for that."""
    own_data.register_from_args(args)
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.merge_from_list(own_data.dataset_config_overrides(cfg, args.opts))  # NUM_CLASSES unless given
    cfg.freeze()
    return cfg


def setup(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="metaspike_d2", abbrev_name="ms")
    if cfg.CPU_THREADS > 0:
        torch.set_num_threads(cfg.CPU_THREADS)
    log_cpu_processes(cfg)
    own_data.log_summary(cfg, args.opts)
    return cfg


def main(args):
    own_data.register_from_args(args)  # every process: workers spawned by launch start with empty catalogs
    cfg = setup(args)
    if args.eval_only:
        if args.backend == "pytorch":
            model = Trainer.build_model(cfg)
            MetaSpikeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            model = maybe_reparameterize(cfg, model)  # MODEL.METASPIKE.REPARAM_INFERENCE ("" = off)
        else:  # an exported graph (tools/export_model.py) on ONNX Runtime / OpenVINO
            model = build_inference_model(cfg, args.backend)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    register_firing_rate_hook(trainer, cfg)  # MODEL.METASPIKE.FIRING_RATE_PERIOD > 0 (docs/energy.md)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """Detectron2's parser, with ``--num-gpus`` unset by default (the config's CPU_PROCESSES then decides) and
    ``--dist-url auto`` (a free local port, so that two runs on one machine do not collide; runs on several
    machines must give it)."""
    parser = default_argument_parser()
    parser.set_defaults(num_gpus=None, dist_url="auto")
    parser.add_argument("--backend", choices=INFERENCE_BACKENDS, default="pytorch",
                        help="with --eval-only: pytorch (MODEL.WEIGHTS a checkpoint) or the runtime of an exported "
                             "graph (MODEL.WEIGHTS a .onnx file from tools/export_model.py)")
    return own_data.add_dataset_arguments(parser)  # --register-coco / --register-voc / --register-sem-seg


def launch_from_args(args):
    """``launch(main, ...)`` with as many processes as :func:`resolve_num_processes` gives."""
    if args.backend != "pytorch" and not args.eval_only:
        raise SystemExit(f"--backend {args.backend} runs an exported graph for evaluation only: add --eval-only")
    num_procs = resolve_num_processes(load_config(args), args.num_gpus)
    args.num_gpus = num_procs
    launch(main, num_procs, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    args = argument_parser().parse_args()
    logging.getLogger(__name__).info("Command line arguments: %s", args)
    launch_from_args(args)
