#!/usr/bin/env python
"""GPU check of metaspike-d2: everything the CPU machines cannot check, in one run of about 8 minutes on one GPU.

Parts (``--parts a,b,c,d,e``, all by default; each is wrapped, so a failure is reported and the others still run):

a. device checks (the test suite's device-independent checks, on the GPU): forward + backward of
   ``metaspikeformer_tiny`` and ``metaspikeformer_15m`` at T=1 and T=4 (fp32 and bf16 autocast), two eval forwards
   identical, T=1 features == step 0 of T=4, CUDA vs CPU eval logits; the Detectron2 quickstart models
   (``configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml``, ``configs/quickstart/semfpn_metaspike_tiny_shapes.yaml``,
   ``MODEL.DEVICE cuda``) forward in train mode (+ backward and an optimizer step) and in eval mode; one
   ``SOLVER.AMP.ENABLED`` step (Detectron2's AMPTrainer, fp16 + GradScaler).
b. spikingjelly's fused LIF on CUDA (what ``metaspike_d2.neurons.MultiStepLIF`` selects, and then each choice of
   spikingjelly 2.0.0's ``SJ_LIF_CUDA_IMPLEMENTATION`` = cuda / triton / torch, each in its own process since the
   variable is read at import) against the CPU kernels ``lif_inference_cpu`` and ``LIFSurrogateCPU`` on random
   inputs, T=1 and T=4, thresholds 1.0 and 0.5, fp32 and bf16: spikes must be identical, input gradients equal to
   1e-5 of their largest value (bf16: 1e-2). Likewise ``MultiStepILIF`` (spikingjelly's I-LIF kernel, D=2 and 4)
   against ``ilif_inference_cpu`` / ``ILIFSurrogateCPU``: identical counts, gradients within 1e-5.
   With ``--dry-run-cpu`` the candidate is spikingjelly's own CPU path.
c. 200 iterations of the detection and the segmentation quickstart through ``tools/train_net.py`` (a subprocess,
   ``--num-gpus 1 MODEL.DEVICE cuda SOLVER.MAX_ITER 200 CPU_PROCESSES 1 CPU_THREADS 0``, output in a temp dir):
   the evaluation lines (bbox / segm AP, mIoU) and the wall time.
d. speed: a 55M T=4 classifier training step (batch 32, bf16 autocast, 224 px, fused AdamW) and a 15M Mask R-CNN
   training step (``configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml``, batch 8, 800x1333,
   random images with 3 random boxes/masks each; fp32 and bf16): images/s, peak memory
   (``torch.cuda.max_memory_allocated``), TFLOP/s (conv/matmul FLOPs of one forward + backward counted with
   ``torch.utils.flop_counter.FlopCounterMode``) against the bf16 peak measured in the same run (8192^3 matmul).
e. the original BICLab model's 55M T=4 training step beside ours: ``tests/original_reference.py`` (the original's
   module layout) with every neuron replaced by the original's ``spikingjelly.clock_driven.neuron.MultiStepLIFNode``
   (spikingjelly 0.0.0.0.14, cupy backend when it runs, else its torch backend; run in its own process since it
   shares the package name with spikingjelly 2.0.0), same batch and same initial weights (converted with
   ``metaspike_d2.checkpoint.convert_original_state_dict``), at bf16 autocast or, where the original's kernels
   have no bf16 (its cupy kernels have fp32 and fp16 only), at the fp16 + GradScaler it trained with; both sides
   at that precision. Without the old spikingjelly the original's torch backend is written out here
   (``SurrogateLIF``) and the result says so.

On the device machine (no network there; it gets a copy of the working tree and runs its own ``python3``, which has
torch, triton and cupy; the packages it lacks travel as wheels in the git-ignored folder ``.whl/``)::

    bash benchmarks/gpu_setup.sh download     # here, once, where PyPI is reachable: fills .whl/ (about 12 MB)
    # then the device command (the run tool: command "bash benchmarks/gpu_setup.sh run", carry [".whl"],
    # timeout_s 600): installs .whl/ into /tmp/site, runs this script, leaves $OUT/gpu.json and $OUT/gpu.log
    bash benchmarks/gpu_setup.sh run [--quick] [--parts a,b]

Anywhere else: ``python benchmarks/gpu.py [--quick] [--parts a,b,c,d,e] [--output FILE]``. Without a CUDA device it
exits with status 2, unless ``--dry-run-cpu``: the same code paths on the CPU at tiny sizes (``--dry-run-cpu --quick``
takes a few minutes; tests/test_gpu_script.py runs parts a and b that way). Exit status: 0 when every check
passed, 1 when a check failed or a part raised, 2 without a CUDA device. docs/benchmarks.md ("GPU check").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import glob
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Only torch and the standard library at import time: the part (e) worker runs this file with the *old*
# spikingjelly first on its path, where metaspike_d2 (spikingjelly 2.0.0) cannot be imported.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NO_CUDA_MESSAGE = ("no CUDA device: this script checks the GPU path; run it on a GPU machine "
                   "(benchmarks/gpu_setup.sh), or pass --dry-run-cpu to run its code paths on the CPU at tiny sizes")
DET_QUICKSTART = "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml"
SEG_QUICKSTART = "configs/quickstart/semfpn_metaspike_tiny_shapes.yaml"
MASK_RCNN_15M = "configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml"
LIF_ENV = "SJ_LIF_CUDA_IMPLEMENTATION"
LEGACY_SJ_GLOB = ".whl/legacy/spikingjelly-0.0.0.0.*.whl"
#: Mask R-CNN overrides of the CPU dry run (a tiny model on the same config and code path; tests/test_d2_train.py).
DRY_MASK_RCNN_OPTS = ["MODEL.METASPIKE.VARIANT", "tiny", "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
                      "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
                      "MODEL.ROI_MASK_HEAD.NUM_CONV", 1, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
                      "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------
class Ctx:
    """Run settings: device, sizes (GPU / --quick / --dry-run-cpu), the time budget and a temp dir."""

    def __init__(self, args):
        self.args = args
        self.dry = bool(args.dry_run_cpu)
        self.quick = bool(args.quick)
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.deadline = self.start + args.time_limit
        self.tmp = Path(tempfile.mkdtemp(prefix="metaspike_gpu_"))

    def pick(self, gpu, quick, dry):
        """The size for this run: ``dry`` with --dry-run-cpu, else ``quick`` with --quick, else ``gpu``."""
        return dry if self.dry else (quick if self.quick else gpu)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def timeout(self, wanted: float, reserve: float = 0.0) -> float:
        """A subprocess timeout: ``wanted`` seconds, less when the run's time limit is closer (at least 30 s)."""
        return max(30.0, min(wanted, self.remaining() - reserve))

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def check(name: str, passed, value: str = "", **figures) -> dict:
    """One row of a part's table: ``passed`` True / False, or None for a figure that is reported, not judged."""
    return {"name": name, "passed": None if passed is None else bool(passed), "value": value, **figures}


