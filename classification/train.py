#!/usr/bin/env python
"""Train / fine-tune / evaluate a Meta-SpikeFormer classifier (the original ``main_finetune.py`` recipe on timm).

Single process::

    python classification/train.py --model metaspikeformer_tiny --data-path synthetic --input-size 64 ...

Multi-GPU / multi-node (DDP; every process reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun)::

    torchrun --nproc_per_node 8 classification/train.py --config classification/configs/55m_t1.yaml --data-path /data/imagenet

Defaults are the original's (main_finetune.py, train.sh): input 224, LAMB (trust clip), lr = blr x eff_batch / 256 with
blr 6e-4, weight decay 0.05 (none on 1-D parameters), 10 warm-up epochs then per-iteration cosine to 1e-6,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, label smoothing 0.1, mixup / cutmix off, AMP on.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python classification/train.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import metaspike_d2  # noqa: F401  (registers the models with timm)
from metaspike_d2.checkpoint import (CheckpointError, convert_original_state_dict, extract_state_dict,
                                     load_checkpoint_file, load_state_dict_strict, save_atomic)
from classification.data import DEFAULT_CROP_PCT, ShardSampler, build_dataset, build_transform
from classification.recipe import RECIPES, SMALL_DATASET_IMAGES, SMALL_INPUT_SIZE, apply_recipe
from classification.distill import DEFAULT_TEACHER, DistillationLoss, build_teacher
from classification.engine import LossTrendMonitor, evaluate, is_main_process, train_one_epoch

logger = logging.getLogger("classification.train")

RECIPE_HELP = "(default: from --recipe)"

CHECKPOINT_LAST = "checkpoint-last.pth"
CHECKPOINT_BEST = "checkpoint-best.pth"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Meta-SpikeFormer classification", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of flag defaults (keys = flag names with '_'); "
                   "flags given on the command line override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="metaspikeformer_55m", help="timm name (metaspikeformer_{tiny,15m,31m,55m,123m})")
    g.add_argument("--time-steps", "-T", type=int, default=1, help="time steps T (weights do not depend on T)")
    g.add_argument("--kd", action="store_true", help="add the distillation head head_kd (train: (head, head_kd); eval: mean)")
    g.add_argument("--head-input", default="spikes", choices=["spikes", "membrane"],
                   help="main head on spikes (the released code) or on the pre-LIF membrane (the original's earlier code)")
    g.add_argument("--num-heads", type=int, default=8,
                   help="SDSA heads (the original's 8); changes no weight shape, so use the same value downstream")
    g.add_argument("--spike-levels", type=int, default=1,
                   help="D: 1 = binary LIF neurons (the paper); >= 2 = integer I-LIF neurons emitting counts 0..D "
                        "(SpikeYOLO), D binary events each at inference; stored in the checkpoint")
    g.add_argument("--drop-path", type=float, default=0.0, help="drop-path rate (the original's 0.1 never reached the model)")
    g.add_argument("--finetune", default="", help="initialise from this checkpoint's weights (e.g. the T=1 run); "
                   "only head_kd may be missing (it starts from its init, as in the original)")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="ImageFolder root with train/ and val/, or 'synthetic'")
    g.add_argument("--synthetic-dir", default=None, help="cache dir for --data-path synthetic "
                   "(default $METASPIKE_CACHE or ~/.cache/metaspike_d2)")
    g.add_argument("--synthetic-per-class", type=int, nargs=2, default=[200, 50], metavar=("TRAIN", "VAL"),
                   help="images per class of the synthetic data")
    g.add_argument("--input-size", type=int, default=224)
    g.add_argument("--crop-pct", type=float, default=DEFAULT_CROP_PCT, help="eval resize = input / crop_pct (256 for 224)")
    g.add_argument("--num-workers", type=int, default=min(10, max(1, (os.cpu_count() or 2) - 1)),
                   help="data-loader workers per process (default: one less than the CPU count, at most 10)")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=True)
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default=None, help=f"timm auto-augment policy ('' for none) {RECIPE_HELP}")
    g.add_argument("--reprob", type=float, default=None, help=f"random-erasing probability {RECIPE_HELP}")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--scale", type=float, nargs=2, default=None, help=f"RandomResizedCrop area range {RECIPE_HELP}")
    g.add_argument("--smoothing", type=float, default=None, help=f"label smoothing {RECIPE_HELP}")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off, the original's default)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"])
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                   help="defaults of the flags marked 'recipe': 'imagenet' (the original's), 'small' (thousands of "
                   f"images), or 'auto': 'small' below {SMALL_DATASET_IMAGES:,} training images or {SMALL_INPUT_SIZE} px "
                   "(classification/recipe.py); the choice is logged at the start")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--warmup-epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=128, help="per process")
    g.add_argument("--accum-iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--blr", type=float, default=None,
                   help=f"base lr: lr = blr x batch x accum x world / 256 {RECIPE_HELP}")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--warmup-lr", type=float, default=0.0, help="lr at the start of the linear warm-up")
    g.add_argument("--weight-decay", type=float, default=None, help=RECIPE_HELP)
    g.add_argument("--opt", default=None, help=f"timm optimizer name (lambc = LAMB with trust_clip) {RECIPE_HELP}")
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast: float16 + GradScaler on CUDA, bfloat16 on CPU (default: on for CUDA, and on the CPU "
                   "only where it has native bfloat16 (AVX512-BF16 / AMX): emulated bfloat16 is several times slower)")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g = p.add_argument_group("distillation")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"])
    g.add_argument("--teacher-model", default=DEFAULT_TEACHER, help="timm name of the teacher")
    g.add_argument("--teacher-weights", default="", help="local teacher weight file (no hub access)")
    g.add_argument("--distillation-alpha", type=float, default=0.5)
    g.add_argument("--distillation-tau", type=float, default=1.0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="./output/classification")
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto' for OUTPUT_DIR/checkpoint-last.pth "
                   "if it exists; with --eval: the checkpoint to evaluate")
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint (at --time-steps)")
    g.add_argument("--eval-ema", action="store_true", help="with --eval: evaluate the checkpoint's EMA weights")
    g.add_argument("--save-every", type=int, default=50, help="also keep checkpoint-EPOCH.pth every N epochs")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--max-train-steps", type=int, default=None, help="cap steps per epoch (smoke tests)")
    g.add_argument("--max-eval-steps", type=int, default=None)
    g.add_argument("--max-epochs-per-run", type=int, default=None,
                   help="stop after this many epochs in this invocation (time-limited jobs; continue with --resume auto)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        cfg = load_config(pre.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise SystemExit(f"{pre.config}: unknown keys {unknown}")
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)


def load_config(path: str, _chain: tuple = ()) -> dict:
    """A YAML file of flag defaults; ``_base_: FILE`` (relative to it) is read first and overridden."""
    import yaml

    path = os.path.abspath(path)
    if path in _chain:
        raise SystemExit(f"{path}: _base_ chain loops ({' -> '.join(_chain + (path,))})")
    if not os.path.isfile(path):
        raise SystemExit(f"config file not found: {path}" + (f" (the _base_ of {_chain[-1]})" if _chain else ""))
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping of flag names to values, got {type(cfg).__name__}")
    base = cfg.pop("_base_", None)
    if base is None:
        return cfg
    return {**load_config(os.path.join(os.path.dirname(path), base), _chain + (path,)), **cfg}


# --------------------------------------------------------------------------------------------------

def init_distributed(args) -> None:
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    device = torch.device(args.device)
    if device.type == "cuda" and args.distributed:
        torch.cuda.set_device(args.local_rank)
        device = torch.device("cuda", args.local_rank)
    args.device_obj = device
    if args.distributed:
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30))


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def autocast_factory(args):
    """A no-arg callable giving the autocast context: fp16 on CUDA, bf16 on CPU, or nothing with --no-amp."""
    device_type = args.device_obj.type
    if args.amp is None:
        args.amp = device_type == "cuda" or (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if not args.amp:
        return contextlib.nullcontext, torch.amp.GradScaler(device_type if device_type == "cuda" else "cpu", enabled=False)
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    return (lambda: torch.autocast(device_type=device_type, dtype=dtype)), scaler


def model_state_dict_from(path: str, key: str = "model") -> dict:
    """State dict (our layout) of a checkpoint of ours or of the original (converted key by key)."""
    checkpoint = load_checkpoint_file(path)
    if key != "model":
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise CheckpointError(f"{path}: has no '{key}' entry (was the run trained with --model-ema?)")
        checkpoint = {"model": checkpoint[key]}
    state_dict = extract_state_dict(checkpoint, path)
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if "downsample1_1.encode_conv.weight" in state_dict:
        logger.info("%s: original BICLab layout, converting keys", path)
        state_dict = convert_original_state_dict(state_dict, source=path)
    return state_dict


def load_finetune_weights(model, path: str) -> None:
    """Load every tensor of ``path``; only ``head_kd.*`` may be missing (new distillation head) and is reported."""
    state_dict = model_state_dict_from(path)
    own = model.state_dict()
    dropped = [k for k in state_dict if k.startswith("head_kd.") and k not in own]
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    report = load_state_dict_strict(model, state_dict, source=f"finetune {path}", allow_partial=True)
    bad_missing = [k for k in report.missing if not k.startswith("head_kd.")]
    if bad_missing or report.unexpected or report.mismatched:
        raise CheckpointError(report.describe() + "\nonly head_kd.* may be missing when fine-tuning")
    logger.info("fine-tune init from %s: %d tensors; new (initialised): %s; dropped: %s", path, len(report.loaded),
                report.missing or "none", dropped or "none")


def build_model(args, num_classes: int, kd: bool):
    model = timm.create_model(args.model, num_classes=num_classes, T=args.time_steps, kd=kd,
                              drop_path_rate=args.drop_path, head_input=args.head_input, num_heads=args.num_heads,
                              spike_levels=args.spike_levels)
    return model


def resolve_resume(args) -> str:
    if args.resume == "auto":
        last = Path(args.output_dir) / CHECKPOINT_LAST
        return str(last) if last.is_file() else ""
    return args.resume


def make_loader(dataset, args, train: bool):
    if train:
        if args.distributed:
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                          shuffle=True, seed=args.seed)
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    else:
        sampler = ShardSampler(len(dataset), args.rank, args.world_size)
    drop_last = train and len(sampler) > args.batch_size
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device_obj.type == "cuda", drop_last=drop_last,
        persistent_workers=False)  # workers re-seeded from the per-epoch seed (deterministic resume)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def main(args: argparse.Namespace) -> dict:
    """Run training or evaluation; returns the last epoch's log record (or the eval metrics)."""
    init_distributed(args)
    setup_logging(args.rank)
    try:
        return _main(args)
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _main(args) -> dict:
    if not args.data_path:
        raise SystemExit("--data-path is required: an ImageFolder root (DATA_PATH/train/<class>/*, "
                         "DATA_PATH/val/<class>/*) or 'synthetic'")
    if not args.eval and not 0 <= args.warmup_epochs < args.epochs:
        raise SystemExit(f"--warmup-epochs ({args.warmup_epochs}) must be >= 0 and smaller than --epochs ({args.epochs})")
    device = args.device_obj
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed + args.rank)
    autocast_ctx, scaler = autocast_factory(args)

    # rank 0 generates the synthetic data first, the others wait (no concurrent generation)
    ds_kwargs = dict(synthetic_dir=args.synthetic_dir, synthetic_per_class=args.synthetic_per_class)
    if args.distributed and args.data_path == "synthetic":
        if args.rank == 0:
            build_dataset("synthetic", "val", None, **ds_kwargs)
        dist.barrier()
    dataset_val = build_dataset(args.data_path, "val", build_transform(False, args.input_size, crop_pct=args.crop_pct),
                                **ds_kwargs)
    num_classes = len(dataset_val.classes)
    loader_val = make_loader(dataset_val, args, train=False)

    if args.eval:
        path = resolve_resume(args)
        if not path:
            raise SystemExit("--eval needs the checkpoint to evaluate: --resume FILE")
        state_dict = model_state_dict_from(path, "model_ema" if args.eval_ema else "model")
        kd = "head_kd.weight" in state_dict  # a KD checkpoint evaluates as (head + head_kd) / 2
        model = build_model(args, num_classes, kd).to(device)
        load_state_dict_strict(model, state_dict, source=path)
        stats = evaluate(model, loader_val, device, autocast_ctx=autocast_ctx, max_steps=args.max_eval_steps)
        stats.update(checkpoint=path, time_steps=args.time_steps, kd_head=kd)
        if is_main_process():
            logger.info("eval %s at T=%d: top-1 %.2f%%  top-5 %.2f%%  (%d images)", path, args.time_steps,
                        stats["val_top1"], stats["val_top5"], stats["val_images"])
            print(json.dumps(stats))
        return stats

    dataset_train = build_dataset(args.data_path, "train", None, **ds_kwargs)
    recipe_line = apply_recipe(args, len(dataset_train))  # fills the recipe flags that were not given
    eff_batch = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    if is_main_process():
        logger.info("%s", recipe_line)
    logger.info("args: %s", json.dumps({k: v for k, v in vars(args).items() if k != "device_obj"}, default=str))
    dataset_train.transform = build_transform(True, args.input_size, auto_augment=args.aa, reprob=args.reprob,
                                              remode=args.remode, recount=args.recount, scale=args.scale)
    if list(dataset_train.classes) != list(dataset_val.classes):
        raise SystemExit(f"train and val class folders differ: {dataset_train.classes[:5]}... vs {dataset_val.classes[:5]}...")
    loader_train = make_loader(dataset_train, args, train=True)
    if len(loader_train) == 0:
        raise SystemExit("the training set is empty for this batch size / number of processes")

    if args.distillation_type != "none" and not args.kd:
        raise SystemExit("--distillation-type needs --kd (the distillation head head_kd)")
    model = build_model(args, num_classes, args.kd)
    if args.finetune:
        load_finetune_weights(model, args.finetune)
    model.to(device)
    model_without_ddp = model
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.2fM parameters, T=%d, kd=%s, %d classes", args.model, n_params / 1e6, args.time_steps,
                args.kd, num_classes)

    optimizer = create_optimizer_v2(model_without_ddp, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    updates_per_epoch = math.ceil(len(loader_train) / args.accum_iter)
    # MAE/DeiT schedule of the original: linear warm-up from warmup_lr, then a per-update half-cosine to min_lr
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs - args.warmup_epochs, warmup_epochs=args.warmup_epochs,
        warmup_prefix=True, warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
    model_ema = ModelEmaV3(model_without_ddp, decay=args.model_ema_decay) if args.model_ema else None

    start_epoch, best_top1 = 0, -1.0
    resume = resolve_resume(args)
    if resume:
        ckpt = load_checkpoint_file(resume)
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
            raise CheckpointError(f"{resume}: not a training checkpoint of this script (no optimizer state); "
                                  "use --finetune to start from its weights")
        load_state_dict_strict(model_without_ddp, extract_state_dict(ckpt, resume), source=resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])  # the schedule (length, warm-up, peak lr) of the checkpoint
        saved = ckpt.get("args") or {}
        changed = [k for k in ("epochs", "warmup_epochs", "lr", "min_lr") if k in saved and saved[k] != getattr(args, k)]
        if changed:
            logger.warning("resume: %s differ from the checkpoint's; the checkpoint's schedule is kept (%s)", changed,
                           {k: saved[k] for k in changed})
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if model_ema is not None:
            if "model_ema" not in ckpt:
                raise CheckpointError(f"{resume}: has no EMA weights but --model-ema is set")
            load_state_dict_strict(model_ema.module, ckpt["model_ema"], source=f"{resume} (EMA)")
        start_epoch = int(ckpt["epoch"]) + 1
        best_top1 = float(ckpt.get("best_top1", -1.0))
        logger.info("resumed from %s: continuing at epoch %d (best top-1 so far %.2f)", resume, start_epoch, best_top1)

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        base_criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        base_criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base_criterion = torch.nn.CrossEntropyLoss()
    teacher = None
    if args.distillation_type != "none":
        teacher = build_teacher(args.teacher_model, args.teacher_weights, num_classes, device)
    criterion = DistillationLoss(base_criterion, teacher, args.distillation_type, args.distillation_alpha,
                                 args.distillation_tau)

    out = Path(args.output_dir)
    writer = None
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "device_obj"},
                                                  indent=1, default=str))
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=str(out / "tb"))

    record: dict = {}
    run_start = time.time()
    end_epoch = args.epochs if not args.max_epochs_per_run else min(args.epochs, start_epoch + args.max_epochs_per_run)
    loss_trend = LossTrendMonitor()  # warns once if the training loss has not fallen after 3+ epochs
    for epoch in range(start_epoch, end_epoch):
        # everything random in an epoch (order, augmentation, workers' seeds) follows from (seed, rank, epoch),
        # so a resumed run repeats exactly what an uninterrupted one would have done
        set_seed(args.seed + args.rank + 1000 * epoch)
        if args.distributed:
            loader_train.sampler.set_epoch(epoch)
        else:
            loader_train.sampler.generator.manual_seed(args.seed + epoch)
        train_stats = train_one_epoch(
            model, criterion, loader_train, optimizer, scheduler, scaler, device, epoch, autocast_ctx=autocast_ctx,
            accum_iter=args.accum_iter, clip_grad=args.clip_grad, mixup_fn=mixup_fn, model_ema=model_ema,
            max_steps=args.max_train_steps, writer=writer)  # raises TrainingDivergedError before any save
        stalled = loss_trend.update(train_stats["train_loss"])
        if stalled and is_main_process():
            logger.warning(stalled)
        val_stats = evaluate(model, loader_val, device, autocast_ctx=autocast_ctx, max_steps=args.max_eval_steps)
        record = {"epoch": epoch, **train_stats, **val_stats}
        if model_ema is not None:
            ema_stats = evaluate(model_ema.module, loader_val, device, autocast_ctx=autocast_ctx,
                                 max_steps=args.max_eval_steps)
            record.update({f"{k}_ema": v for k, v in ema_stats.items()})
        record["elapsed_s"] = time.time() - run_start
        improved = record["val_top1"] > best_top1
        best_top1 = max(best_top1, record["val_top1"])
        record["best_top1"] = best_top1
        if is_main_process():
            ckpt = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_top1": best_top1,
                "args": {k: v for k, v in vars(args).items() if k != "device_obj"},  # plain dict: weights_only-safe
            }
            if model_ema is not None:
                ckpt["model_ema"] = model_ema.module.state_dict()
            save_atomic(ckpt, out / CHECKPOINT_LAST)
            if improved:
                save_atomic(ckpt, out / CHECKPOINT_BEST)
            if (args.save_every and (epoch + 1) % args.save_every == 0) or epoch + 1 == args.epochs:
                save_atomic(ckpt, out / f"checkpoint-{epoch:04d}.pth")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key in ("train_loss", "lr", "val_top1", "val_top5", "val_loss", "train_img_per_s"):
                    writer.add_scalar(("train/" if key.startswith(("train", "lr")) else "val/") + key, record[key], epoch)
                if model_ema is not None:
                    writer.add_scalar("val/val_top1_ema", record["val_top1_ema"], epoch)
                writer.flush()
            logger.info("epoch %d: train loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  lr %.3e  %.1f img/s  (%.0f s total)",
                        epoch, record["train_loss"], record["val_top1"], record["val_top5"], record["lr"],
                        record["train_img_per_s"], record["elapsed_s"])
    if writer is not None:
        writer.close()
    return record


if __name__ == "__main__":
    main(parse_args())