def guarded(checks: list, name: str, fn) -> None:
    """``checks += fn()``; an exception becomes one failed row, so the rest of the part still runs."""
    try:
        checks.extend(fn())
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
        checks.append(check(name, False, f"{type(e).__name__}: {str(e)[:300]}", traceback=traceback.format_exc()))
    finally:
        free_memory()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 in matmuls and cuDNN convs (comparisons between runs and devices), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def close_fraction(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    """Fraction of elements with ``|a - b| <= tol * (1 + |b|)``."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs() <= tol * (1 + b.abs())).float().mean().item()


def gib(n_bytes) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def fixed_batch(batch: int, size: int, num_classes: int = 1000, seed: int = 0):
    """The same images and labels in every process (drawn on the CPU from a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, num_classes, (batch,), generator=g)


# ----------------------------------------------------------------------------------------------------------------
# timing of one training step (shared by parts d and e, the part (e) worker and tools/gpu_check_detection.py)
# ----------------------------------------------------------------------------------------------------------------
def train_step_benchmark(forward_loss, optimizer, *, device: torch.device, precision: str, iters: int, warmup: int,
                         after_step=None, count_flops: bool = True) -> dict:
    """Time ``iters`` training steps (after ``warmup``) of ``loss = forward_loss()`` under autocast, backward
    (GradScaler for fp16) and ``optimizer.step()``. Returns median/min step seconds, the first step's seconds
    (compilation, autotuning), peak CUDA memory, the conv/matmul FLOPs of one forward + backward and the last loss."""
    from torch.utils.flop_counter import FlopCounterMode

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast(device, precision):
            loss = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()
        return loss

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    flops = None
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            with autocast(device, precision):
                flop_loss = forward_loss()
            flop_loss.backward()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        flops = int(counter.get_total_flops())
    times_sorted = sorted(times)
    return {"step_s": times_sorted[len(times) // 2], "step_s_min": times_sorted[0], "steps_timed": len(times),
            "warmup_steps": warmup, "first_step_s": first, "peak_memory_gib": gib(peak), "flops_per_step": flops,
            "final_loss": float(loss.detach().float())}


def add_rates(bench: dict, batch: int, peak_tflops: float | None) -> dict:
    """images/s, achieved TFLOP/s and its fraction of the measured bf16 peak."""
    bench["images_per_s"] = batch / bench["step_s"]
    flops = bench.get("flops_per_step")
    bench["tflops"] = flops / bench["step_s"] / 1e12 if flops else None
    bench["fraction_of_bf16_peak"] = (bench["tflops"] / peak_tflops) if bench["tflops"] and peak_tflops else None
    return bench


def matmul_peak(device: torch.device, n: int, reps: int) -> dict:
    """TFLOP/s of an ``n x n x n`` bf16 matmul (3 warm-ups, mean of ``reps``)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    dt = (time.perf_counter() - t0) / reps
    return {"n": n, "reps": reps, "seconds": dt, "tflops": 2 * n ** 3 / dt / 1e12}


def classifier_step_benchmark(device, *, variant: str, time_steps: int, batch: int, size: int, precision: str,
                              iters: int, warmup: int, state_dict=None, count_flops=True, logits_batch: int = 0) -> dict:
    """Our ``MetaSpikeFormerClassifier`` (1000 classes): one training step, fused AdamW, optionally from
    ``state_dict``; with ``logits_batch`` > 0 also the fp32 eval logits of the first images (before training)."""
    from metaspike_d2 import MetaSpikeFormerClassifier

    torch.manual_seed(0)
    model = MetaSpikeFormerClassifier(variant=variant, num_classes=1000, time_steps=time_steps)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    model.to(device)
    images, targets = fixed_batch(batch, size)
    images, targets = images.to(device), targets.to(device)
    out = {"variant": variant, "T": time_steps, "batch": batch, "size": size, "precision": precision,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if logits_batch:
        model.eval()
        with torch.no_grad(), strict_fp32():
            out["eval_logits"] = model(images[:logits_batch]).float().cpu()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    out.update(train_step_benchmark(lambda: F.cross_entropy(model(images).float(), targets), optimizer,
                                    device=device, precision=precision, iters=iters, warmup=warmup,
                                    count_flops=count_flops))
    del model, optimizer
    free_memory()
    return out


def detection_cfg(config_file: str, device: torch.device, opts=()):
    from detectron2.config import get_cfg

    from metaspike_d2.d2 import add_metaspike_config

    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(str(ROOT / config_file) if not os.path.isabs(config_file) else config_file)
    cfg.merge_from_list(["MODEL.DEVICE", device.type, *opts])
    return cfg


def random_detection_batch(n: int, size, num_classes: int, boxes_per_image: int = 3, seed: int = 0):
    """``n`` Detectron2 training inputs of ``size`` = (H, W): uniform random pixels, ``boxes_per_image`` random boxes
    (32 px to half the image) with box-shaped masks and random classes."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(n):
        bw = 32 + torch.rand(boxes_per_image, generator=g) * (w / 2 - 32)
        bh = 32 + torch.rand(boxes_per_image, generator=g) * (h / 2 - 32)
        x0 = torch.rand(boxes_per_image, generator=g) * (w - bw)
        y0 = torch.rand(boxes_per_image, generator=g) * (h - bh)
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1).floor()
        masks = torch.zeros(boxes_per_image, h, w, dtype=torch.bool)
        for j, (a, b, c, d) in enumerate(boxes.long().tolist()):
            masks[j, b:d, a:c] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "instances": inst,
                      "height": h, "width": w})
    return batch


def shapes_detection_batch(n: int, size, seed: int = 0, max_instances: int = 8):
    """``n`` training inputs rendered by the synthetic shapes generator at ``size`` = (H, W) (3 classes)."""
    import numpy as np
    from detectron2.structures import BitMasks, Instances

    from metaspike_d2.data.shapes import render_shapes_image

    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        image, instances = render_shapes_image(rng, tuple(size), max_instances=max_instances)
        inst = Instances(tuple(size))
        masks = BitMasks(torch.from_numpy(np.stack([m for _, m in instances])))
        inst.gt_masks, inst.gt_boxes = masks, masks.get_bounding_boxes()
        inst.gt_classes = torch.tensor([c for c, _ in instances])
        batch.append({"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
                      "instances": inst, "height": size[0], "width": size[1]})
    return batch


def maskrcnn_step_benchmark(config_file: str, *, device: torch.device, batch: int, size, iters: int, warmup: int,
                            precision: str = "fp32", opts=(), inputs: str = "random", num_classes: int | None = None,
                            count_flops: bool = True, seed: int = 0) -> dict:
    """One training step (losses, backward, the config's optimizer) of a Detectron2 model built from
    ``config_file`` without weights, on ``inputs`` = "random" (random pixels and boxes) or "shapes" (rendered)."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from metaspike_d2.d2 import build_optimizer

    extra = ["MODEL.WEIGHTS", ""]
    if num_classes is not None:
        extra += ["MODEL.ROI_HEADS.NUM_CLASSES", num_classes, "MODEL.RETINANET.NUM_CLASSES", num_classes]
    cfg = detection_cfg(config_file, device, [*extra, *opts])
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    if inputs == "random":
        data = random_detection_batch(batch, tuple(size), cfg.MODEL.ROI_HEADS.NUM_CLASSES, seed=seed)
    else:
        data = shapes_detection_batch(batch, tuple(size), seed=seed)
    out = {"config": config_file, "T": cfg.MODEL.METASPIKE.T, "variant": cfg.MODEL.METASPIKE.VARIANT, "batch": batch,
           "size": list(size), "precision": precision, "inputs": inputs,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    with EventStorage():
        out.update(train_step_benchmark(lambda: sum(model(data).values()), optimizer, device=device,
                                        precision=precision, iters=iters, warmup=warmup, count_flops=count_flops))
    del model, optimizer
    free_memory()
    return out


# ----------------------------------------------------------------------------------------------------------------
# part a: device checks
# ----------------------------------------------------------------------------------------------------------------
def classifier_checks(ctx: Ctx, variant: str, time_steps: int, batch: int, size: int,
                      precisions=("fp32", "bf16")) -> list:
    import timm

    import metaspike_d2  # noqa: F401  (registers the timm models)
    from metaspike_d2 import FEATURE_NAMES, MetaSpikeFormer

    dev, name, rows = ctx.device, f"classifier {variant} T={time_steps}", []
    torch.manual_seed(0)
    model = timm.create_model(f"metaspikeformer_{variant}", num_classes=10, T=time_steps)
    with torch.no_grad():  # spikes flow at initialization (as tests/test_backbone.py does)
        model.stem.downsample.bn.weight.fill_(3.0)
    model.to(dev).train()
    img, target = fixed_batch(batch, size, num_classes=10, seed=1)
    img, target = img.to(dev), target.to(dev)
    for precision in precisions:
        model.zero_grad(set_to_none=True)
        with autocast(dev, precision):
            logits = model(img)
            loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        stem = model.stem.downsample.conv.weight.grad
        no_grad4 = [n for n, p in model.named_parameters() if n.startswith("stage4") and p.grad is None]
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        stem_sum = stem.abs().sum().item() if stem is not None else 0.0
        ok = bool(torch.isfinite(loss)) and stem_sum > 0 and not no_grad4 and not bad
        rows.append(check(f"{name} {precision} forward+backward", ok,
                          f"loss {loss.item():.4f}, sum |grad stem conv| {stem_sum:.3g}, logits {str(logits.dtype)[6:]}"
                          + (f", stage4 without grad: {no_grad4[:3]}" if no_grad4 else "")
                          + (f", non-finite grads: {bad[:3]}" if bad else ""),
                          loss=loss.item(), stem_grad_abs_sum=stem_sum))
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad(), strict_fp32():
        a, b = model(img), model(img)
        diff = (a - b).abs().max().item()
        rows.append(check(f"{name} eval: two forwards identical", diff == 0.0, f"max |diff| {diff:.3g}",
                          max_abs_diff=diff))
        if time_steps > 1:  # causality: step t depends only on steps <= t
            model.out_features = FEATURE_NAMES
            model.time_steps = 1
            one = MetaSpikeFormer.forward(model, img)
            model.time_steps = time_steps
            many = MetaSpikeFormer.forward(model, img)
            model.out_features = ("stage4",)
            fractions = {k: close_fraction(many[k][0], one[k][0]) for k in FEATURE_NAMES}
            worst = min(fractions, key=fractions.get)
            rows.append(check(f"{name} eval: T=1 features == step 0 of T={time_steps}", fractions[worst] >= 0.99,
                              f"elements within 1e-4: worst {fractions[worst]:.5f} ({worst})", fractions=fractions))
        if ctx.cuda:
            cpu_model = copy.deepcopy(model).cpu()
            ref = cpu_model(img.cpu())
            d = (a.cpu() - ref).abs().max().item()
            agree = (a.cpu().argmax(1) == ref.argmax(1)).float().mean().item()
            rows.append(check(f"{name} eval: CUDA vs CPU logits (no TF32)", None,
                              f"max |diff| {d:.3g} (|logits| up to {ref.abs().max().item():.3g}), argmax agree {agree:.2f}",
                              max_abs_diff=d, argmax_agreement=agree))
            del cpu_model
    del model
    return rows


def quickstart_batch(cfg, n: int = 2, seed: int = 0):
    """``n`` training inputs for a quickstart config: shapes images at its training size."""
    import numpy as np

    size = (cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN)
    if cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor":
        return shapes_detection_batch(n, size, seed=seed, max_instances=4)
    from metaspike_d2.data.shapes import render_shapes_image
    from metaspike_d2.data.shapes_sem_seg import class_coloured, semantic_label

    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        image, instances = render_shapes_image(rng, size)
        image = class_coloured(image, instances, rng)
        if cfg.INPUT.FORMAT == "BGR":
            image = image[:, :, ::-1]
        batch.append({"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
                      "sem_seg": torch.from_numpy(semantic_label(size, instances).astype(np.int64)),
                      "height": size[0], "width": size[1]})
    return batch


def quickstart_checks(ctx: Ctx, config: str) -> list:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from metaspike_d2.d2 import build_optimizer

    name, rows = Path(config).stem, []
    cfg = detection_cfg(config, ctx.device)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    batch = quickstart_batch(cfg)
    with EventStorage():
        losses = model(batch)
    loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    stem = next(p for n, p in model.named_parameters() if n.endswith("stem.downsample.conv.weight"))
    grad_sum = stem.grad.abs().sum().item() if stem.grad is not None else 0.0
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    before = stem.detach().clone()
    optimizer.step()
    moved = not torch.equal(before, stem.detach())
    ok = bool(torch.isfinite(loss)) and grad_sum > 0 and not bad and moved
    rows.append(check(f"{name} train: losses, backward, optimizer step", ok,
                      ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                      + f" | sum |grad stem conv| {grad_sum:.3g}" + (f", non-finite grads {bad[:3]}" if bad else ""),
                      losses={k: v.item() for k, v in losses.items()}))
    model.eval()
    h, w = batch[0]["height"], batch[0]["width"]
    with torch.no_grad():
        out = model([{"image": x["image"], "height": h, "width": w} for x in batch])
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        seg = out[0]["sem_seg"]
        ok = len(out) == len(batch) and tuple(seg.shape) == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, h, w) \
            and bool(torch.isfinite(seg).all())
        rows.append(check(f"{name} eval: sem_seg output", ok, f"sem_seg {tuple(seg.shape)} on {seg.device.type}"))
    else:
        inst = out[0]["instances"]
        fields = set(inst.get_fields())
        ok = len(out) == len(batch) and {"pred_boxes", "scores", "pred_classes"} <= fields
        if cfg.MODEL.MASK_ON and len(inst):
            ok = ok and tuple(inst.pred_masks.shape[-2:]) == (h, w)
        rows.append(check(f"{name} eval: instances", ok, f"{len(inst)} detections in image 0, fields {sorted(fields)}",
                          detections=len(inst)))
    del model, optimizer
    return rows


def amp_trainer_checks(ctx: Ctx) -> list:
    """SOLVER.AMP.ENABLED: one AMPTrainer step on CUDA (fp16 + GradScaler); on the CPU the documented refusal."""
    from detectron2.engine import AMPTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from metaspike_d2.d2 import build_optimizer
    from metaspike_d2.d2.engine import build_train_loop

    cfg = detection_cfg(DET_QUICKSTART, ctx.device, ["SOLVER.AMP.ENABLED", True])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    loader = itertools.repeat(quickstart_batch(cfg))
    name = "mask_rcnn_metaspike_tiny_shapes SOLVER.AMP.ENABLED"
    if not ctx.cuda:
        try:
            build_train_loop(cfg, model, loader, optimizer)
        except ValueError as e:
            return [check(f"{name}: refused on the CPU", "needs a CUDA model" in str(e), str(e)[:120])]
        return [check(f"{name}: refused on the CPU", False, "no error raised")]
    trainer = build_train_loop(cfg, model, loader, optimizer)
    stem = next(p for n, p in model.named_parameters() if n.endswith("stem.downsample.conv.weight"))
    before = stem.detach().clone()
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
        total = storage.history("total_loss").latest() if "total_loss" in storage.histories() else float("nan")
    moved = not torch.equal(before, stem.detach())
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    ok = isinstance(trainer, AMPTrainer) and math.isfinite(total) and moved and finite
    return [check(f"{name}: one AMPTrainer step (fp16 + GradScaler)", ok,
                  f"{type(trainer).__name__}, total_loss {total:.4f}, stem moved {moved}, parameters finite {finite}",
                  total_loss=total)]


def part_a(ctx: Ctx) -> dict:
    size, batch = ctx.pick(224, 128, 32), ctx.pick(4, 2, 2)
    checks: list = []
    for variant in ("tiny", "15m"):
        for t in (1, 4):
            guarded(checks, f"classifier {variant} T={t}",
                    lambda v=variant, t=t: classifier_checks(ctx, v, t, batch, size))
    for config in (DET_QUICKSTART, SEG_QUICKSTART):
        guarded(checks, Path(config).stem, lambda c=config: quickstart_checks(ctx, c))
    guarded(checks, "SOLVER.AMP.ENABLED", lambda: amp_trainer_checks(ctx))
    return {"checks": checks, "image_size": size, "batch": batch}


# ----------------------------------------------------------------------------------------------------------------
# part b: spikingjelly's LIF on CUDA against the CPU kernels
# ----------------------------------------------------------------------------------------------------------------
def sj_lif_env_info() -> dict:
    """What the installed spikingjelly says about ``SJ_LIF_CUDA_IMPLEMENTATION`` (read from the package itself)."""
    import importlib
    import importlib.util

    import spikingjelly

    base = Path(spikingjelly.__file__).parent
    info = {"spikingjelly_file": str(base), "env_var": None, "exists": False,
            "found_in_source": sorted(str(p.relative_to(base)) for p in base.rglob("*.py")
                                      if LIF_ENV in p.read_text(errors="ignore"))}
    try:
        lif_ops = importlib.import_module("spikingjelly._ops.lif")
        selection = importlib.import_module("spikingjelly._ops.selection")
        sel = lif_ops._selection
        info.update(env_var=sel._environment_variable, exists=sel._environment_variable == LIF_ENV,
                    requested_here=sel._requested, read_at="import of spikingjelly._ops.lif (_CudaSelection)",
                    choices=["auto", *selection._DEFAULT_CUDA_PRIORITY],
                    auto_order_eager=list(selection._DEFAULT_CUDA_PRIORITY),
                    auto_order_compile=list(selection._COMPILE_CUDA_PRIORITIES.get("sj_lif", ())),
                    native_cuda_extension_built=importlib.util.find_spec("spikingjelly._ops.lif._C") is not None)
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def lif_rows(device: torch.device, spatial, seed: int = 0) -> list:
    """Spikes and input gradients of ``MultiStepLIF`` on ``device`` against the CPU kernels on the same inputs.

    On CUDA the candidate is spikingjelly's fused kernel (whatever it selected); on the CPU, spikingjelly's own CPU
    path (``cpu_kernel = False``). References: ``lif_inference_cpu`` (no autograd) and ``LIFSurrogateCPU``."""
    from metaspike_d2.neurons import LIFSurrogateCPU, MultiStepLIF, lif_inference_cpu

    tau, alpha, rows = 2.0, 4.0, []
    for t in (1, 4):
        for threshold in (1.0, 0.5):
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(seed + 100 * t + int(10 * threshold))
                x = torch.randn((t, *spatial), generator=g) * 2
                x.view(-1)[:5] = tau * threshold  # exactly at threshold at t=0 (H = X / tau = V_th): must fire
                x = x.to(dtype)
                grad_out = torch.randn(x.shape, generator=g).to(dtype)
                with torch.no_grad():
                    ref_inference = lif_inference_cpu(x, tau, threshold)
                xr = x.clone().requires_grad_(True)
                ref_spikes = LIFSurrogateCPU.apply(xr, tau, threshold, alpha)
                (ref_spikes * grad_out).sum().backward()
                lif = MultiStepLIF(v_threshold=threshold, tau=tau, surrogate_alpha=alpha)
                if device.type == "cpu":
                    lif.cpu_kernel = False  # spikingjelly's own CPU path
                xd = x.to(device)
                with torch.no_grad():
                    inference = lif(xd).cpu()
                xc = xd.clone().requires_grad_(True)
                spikes = lif(xc)
                (spikes * grad_out.to(device)).sum().backward()
                spikes = spikes.detach().cpu()
                grad, ref_grad = xc.grad.cpu().float(), xr.grad.float()
                grad_diff = (grad - ref_grad).abs().max().item()
                grad_scale = ref_grad.abs().max().item()
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                row = {"T": t, "v_threshold": threshold, "dtype": str(dtype)[6:], "shape": list(x.shape),
                       "firing_rate": ref_spikes.float().mean().item(),
                       "inference_vs_lif_inference_cpu": int((inference != ref_inference).sum()),
                       "inference_vs_LIFSurrogateCPU": int((inference != ref_spikes.detach()).sum()),
                       "train_spikes_vs_LIFSurrogateCPU": int((spikes != ref_spikes.detach()).sum()),
                       "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
                       "grad_rel_diff": grad_diff / max(grad_scale, 1e-30), "grad_tol": tol,
                       "spikes_dtype": str(spikes.dtype)[6:], "grad_dtype": str(xc.grad.dtype)[6:]}
                row["passed"] = (row["inference_vs_lif_inference_cpu"] == 0 and row["inference_vs_LIFSurrogateCPU"] == 0
                                 and row["train_spikes_vs_LIFSurrogateCPU"] == 0 and row["grad_rel_diff"] <= tol
                                 and row["spikes_dtype"] == row["dtype"])
                rows.append(row)
    return rows


def ilif_checks(device: torch.device, spatial, seed: int = 0) -> list:
    """Integer neurons: ``MultiStepILIF`` counts and gradients on ``device`` (spikingjelly's I-LIF kernel on CUDA,
    its CPU op on the CPU) against this project's CPU kernels on the same inputs."""
    from metaspike_d2.neurons import ILIFSurrogateCPU, MultiStepILIF, ilif_inference_cpu

    out = []
    for t in (1, 4):
        for levels in (2, 4):
            g = torch.Generator().manual_seed(seed + 10 * t + levels)
            x = torch.randn((t, *spatial), generator=g) * 3
            grad_out = torch.randn(x.shape, generator=g)
            ilif = MultiStepILIF(1.0, levels)
            with torch.no_grad():
                ref_inference = ilif_inference_cpu(x, ilif.tau, 1.0, levels)
            xr = x.clone().requires_grad_(True)
            ref = ILIFSurrogateCPU.apply(xr, ilif.tau, 1.0, levels)
            (ref * grad_out).sum().backward()
            if device.type == "cpu":
                MultiStepILIF.cpu_kernel = False  # spikingjelly's own CPU op
            try:
                xd = x.to(device).requires_grad_(True)
                counts = ilif(xd)
                (counts * grad_out.to(device)).sum().backward()
                with torch.no_grad():
                    inference = ilif(x.to(device)).cpu()
            finally:
                MultiStepILIF.cpu_kernel = True
            counts = counts.detach().cpu()
            diff = (xd.grad.cpu() - xr.grad).abs().max().item()
            wrong = int((counts != ref.detach()).sum()) + int((inference != ref_inference).sum())
            out.append(check(f"[I-LIF] T={t} D={levels}", wrong == 0 and diff <= 1e-5,
                             f"count mismatches {wrong}; grad max abs diff {diff:.2g}; mean count "
                             f"{ref.float().mean().item():.2f}", T=t, D=levels, count_mismatches=wrong, grad_diff=diff))
    return out


def lif_worker(device: torch.device, spatial) -> dict:
    """Part (b) in this process: which implementation spikingjelly selects, and the comparison rows."""
    out = {"env": os.environ.get(LIF_ENV), "device": device.type}
    if device.type == "cuda":
        from spikingjelly.activation_based.functional import neuron_implementation

        try:
            out["implementation"] = neuron_implementation("lif", device)
        except Exception as e:  # noqa: BLE001 (e.g. "cuda" requested but the native extension was not built)
            out["error"] = f"{type(e).__name__}: {e}"
            return out
    else:
        out["implementation"] = {"implementation": "torch-reference (CPU)", "unavailable": {}}
    try:
        out["rows"] = lif_rows(device, spatial)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    return out


def lif_row_checks(label: str, result: dict) -> list:
    impl = result.get("implementation", {})
    impl_name = impl.get("implementation", "?") if isinstance(impl, dict) else str(impl)
    rows = []
    for r in result.get("rows", []):
        mism = [f"{k} {r[k]}" for k in ("inference_vs_lif_inference_cpu", "inference_vs_LIFSurrogateCPU",
                                        "train_spikes_vs_LIFSurrogateCPU") if r[k]]
        rows.append(check(f"[{label}: {impl_name}] T={r['T']} V_th={r['v_threshold']} {r['dtype']}", r["passed"],
                          ("spikes identical" if not mism else "spike mismatches: " + ", ".join(mism))
                          + f"; grad rel diff {r['grad_rel_diff']:.2g} (tol {r['grad_tol']:g}); firing {r['firing_rate']:.2f}",
                          **{k: v for k, v in r.items() if k != "passed"}))
    return rows


def part_b(ctx: Ctx) -> dict:
    spatial = ctx.pick((8, 64, 32, 32), (4, 32, 16, 16), (3, 5, 7, 7))
    info = sj_lif_env_info()
    checks = []
    here = lif_worker(ctx.device, spatial)
    label = f"this process, {LIF_ENV}={here['env'] or 'unset (auto)'}"
    if "error" in here:
        checks.append(check(f"[{label}]", False, here["error"]))
    checks += lif_row_checks(label, here)
    checks += ilif_checks(ctx.device, spatial)
    workers = {}
    choices = [c for c in info.get("choices", []) if c != "auto"] if info.get("exists") else []
    if ctx.dry and ctx.quick:
        choices = choices[-1:]  # on the CPU the variable changes nothing: one worker checks the plumbing
    for choice in choices:
        env = dict(os.environ, **{LIF_ENV: choice}, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--lif-worker", *(["--dry-run-cpu"] if ctx.dry else []),
               *(["--quick"] if ctx.quick else [])]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.timeout(240))
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("LIF_WORKER_JSON ")), None)
            result = json.loads(line[len("LIF_WORKER_JSON "):]) if line else {
                "error": f"worker exited {proc.returncode} without a result: {proc.stderr[-800:]}"}
        except subprocess.TimeoutExpired:
            result = {"error": "worker timed out"}
        workers[choice] = result
        if "error" in result:
            expected = choice == "cuda" and not info.get("native_cuda_extension_built", False)
            checks.append(check(f"[{LIF_ENV}={choice}]", None if expected else False,
                                ("unavailable, as expected (the PyPI wheel has no native extension): " if expected
                                 else "") + result["error"][:300]))
        checks += lif_row_checks(f"{LIF_ENV}={choice}", result)
    return {"checks": checks, "sj_lif_env": info, "this_process": here, "workers": workers, "shape_per_step": list(spatial)}


# ----------------------------------------------------------------------------------------------------------------
# part c: the quickstarts' training through tools/train_net.py
# ----------------------------------------------------------------------------------------------------------------
def parse_d2_log(text: str) -> dict:
    """Detectron2's ``copypaste:`` evaluation lines and its training-speed lines."""
    lines = text.splitlines()
    results, copypaste = {}, [ln.split("copypaste: ", 1)[1] for ln in lines if "copypaste: " in ln]
    for i, line in enumerate(copypaste):
        if line.startswith("Task: ") and i + 2 < len(copypaste):
            keys, values = copypaste[i + 1].split(","), copypaste[i + 2].split(",")
            metrics = {}
            for k, v in zip(keys, values):
                try:
                    metrics[k.strip()] = float(v)
                except ValueError:
                    pass
            results[line[len("Task: "):].strip()] = metrics
    out = {"results": results, "copypaste": copypaste}
    m = re.search(r"Overall training speed: (\d+) iterations in (\S+) \(([\d.]+) s / it\)", text)
    if m:
        out["training_speed"] = {"iterations": int(m.group(1)), "time": m.group(2), "s_per_it": float(m.group(3))}
    m = re.search(r"Total training time: (\S+)", text)
    if m:
        out["total_training_time"] = m.group(1)
    return out


#: ``--dry-run-cpu`` only: tools/train_net.py run unchanged in this bootstrap, which first truncates the shapes
#: datasets' validation splits to ``argv[1]`` images (a CPU evaluates 100-200 images in minutes, not seconds).
DRY_TRAIN_NET_BOOTSTRAP = (
    "import runpy, sys\n"
    "from detectron2.data import DatasetCatalog\n"
    "import metaspike_d2.data  # registers the shapes datasets\n"
    "n = int(sys.argv.pop(1))\n"
    "for name in [d for d in DatasetCatalog.list() if d.startswith('metaspike_shapes') and d.endswith('_val')]:\n"
    "    load = DatasetCatalog[name]\n"
    "    DatasetCatalog.remove(name)\n"
    "    DatasetCatalog.register(name, lambda load=load: load()[:n])\n"
    "sys.argv = ['tools/train_net.py', *sys.argv[1:]]\n"
    "runpy.run_path('tools/train_net.py', run_name='__main__')\n")


def part_c(ctx: Ctx) -> dict:
    iters = ctx.args.train_iters or ctx.pick(200, 20, 2)
    checks, runs = [], {}
    launcher = ["tools/train_net.py"] if not ctx.dry else ["-c", DRY_TRAIN_NET_BOOTSTRAP, str(ctx.pick(0, 0, 8))]
    jobs = [("detection", DET_QUICKSTART, ("bbox", "segm"), ("AP", "AP50")),
            ("segmentation", SEG_QUICKSTART, ("sem_seg",), ("mIoU", "pACC"))]
    for i, (label, config, tasks, keys) in enumerate(jobs):
        out_dir = ctx.tmp / f"train_{label}"
        cmd = [sys.executable, *launcher, "--config-file", config, "--num-gpus", "1",
               "MODEL.DEVICE", ctx.device.type, "SOLVER.MAX_ITER", str(iters), "CPU_PROCESSES", "1",
               "CPU_THREADS", "0", "OUTPUT_DIR", str(out_dir)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        # leave time for what follows (the other run, parts d and e)
        timeout = ctx.timeout(ctx.pick(240, 150, 600), reserve=ctx.pick(150, 60, 0) + (len(jobs) - i - 1) * 60)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
            log, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""), None
        wall = time.perf_counter() - t0
        (ctx.tmp / f"train_{label}.log").write_text(log)
        parsed = parse_d2_log(log)
        run = {"command": " ".join(cmd if not ctx.dry else [cmd[0], "<dry-run bootstrap: val split truncated to "
                                                            f"{cmd[3]} images>", *cmd[4:]]),
               "returncode": rc, "wall_s": wall, "iterations": iters, **parsed}
        if rc != 0:
            run["log_tail"] = log[-3000:]
        runs[label] = run
        got = {t: parsed["results"].get(t, {}) for t in tasks}
        ok = rc == 0 and all(got[t] for t in tasks)
        value = " | ".join(f"{t} " + ", ".join(f"{k} {fmt(got[t].get(k), 4)}" for k in keys) for t in tasks)
        speed = parsed.get("training_speed", {}).get("s_per_it")
        checks.append(check(f"{label} quickstart, {iters} iterations + evaluation", ok,
                            f"{value} | wall {wall:.0f} s" + (f", {speed:.3f} s/it" if speed else "")
                            + ("" if rc == 0 else f" | exit {rc} (timeout)" if rc is None else f" | exit {rc}"),
                            wall_s=wall, s_per_it=speed, results=got))
    return {"checks": checks, "runs": runs}


# ----------------------------------------------------------------------------------------------------------------
# part d: speed
# ----------------------------------------------------------------------------------------------------------------
def part_d(ctx: Ctx) -> dict:
    dev, checks, out = ctx.device, [], {}
    peak = matmul_peak(dev, ctx.pick(8192, 8192, 256), ctx.pick(20, 10, 3))
    out["bf16_matmul_peak"] = peak
    checks.append(check(f"bf16 matmul {peak['n']}^3 (the peak figures below refer to it)", None,
                        f"{fmt(peak['tflops'])} TFLOP/s", **peak))
    variant = ctx.pick("55m", "55m", "tiny")
    spec = dict(variant=variant, time_steps=4, batch=ctx.pick(32, 8, 2), size=ctx.pick(224, 224, 64),
                precision="bf16", iters=ctx.pick(10, 3, 2), warmup=ctx.pick(3, 2, 1))

    def classifier():
        res = add_rates(classifier_step_benchmark(dev, **spec), spec["batch"], peak["tflops"])
        out["classifier"] = res
        return [bench_check(f"classifier {variant} T=4 train step, batch {spec['batch']}, {spec['size']} px, "
                            f"{spec['precision']}, AdamW",
                            res)]

    guarded(checks, f"classifier {variant} T=4 train step", classifier)
    out["maskrcnn"] = {}
    for precision in ctx.pick(["fp32", "bf16"], ["bf16"], ["bf16"]):
        mspec = dict(batch=ctx.pick(8, 2, 1), size=ctx.pick((800, 1333), (512, 512), (128, 128)),
                     iters=ctx.pick(8, 3, 2), warmup=ctx.pick(3, 2, 1), precision=precision,
                     opts=ctx.pick([], [], DRY_MASK_RCNN_OPTS))

        def maskrcnn(mspec=mspec, precision=precision):
            res = add_rates(maskrcnn_step_benchmark(MASK_RCNN_15M, device=dev, **mspec), mspec["batch"], peak["tflops"])
            out["maskrcnn"][precision] = res
            size = "x".join(map(str, mspec["size"]))
            return [bench_check(f"Mask R-CNN {res['variant']} T={res['T']} train step, batch {mspec['batch']}, {size}, "
                                f"{precision}", res)]

        guarded(checks, f"Mask R-CNN train step {precision}", maskrcnn)
    return {"checks": checks, **out, "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                             "cudnn": torch.backends.cudnn.allow_tf32}}


def bench_check(name: str, res: dict) -> dict:
    value = (f"{fmt(res['images_per_s'])} img/s, step {res['step_s'] * 1e3:.0f} ms (first {res['first_step_s']:.1f} s)"
             f", peak {fmt(res['peak_memory_gib'])} GiB")
    if res.get("tflops"):
        value += f", {fmt(res['tflops'])} TFLOP/s = {100 * res['fraction_of_bf16_peak']:.1f}% of bf16 peak" \
            if res.get("fraction_of_bf16_peak") else f", {fmt(res['tflops'])} TFLOP/s"
    ok = math.isfinite(res["final_loss"])
    return check(name, None if ok else False, value + ("" if ok else f", loss {res['final_loss']}"),
                 **{k: v for k, v in res.items() if k != "eval_logits"})


# ----------------------------------------------------------------------------------------------------------------
# part e: the original model's training step
# ----------------------------------------------------------------------------------------------------------------
class _SigmoidHeaviside(torch.autograd.Function):
    """Heaviside forward, sigmoid'(alpha x) backward (spikingjelly 0.0.0.0.14's ``surrogate.Sigmoid``)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * s * (1 - s), None


class SurrogateLIF(nn.Module):
    """The original's ``MultiStepLIFNode(tau=2, detach_reset=True, backend="torch")`` written out (a Python loop over
    T with autograd): used for part (e) only when spikingjelly 0.0.0.0.14 is not available."""

    def __init__(self, v_threshold: float = 1.0):
        super().__init__()
        self.v_threshold = v_threshold

    def forward(self, x):
        v, out = torch.zeros_like(x[0]), []
        for xt in x:
            h = v + (xt - v) / 2.0
            s = _SigmoidHeaviside.apply(h - self.v_threshold, 4.0)
            v = h * (1 - s.detach())
            out.append(s)
        return torch.stack(out)


def original_worker(spec_path: str) -> int:
    """Part (e)'s other process: the original model with the original's neurons; writes ``spec["result"]``."""
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    result: dict = {"attempts": []}
    import spikingjelly

    result["spikingjelly_file"] = spikingjelly.__file__
    reset_net, legacy = None, None
    try:
        from spikingjelly.clock_driven import functional as legacy_functional
        from spikingjelly.clock_driven import neuron as legacy

        reset_net = legacy_functional.reset_net
        result["cupy"] = getattr(legacy, "cupy", None) is not None
    except ImportError as e:
        result["legacy_import_error"] = f"{type(e).__name__}: {e}"
    from tests.original_reference import RefLIF, Spiking_vit_MetaFormer

    def build(backend):
        torch.manual_seed(0)
        model = Spiking_vit_MetaFormer(list(spec["widths"]), num_classes=1000)
        model.T = spec["T"]
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, RefLIF):
                    lif = (SurrogateLIF(child.v_threshold) if backend == "written-out-torch" else
                           legacy.MultiStepLIFNode(tau=2.0, v_threshold=child.v_threshold, detach_reset=True,
                                                   backend=backend))
                    setattr(module, child_name, lif)
        return model

    images, targets = fixed_batch(spec["batch"], spec["size"])
    images, targets = images.to(device), targets.to(device)
    backends = spec["backends"] if legacy is not None else ["written-out-torch"]
    after = (lambda: reset_net(model)) if reset_net is not None else None  # noqa: F821 (model bound below)
    for backend, precision in itertools.product(backends, spec["precisions"]):
        model = None
        try:
            model = build(backend)
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.to(device).eval()
            with torch.no_grad(), strict_fp32():
                logits = model(images[:spec["logits_batch"]]).float().cpu()
            if after is not None:
                after()
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
            bench = train_step_benchmark(lambda: F.cross_entropy(model(images).float(), targets), optimizer,
                                         device=device, precision=precision, iters=spec["iters"],
                                         warmup=spec["warmup"], after_step=after, count_flops=True)
            torch.save({"state_dict": initial, "eval_logits": logits}, spec["weights"])
            result.update(backend=backend, precision=precision, **bench,
                          params_m=sum(p.numel() for p in model.parameters()) / 1e6)
            break
        except Exception as e:  # noqa: BLE001 (next backend / precision)
            result["attempts"].append({"backend": backend, "precision": precision,
                                       "error": f"{type(e).__name__}: {str(e)[:400]}"})
        finally:
            del model
            free_memory()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def find_legacy_spikingjelly(ctx: Ctx) -> Path | None:
    """A directory holding spikingjelly 0.0.0.0.x: ``--legacy-sj`` (a directory or a wheel), else the wheel that
    benchmarks/gpu_setup.sh downloads into .whl/legacy/ (unpacked into the temp dir)."""
    given = ctx.args.legacy_sj or os.environ.get("METASPIKE_LEGACY_SJ")
    candidates = [Path(given)] if given else [Path(p) for p in sorted(glob.glob(str(ROOT / LEGACY_SJ_GLOB)))]
    for path in candidates:
        if path.is_dir() and (path / "spikingjelly" / "clock_driven").is_dir():
            return path
        if path.is_file() and path.suffix == ".whl":
            target = ctx.tmp / "legacy_spikingjelly"
            with zipfile.ZipFile(path) as zf:
                zf.extractall(target)
            return target
    return None


def part_e(ctx: Ctx) -> dict:
    from metaspike_d2.backbone import VARIANTS
    from metaspike_d2.checkpoint import convert_original_state_dict

    variant = ctx.pick("55m", "55m", "tiny")
    spec = {"device": ctx.device.type, "widths": list(VARIANTS[variant].widths), "T": 4, "batch": ctx.pick(32, 8, 2),
            "size": ctx.pick(224, 224, 64), "iters": ctx.pick(10, 3, 2), "warmup": ctx.pick(3, 2, 1), "logits_batch": 2,
            "precisions": ["bf16", "fp16"] if ctx.cuda else ["bf16"],
            "backends": ["cupy", "torch"] if ctx.cuda else ["torch"],
            "weights": str(ctx.tmp / "original_init.pt"), "result": str(ctx.tmp / "original_result.json")}
    spec_path = ctx.tmp / "original_spec.json"
    spec_path.write_text(json.dumps(spec))
    legacy = find_legacy_spikingjelly(ctx)
    path = [str(legacy)] if legacy else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*path, str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--original-worker", str(spec_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx.timeout(300))
    worker_wall = time.perf_counter() - t0
    if not Path(spec["result"]).exists():
        raise RuntimeError(f"original worker exited {proc.returncode} without a result: {proc.stderr[-1500:]}")
    orig = json.loads(Path(spec["result"]).read_text())
    orig["worker_wall_s"] = worker_wall
    orig["legacy_spikingjelly"] = str(legacy) if legacy else None
    checks = []
    label = f"original {variant} T=4 ({orig.get('backend', '?')} neurons)"
    if "step_s" not in orig:
        checks.append(check(label, False, "no backend/precision ran: " + "; ".join(
            f"{a['backend']}/{a['precision']}: {a['error'][:120]}" for a in orig["attempts"])))
        return {"checks": checks, "original": orig}
    for a in orig["attempts"]:
        checks.append(check(f"original: {a['backend']} neurons at {a['precision']}", None, "did not run: " + a["error"][:200]))
    add_rates(orig, spec["batch"], None)
    checks.append(check(f"{label} train step, batch {spec['batch']}, {spec['size']} px, {orig['precision']}", None,
                        f"{fmt(orig['images_per_s'])} img/s, step {orig['step_s'] * 1e3:.0f} ms, "
                        f"peak {fmt(orig['peak_memory_gib'])} GiB, spikingjelly {orig['spikingjelly_file']}",
                        **{k: v for k, v in orig.items() if k != "attempts"}))
    saved = torch.load(spec["weights"], map_location="cpu", weights_only=True)
    ours = classifier_step_benchmark(ctx.device, variant=variant, time_steps=4, batch=spec["batch"], size=spec["size"],
                                     precision=orig["precision"], iters=spec["iters"], warmup=spec["warmup"],
                                     state_dict=convert_original_state_dict(saved["state_dict"]),
                                     logits_batch=spec["logits_batch"])
    add_rates(ours, spec["batch"], None)
    ours_logits = ours.pop("eval_logits")
    ratio = orig["step_s"] / ours["step_s"]
    checks.append(check(f"ours {variant} T=4 train step, same batch and weights, {orig['precision']}", None,
                        f"{fmt(ours['images_per_s'])} img/s, step {ours['step_s'] * 1e3:.0f} ms, "
                        f"peak {fmt(ours['peak_memory_gib'])} GiB", **ours))
    mem_ratio = (orig["peak_memory_gib"] / ours["peak_memory_gib"]) if orig.get("peak_memory_gib") and ours.get(
        "peak_memory_gib") else None
    checks.append(check("original step time / ours", None, f"x{ratio:.2f} (above 1: ours is faster)"
                        + (f"; peak memory original / ours x{mem_ratio:.2f}" if mem_ratio else ""),
                        ratio=ratio, memory_ratio=mem_ratio))
    d = (ours_logits - saved["eval_logits"]).abs().max().item()
    scale = saved["eval_logits"].abs().max().item()
    checks.append(check("eval logits, original vs ours (converted weights, fp32, no TF32)",
                        d <= 1e-3 * max(1.0, scale) if not ctx.cuda else None,
                        f"max |diff| {d:.3g} (|logits| up to {scale:.3g})", max_abs_diff=d))
    return {"checks": checks, "original": orig, "ours": ours, "ratio_original_over_ours": ratio}


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
PARTS = {"a": ("device checks", part_a), "b": ("LIF kernels vs CPU kernels", part_b),
         "c": ("quickstart training", part_c), "d": ("speed", part_d), "e": ("original vs ours", part_e)}


def meta_info(ctx: Ctx) -> dict:
    meta = {"argv": sys.argv, "dry_run_cpu": ctx.dry, "quick": ctx.quick, "device": ctx.device.type,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), LIF_ENV: os.environ.get(LIF_ENV),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=gib(props.total_memory),
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    import importlib.metadata

    for name in ("spikingjelly", "triton", "detectron2", "timm", "cupy", "torchvision"):
        try:
            module = __import__(name)
            meta[name] = getattr(module, "__version__", None)
            if meta[name] is None:  # spikingjelly has no __version__
                dists = importlib.metadata.packages_distributions().get(name, [])
                meta[name] = importlib.metadata.version(dists[0]) if dists else "?"
        except Exception as e:  # noqa: BLE001
            meta[name] = f"not importable: {type(e).__name__}"
    return meta


def print_table(report: dict) -> None:
    meta = report["meta"]
    where = meta.get("gpu") or "CPU dry run"
    print(f"\n== summary: metaspike-d2 GPU check on {where} | torch {meta['torch']} | cuda {meta['cuda']} | "
          f"spikingjelly {meta['spikingjelly']} | triton {meta['triton']}"
          f"{' | --quick' if meta['quick'] else ''}{' | --dry-run-cpu' if meta['dry_run_cpu'] else ''} ==")
    print(f"{'part':<5} {'status':<8} {'wall s':>7}  what")
    for key, part in report["parts"].items():
        print(f"{key:<5} {part['status']:<8} {part.get('wall_s', 0):>7.1f}  {PARTS[key][0]}")
    for key, part in report["parts"].items():
        print(f"\n-- part {key}: {PARTS[key][0]} ({part['status']}) --")
        width = min(72, max([len(c["name"]) for c in part.get("checks", [])] + [10]))
        for c in part.get("checks", []):
            mark = {True: "ok", False: "FAIL", None: "info"}[c["passed"]]
            print(f"{mark:<4}  {c['name']:<{width}}  {c['value']}")
    print(f"\ntotal {report['wall_s']:.1f} s; JSON: {report['output']}")


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e (default: all)")
    parser.add_argument("--quick", action="store_true", help="shrink everything (a smoke run)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the same code paths on the CPU at tiny sizes (tests the script itself)")
    parser.add_argument("--output", default=None,
                        help="JSON of all figures (default benchmarks/results/gpu.json; "
                             "with --dry-run-cpu benchmarks/results/gpu_dry_run_cpu.json)")
    parser.add_argument("--train-iters", type=int, default=None, help="part c: SOLVER.MAX_ITER (default 200)")
    parser.add_argument("--legacy-sj", default=None,
                        help="part e: spikingjelly 0.0.0.0.x as a directory or wheel (default: " + LEGACY_SJ_GLOB + ")")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds; parts that would start later are skipped (default 560 on a GPU, 1800 dry)")
    parser.add_argument("--lif-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--original-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.original_worker:
        return original_worker(args.original_worker)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    if args.lif_worker:
        if args.dry_run_cpu:
            torch.set_num_threads(1)
        device = torch.device("cpu" if args.dry_run_cpu else "cuda")
        spatial = (3, 5, 7, 7) if args.dry_run_cpu else ((4, 32, 16, 16) if args.quick else (8, 64, 32, 32))
        print("LIF_WORKER_JSON " + json.dumps(jsonable(lif_worker(device, spatial))))
        return 0
    if args.dry_run_cpu:  # a dry run tests code paths, not speed: one thread each (spinning OpenMP threads on a
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # shared CPU make convolutions 10-50x slower; conftest.py)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.time_limit is None:
        args.time_limit = 1800.0 if args.dry_run_cpu else 560.0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    output = Path(args.output or ("benchmarks/results/gpu_dry_run_cpu.json" if args.dry_run_cpu
                                  else "benchmarks/results/gpu.json"))
    if not output.is_absolute():
        output = Path.cwd() / output
    ctx = Ctx(args)
    report = {"meta": meta_info(ctx), "parts": {}, "output": str(output)}
    print(f"metaspike-d2 GPU check: parts {','.join(parts)} on {report['meta'].get('gpu', 'the CPU (dry run)')}",
          flush=True)
    for key in parts:
        if ctx.remaining() < 20:
            report["parts"][key] = {"status": "skipped", "checks": [check("time limit", False,
                                                                          f"--time-limit {args.time_limit:.0f} s reached")]}
            continue
        print(f"[{time.perf_counter() - ctx.start:6.1f} s] part {key}: {PARTS[key][0]} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = PARTS[key][1](ctx)
            failed = any(c["passed"] is False for c in result["checks"])
            result["status"] = "failed" if failed else "passed"
        except Exception as e:  # noqa: BLE001 (one part's failure must not stop the others)
            result = {"status": "error", "traceback": traceback.format_exc(),
                      "checks": [check("part raised", False, f"{type(e).__name__}: {str(e)[:400]}")]}
        result["wall_s"] = time.perf_counter() - t0
        report["parts"][key] = result
        free_memory()
        for c in result["checks"]:
            print(f"    {({True: 'ok', False: 'FAIL', None: 'info'})[c['passed']]:<4}  {c['name']}: {c['value']}",
                  flush=True)
    report["wall_s"] = time.perf_counter() - ctx.start
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(jsonable(report), indent=1) + "\n")
    print_table(report)
    shutil.rmtree(ctx.tmp, ignore_errors=True)
    return 0 if all(p["status"] == "passed" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
