"""Speed benchmarks in one run, with ratios against baselines measured in the same run.

    python benchmarks/run.py --output benchmarks/results/cpu.json [--parts backbone maskrcnn train quickstart roi_align ema]
                             [--threads 2] [--reps 3] [--size 224] [--det-size 512]
    python benchmarks/run.py --output benchmarks/results/cpu_processes.json --parts processes  # not a default part
    python benchmarks/run.py --output benchmarks/results/spike_levels.json --parts spike_levels --threads 1
    python benchmarks/run.py --output benchmarks/results/deploy.json --parts deploy --threads 2

Parts (CPU, batch 1, eval mode and ``torch.inference_mode`` for inference):

``backbone``  Meta-SpikeFormer 15M and 55M at ``--size``, T=1 and T=4, in four forms:
              ``train/sj``  the training form, neurons on spikingjelly's CPU path (the baseline);
              ``train``     the training form with the forward-only CPU LIF (``MultiStepLIF`` default);
              ``fast``      ``reparameterize(model, "fast")`` (+ the CPU LIF): the inference fast path;
              ``spike``     ``reparameterize(model, "spike")``: every conv on spikes (more MACs).
``maskrcnn``  Mask R-CNN inference on a ``--det-size`` image: the 15M spiking Mask R-CNN
              (configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T{1,4}.yaml) in training
              form and fast path vs Detectron2's R50-FPN Mask R-CNN (model-zoo config
              ``mask_rcnn_R_50_FPN_3x``), all built without weights.
``train``     one training step (forward with losses, backward, SGD step) of the same Mask R-CNNs on
              one ``--det-size`` image with 3 random boxes and masks.
``quickstart`` one training step of one process of the detection quickstart
              (configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml: 2 images of 160x160 per process, AdamW),
              each form with its own model and optimizer, each adding one change:
              ``baseline``          neurons on spikingjelly's CPU op, torch's default (for-loop) AdamW,
                                    NCHW depthwise convs (the quickstart before the CPU training paths);
              ``+ CPU LIF``         neurons on ``LIFSurrogateCPU``;
              ``+ fused AdamW``     the fused AdamW that ``build_optimizer`` builds;
              ``+ NHWC depthwise``  depthwise convs in channels_last (``DepthwiseConv2d``);
              ``+ matmul RoIAlign`` the box and mask poolers on ``roi_align_matmul``: the quickstart as
                                    configured (``MODEL.METASPIKE.ROI_ALIGN_KERNEL: "matmul"``).
``roi_align`` forward + backward of one RoIAlign level, torchvision's ``roi_align`` (the baseline) vs
              ``roi_align_matmul`` (metaspike_d2/d2/roi_align.py), aligned, adaptive sampling (ratio 0):
              ``quickstart``  96 RoIs of 28-112 px on the quickstart's p2 (2 x 64 x 40 x 40, stride 4);
              ``coco-p2``     512 RoIs of 32-224 px on p2 of a 512x512 image (2 x 256 x 128 x 128), where the
                              dense matmul form does more arithmetic and needs far more memory than
                              torchvision's loop (which stays the default kernel).
``processes`` the quickstart's training loop (``tools/train_net.py``, ``--process-iters`` iterations, no
              evaluation) in one process at 2 images per step (the baseline) vs ``CPU_PROCESSES 2`` at 2
              images per process (the committed config, 4 per step); runs alternate, ``--process-reps`` each.
              Reported: seconds per step from Detectron2's "Overall training speed" line (it leaves out the
              first iterations), and images per second. ``--threads`` does not apply (the config's
              ``CPU_THREADS: 1`` does). Not in the default parts: it takes minutes and needs both cores to itself.
``spike_levels`` integer I-LIF neurons (D=4) against binary LIF (D=1):
              ``I-LIF neuron``  one I-LIF on a ``1 x 4 x 64 x 40 x 40`` input (the quickstart's p2 at T=1),
                                forward + backward: spikingjelly's CPU op (the baseline) vs ``ILIFSurrogateCPU``;
                                and forward only (inference): spikingjelly vs ``ilif_inference_cpu``;
              ``quickstart``    one training step of the detection quickstart (as ``quickstart``, the config as
                                committed) at ``MODEL.METASPIKE.SPIKE_LEVELS`` 1 (the baseline) and 4.
``deploy``    inference of the deployable forms, batch 1, ``--threads`` threads everywhere:
              the 55M classifier at ``--size`` (T=1 and T=4) and the 15M Mask R-CNN (T=1) at ``--det-size``:
              ``train/sj``     the training form with spikingjelly's CPU neurons: the original code's
                               computation (the baseline of every ratio);
              ``fast``         ``reparameterize(model, "fast")`` in PyTorch (eager);
              ``onnxruntime``  the exported graph (``tools/export_model.py``) on ONNX Runtime;
              ``openvino``     the same graph on OpenVINO (float32);
              ``... bf16``     PyTorch autocast / OpenVINO in bfloat16, only where the CPU has bf16 units
                               (a row says when it has not);
              and Detectron2's R50-FPN Mask R-CNN in PyTorch. Each row also gives the multiply-adds
              (fvcore's count of the fast model: convolutions, linear layers and matrix products) as
              achieved GFLOP/s (2 x MACs / time) and as a share of this CPU's peak, measured in the same
              run as a 2048 x 2048 float32 GEMM on the same threads.
``ema``       one ``MODEL_EMA`` update of the quickstart detector's weights: timm's ``ModelEmaV3`` (the
              baseline, two ``state_dict()`` walks per update) vs the hook's ``_ModelEma`` (tensor lists
              gathered once; metaspike_d2/d2/ema.py).

Each case: one warm-up, then ``--reps`` repetitions, interleaved round-robin with the cases it is
compared to. Reported: median wall time, median process CPU time, peak resident-memory increase
(see benchmarks/backbone.py). Ratios use medians of the same run. Not a test: nothing is asserted.
The table is printed and everything is written as JSON to ``--output``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backbone import forward_fn, machine_info, measure_interleaved  # noqa: E402

from metaspike_d2 import MetaSpikeFormer, MultiStepLIF, reparameterize  # noqa: E402
from metaspike_d2.blocks import DepthwiseConv2d  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_baseline_kernels(fn, *, lif: bool = True, depthwise: bool = False):
    """Run ``fn`` with the pre-optimization CPU paths: every MultiStepLIF on spikingjelly's CPU op
    (``lif``) and/or every depthwise conv in NCHW (``depthwise``)."""
    def run():
        MultiStepLIF.cpu_kernel = not lif
        DepthwiseConv2d.cpu_channels_last = not depthwise
        try:
            return fn()
        finally:
            MultiStepLIF.cpu_kernel = True
            DepthwiseConv2d.cpu_channels_last = True
    return run


def _row(part, name, res, **extra):
    return {"part": part, "case": name, **extra, **res}


# --------------------------------------------------------------------------------------------------
def bench_backbone(args, rows):
    x = torch.randn(1, 3, args.size, args.size)
    for variant in args.variants:
        for t in (1, 4):
            torch.manual_seed(0)
            model = MetaSpikeFormer(variant=variant, time_steps=t).eval()
            cases = {
                "train/sj": with_baseline_kernels(forward_fn(model, x)),
                "train": forward_fn(model, x),
                "fast": forward_fn(reparameterize(model, "fast"), x),
                "spike": forward_fn(reparameterize(model, "spike"), x),
            }
            print(f"[backbone] {variant} T={t} ...", flush=True)
            res = measure_interleaved(cases, reps=args.reps)
            for name, r in res.items():
                rows.append(_row("backbone", name, r, variant=variant, T=t, input=f"{args.size}x{args.size}"))
            del model, cases
            gc.collect()


# --------------------------------------------------------------------------------------------------
def _d2_cfg(path, extra=()):
    from detectron2.config import get_cfg

    import metaspike_d2.d2 as md2

    cfg = get_cfg()
    md2.add_metaspike_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *extra])
    return cfg


def _detectors():
    """name -> cfg for the spiking 15M Mask R-CNN at T=1/T=4 and Detectron2's R50-FPN Mask R-CNN."""
    from detectron2 import model_zoo

    inst = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation")
    return {
        "metaspike-15m T=1": _d2_cfg(os.path.join(inst, "mask_rcnn_metaspike_15m_FPN_T1.yaml")),
        "metaspike-15m T=4": _d2_cfg(os.path.join(inst, "mask_rcnn_metaspike_15m_FPN_T4.yaml")),
        "R50-FPN": _d2_cfg(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")),
    }


def _build(cfg):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(cfg)


def bench_maskrcnn(args, rows):
    size = args.det_size
    image = torch.rand(3, size, size) * 255
    inputs = [{"image": image, "height": size, "width": size}]
    cases = {}
    for name, cfg in _detectors().items():
        model = _build(cfg).eval()
        if name.startswith("metaspike"):
            if name.endswith("T=1"):  # the training form once, to show what the fast path gains
                cases[f"{name} train/sj"] = with_baseline_kernels(forward_fn(model, inputs))
            cases[f"{name} fast"] = forward_fn(reparameterize(model, "fast"), inputs)
        else:
            cases[name] = forward_fn(model, inputs)
    print(f"[maskrcnn] {list(cases)} ...", flush=True)
    res = measure_interleaved(cases, reps=args.reps)
    for name, r in res.items():
        rows.append(_row("maskrcnn", name, r, input=f"{size}x{size}"))


def _train_inputs(size):
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[40.0, 60.0, 200.0, 240.0], [250.0, 100.0, 420.0, 300.0], [100.0, 300.0, 380.0, 480.0]])
    boxes = boxes * size / 512
    masks = torch.zeros(3, size, size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 5, 17]),
                     gt_masks=BitMasks(masks))
    return [{"image": torch.rand(3, size, size, generator=g) * 255, "height": size, "width": size,
             "instances": inst}]


def _training_step(model, opt, batch):
    """One Detectron2 training step as a callable: forward with losses, backward, optimizer step."""
    from detectron2.utils.events import EventStorage

    def step():
        with EventStorage(0):  # Detectron2's losses log into an event storage
            losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)
    return step


def bench_train(args, rows):
    batch = _train_inputs(args.det_size)
    cases = {}
    for name, cfg in _detectors().items():
        model = _build(cfg).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
        cases[name] = _training_step(model, opt, batch)
    print(f"[train] {list(cases)} ...", flush=True)
    res = measure_interleaved(cases, reps=args.train_reps)
    for name, r in res.items():
        rows.append(_row("train", name, r, input=f"{args.det_size}x{args.det_size}"))


def bench_quickstart(args, rows):
    from metaspike_d2.d2 import build_optimizer

    cfg = _d2_cfg(os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_metaspike_tiny_shapes.yaml"))
    batch = []
    for i in range(cfg.SOLVER.IMS_PER_BATCH // cfg.CPU_PROCESSES):  # one process's share of the batch
        image = _train_inputs(160)[0]
        image["instances"].gt_classes = torch.tensor([0, 1, 2])
        image["image"] = image["image"].roll(40 * i, dims=-1)
        batch.append(image)

    torchvision_cfg = cfg.clone()
    torchvision_cfg.MODEL.METASPIKE.ROI_ALIGN_KERNEL = "torchvision"

    def make_step(cpu_lif: bool, fused: bool, nhwc_depthwise: bool, matmul_roi_align: bool = False):
        model = _build(cfg if matmul_roi_align else torchvision_cfg).train()
        opt = build_optimizer(cfg, model)
        for group in opt.param_groups:  # the full update runs, but the weights (and so the number of
            group["lr"] = 0.0           # proposals and positive RoIs) stay those of the initialization
        if not fused:
            opt.defaults["fused"] = False
            for group in opt.param_groups:
                group["fused"] = False
        return with_baseline_kernels(_training_step(model, opt, batch), lif=not cpu_lif,
                                     depthwise=not nhwc_depthwise)

    cases = {"baseline": make_step(False, False, False), "+ CPU LIF": make_step(True, False, False),
             "+ fused AdamW": make_step(True, True, False), "+ NHWC depthwise": make_step(True, True, True),
             "+ matmul RoIAlign": make_step(True, True, True, matmul_roi_align=True)}
    print(f"[quickstart] {list(cases)} ...", flush=True)
    res = measure_interleaved(cases, reps=args.quickstart_reps, warmup=3)
    for name, r in res.items():
        rows.append(_row("quickstart", name, r, input="2x160x160"))


def bench_spike_levels(args, rows):
    from metaspike_d2.d2 import build_optimizer
    from metaspike_d2.neurons import MultiStepILIF

    x = torch.randn(1, 4, 64, 40, 40) * 2
    grad = torch.randn_like(x)
    ilif = MultiStepILIF(1.0, 4)

    def neuron(cpu_kernel: bool, backward: bool):
        def run():
            MultiStepILIF.cpu_kernel = cpu_kernel
            try:
                if not backward:
                    with torch.no_grad():
                        return ilif(x)
                xg = x.detach().requires_grad_()
                ilif(xg).backward(grad)
                return xg.grad
            finally:
                MultiStepILIF.cpu_kernel = True
        return run

    for mode, backward in (("train", True), ("inference", False)):
        cases = {f"I-LIF {mode} spikingjelly": neuron(False, backward), f"I-LIF {mode} ours": neuron(True, backward)}
        print(f"[spike_levels] {list(cases)} ...", flush=True)
        for name, r in measure_interleaved(cases, reps=max(args.quickstart_reps, 20), warmup=3).items():
            rows.append(_row("spike_levels", name, r, input="1x4x64x40x40"))

    path = os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_metaspike_tiny_shapes.yaml")
    cases = {}
    for levels in (1, 4):
        cfg = _d2_cfg(path, ["MODEL.METASPIKE.SPIKE_LEVELS", levels])
        batch = []
        for i in range(cfg.SOLVER.IMS_PER_BATCH // cfg.CPU_PROCESSES):
            image = _train_inputs(160)[0]
            image["instances"].gt_classes = torch.tensor([0, 1, 2])
            image["image"] = image["image"].roll(40 * i, dims=-1)
            batch.append(image)
        torch.manual_seed(0)
        model = _build(cfg).train()
        opt = build_optimizer(cfg, model)
        for group in opt.param_groups:  # weights (and so proposals and RoIs) stay those of the initialization
            group["lr"] = 0.0
        cases[f"quickstart step D={levels}"] = _training_step(model, opt, batch)
    print(f"[spike_levels] {list(cases)} ...", flush=True)
    for name, r in measure_interleaved(cases, reps=args.quickstart_reps, warmup=3).items():
        rows.append(_row("spike_levels", name, r, input="2x160x160"))


def _random_rois(num, image_size, min_side, max_side, num_images, generator):
    """``(num, 5)`` RoIs (image index, x1, y1, x2, y2) with sides in ``[min_side, max_side)``, inside the image."""
    side = min_side + torch.rand(num, 2, generator=generator) * (max_side - min_side)
    start = torch.rand(num, 2, generator=generator) * (image_size - side)
    index = torch.randint(0, num_images, (num, 1), generator=generator).float()
    return torch.cat([index, start, start + side], 1)


def bench_roi_align(args, rows):
    from torchvision.ops import roi_align

    from metaspike_d2.d2.roi_align import roi_align_matmul

    g = torch.Generator().manual_seed(0)
    settings = {"quickstart": ((2, 64, 40, 40), 0.25, _random_rois(96, 160, 28, 112, 2, g)),
                "coco-p2": ((2, 256, 128, 128), 0.25, _random_rois(512, 512, 32, 224, 2, g))}
    for setting, (shape, scale, rois) in settings.items():
        features = torch.randn(*shape, generator=g).requires_grad_(True)
        grad = torch.randn(rois.shape[0], shape[1], 7, 7, generator=g)

        def step(op):
            def run():
                op(features, rois, 7, scale, 0, True).backward(grad)
                features.grad = None
            return run

        cases = {"torchvision": step(roi_align), "matmul": step(roi_align_matmul)}
        print(f"[roi_align] {setting}: {list(cases)} ...", flush=True)
        res = measure_interleaved(cases, reps=args.quickstart_reps, warmup=2)
        for name, r in res.items():
            rows.append(_row("roi_align", name, r, setting=setting, features="x".join(map(str, shape)),
                             rois=rois.shape[0]))


def bench_processes(args, rows):
    config = os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_metaspike_tiny_shapes.yaml")
    cases = {"1 process x 2 images": (2, ["--num-gpus", "1", "SOLVER.IMS_PER_BATCH", "2"]),
             "2 processes x 2 images": (4, ["CPU_PROCESSES", "2", "SOLVER.IMS_PER_BATCH", "4"])}
    step_s = {name: [] for name in cases}
    print(f"[processes] {list(cases)} x {args.process_reps}, {args.process_iters} iterations each ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_processes_") as tmp:
        for rep in range(args.process_reps):
            for i, (name, (_, opts)) in enumerate(cases.items()):
                cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", config, *opts,
                       "SOLVER.MAX_ITER", str(args.process_iters), "DATASETS.TEST", "()",
                       "OUTPUT_DIR", os.path.join(tmp, f"{rep}_{i}")]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                log = proc.stdout + proc.stderr
                found = re.search(r"Overall training speed: \d+ iterations in \S+ \(([\d.]+) s / it\)", log)
                if proc.returncode != 0 or found is None:
                    raise RuntimeError(f"[processes] {' '.join(cmd)} failed (exit {proc.returncode}):\n{log[-3000:]}")
                step_s[name].append(float(found.group(1)))
                print(f"  {name}: {step_s[name][-1]:.3f} s / step", flush=True)
    for name, (images, _) in cases.items():
        median = statistics.median(step_s[name])
        rows.append(_row("processes", name, {"median_s": median, "median_cpu_s": float("nan"), "peak_mem_mib": None,
                                             "all_s": step_s[name], "images_per_s": images / median},
                         input=f"{images}x160x160"))


def bench_ema(args, rows):
    from timm.utils import ModelEmaV3

    from metaspike_d2.d2.ema import _ModelEma

    cfg = _d2_cfg(os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_metaspike_tiny_shapes.yaml"))
    model = _build(cfg).train()
    emas = {"timm ModelEmaV3": ModelEmaV3(model, decay=0.998), "_ModelEma": _ModelEma(model, decay=0.998)}
    cases = {name: (lambda ema=ema: ema.update(model, step=1000)) for name, ema in emas.items()}
    print(f"[ema] {list(cases)} ...", flush=True)
    res = measure_interleaved(cases, reps=args.quickstart_reps, warmup=3)
    for name, r in res.items():
        rows.append(_row("ema", name, r, tensors=len(model.state_dict())))


# --------------------------------------------------------------------------------------------------
def _gemm_peak_gflops(threads: int) -> float:
    """This CPU's float32 matrix-multiply throughput on ``threads`` threads: the best of 5 2048^3 GEMMs."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bf16_supported() -> bool:
    return bool(getattr(torch.backends.mkldnn, "is_bf16_supported", lambda: False)())


def _graph_fn(session, *arrays):
    return lambda: session(*arrays)


def bench_deploy(args, rows):
    import numpy as np
    import timm
    from detectron2.utils.analysis import FlopCountAnalysis

    from metaspike_d2.d2.export import ExportedModel, export_detectron2_model
    from metaspike_d2.export import export_classifier
    from metaspike_d2.runtime import GraphSession

    peak = _gemm_peak_gflops(args.threads)
    print(f"[deploy] float32 GEMM peak on {args.threads} threads: {peak:.1f} GFLOP/s", flush=True)
    bf16 = _bf16_supported()
    work = tempfile.mkdtemp(prefix="metaspike_deploy_")
    x = torch.randn(1, 3, args.size, args.size)
    for t in (1, 4):
        torch.manual_seed(0)
        model = timm.create_model("metaspikeformer_55m", T=t).eval()
        fast = reparameterize(model, "fast")
        path = export_classifier(model, os.path.join(work, f"55m_t{t}.onnx"), image_size=args.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            macs = FlopCountAnalysis(fast, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
        cases = {
            "train/sj": with_baseline_kernels(forward_fn(model, x)),
            "fast": forward_fn(fast, x),
            "onnxruntime": _graph_fn(GraphSession(path, "onnxruntime", args.threads), x.numpy()),
            "openvino": _graph_fn(GraphSession(path, "openvino", args.threads), x.numpy()),
        }
        if bf16:
            cases["fast bf16"] = _autocast_bf16(forward_fn(fast, x))
        print(f"[deploy] 55M classifier T={t}: {list(cases)} ...", flush=True)
        res = measure_interleaved(cases, reps=args.reps)
        for name, r in res.items():
            rows.append(_row("deploy", name, r, variant="55m classifier", T=t, input=f"{args.size}x{args.size}",
                             macs=macs, peak_gflops=peak))
        del model, fast, cases
        gc.collect()
    size = args.det_size
    image = torch.rand(3, size, size) * 255
    inputs = [{"image": image, "height": size, "width": size}]
    detectors = _detectors()
    cfg = detectors["metaspike-15m T=1"]
    model = _build(cfg).eval()
    fast = reparameterize(model, "fast")
    path = export_detectron2_model(model, cfg, os.path.join(work, "mask_rcnn_15m_t1.onnx"))
    r50 = _build(detectors["R50-FPN"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs = {name: FlopCountAnalysis(m, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
                for name, m in (("15m", fast), ("r50", r50))}
    cases = {
        "train/sj": with_baseline_kernels(forward_fn(model, inputs)),
        "fast": forward_fn(fast, inputs),
        "onnxruntime": forward_fn(ExportedModel(cfg, path, "onnxruntime", args.threads), inputs),
        "openvino": forward_fn(ExportedModel(cfg, path, "openvino", args.threads), inputs),
        "R50-FPN": forward_fn(r50, inputs),
    }
    print(f"[deploy] 15M Mask R-CNN T=1 and R50-FPN at {size}: {list(cases)} ...", flush=True)
    res = measure_interleaved(cases, reps=args.reps)
    for name, r in res.items():
        rows.append(_row("deploy", name, r, variant="15m mask r-cnn" if name != "R50-FPN" else "R50-FPN mask r-cnn",
                         T=1, input=f"{size}x{size}", macs=macs["r50" if name == "R50-FPN" else "15m"], peak_gflops=peak))
    if not bf16:
        print("[deploy] bf16: not offered on this CPU (torch.backends.mkldnn.is_bf16_supported() is False)", flush=True)
    shutil.rmtree(work, ignore_errors=True)


def _autocast_bf16(fn):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return run


def ratios(rows):
    """Speed-ups of the same run: backbone vs train/sj, T=4 vs T=1, detectors vs R50-FPN."""
    out = []
    key = {(r["part"], r.get("variant"), r.get("T"), r["case"]): r for r in rows}
    for r in rows:
        if r["part"] == "backbone":
            base = key.get(("backbone", r["variant"], r["T"], "train/sj"))
            t1 = key.get(("backbone", r["variant"], 1, r["case"]))
            out.append({"part": "backbone", "variant": r["variant"], "T": r["T"], "case": r["case"],
                        "speedup_vs_train_sj_wall": base["median_s"] / r["median_s"],
                        "speedup_vs_train_sj_cpu": base["median_cpu_s"] / r["median_cpu_s"],
                        "T4_over_T1_wall": (r["median_s"] / t1["median_s"]) if r["T"] == 4 else None,
                        "T4_over_T1_cpu": (r["median_cpu_s"] / t1["median_cpu_s"]) if r["T"] == 4 else None})
        elif r["part"] == "deploy":
            base = key[("deploy", r["variant"].replace("R50-FPN", "15m"), r["T"], "train/sj")]
            r50 = key.get(("deploy", "R50-FPN mask r-cnn", 1, "R50-FPN")) if "mask" in r["variant"] else None
            gflops = 2 * r["macs"] / r["median_s"] / 1e9
            out.append({"part": "deploy", "variant": r["variant"], "T": r["T"], "case": r["case"],
                        "speedup_vs_train_sj_wall": base["median_s"] / r["median_s"],
                        "speedup_vs_train_sj_cpu": base["median_cpu_s"] / r["median_cpu_s"],
                        "time_over_R50_wall": r["median_s"] / r50["median_s"] if r50 else None,
                        "gflops": gflops, "share_of_peak": gflops / r["peak_gflops"]})
        elif r["part"] == "roi_align":
            base = next(b for b in rows if b["part"] == "roi_align" and b["setting"] == r["setting"]
                        and b["case"] == "torchvision")
            out.append({"part": r["part"], "setting": r["setting"], "case": r["case"],
                        "speedup_vs_baseline_wall": base["median_s"] / r["median_s"],
                        "speedup_vs_baseline_cpu": base["median_cpu_s"] / r["median_cpu_s"]})
        elif r["part"] == "processes":
            base = key[("processes", None, None, "1 process x 2 images")]
            out.append({"part": r["part"], "case": r["case"], "step_time_vs_baseline": r["median_s"] / base["median_s"],
                        "images_per_s_vs_baseline": r["images_per_s"] / base["images_per_s"]})
        elif r["part"] == "spike_levels":
            base_name = {"I-LIF train ours": "I-LIF train spikingjelly",
                         "I-LIF inference ours": "I-LIF inference spikingjelly",
                         "quickstart step D=4": "quickstart step D=1"}.get(r["case"])
            if base_name is not None:
                base = key[("spike_levels", None, None, base_name)]
                out.append({"part": r["part"], "case": r["case"], "baseline": base_name,
                            "time_vs_baseline_wall": r["median_s"] / base["median_s"],
                            "time_vs_baseline_cpu": r["median_cpu_s"] / base["median_cpu_s"]})
        elif r["part"] in ("quickstart", "ema"):
            base = key[(r["part"], None, None, "baseline" if r["part"] == "quickstart" else "timm ModelEmaV3")]
            out.append({"part": r["part"], "case": r["case"],
                        "speedup_vs_baseline_wall": base["median_s"] / r["median_s"],
                        "speedup_vs_baseline_cpu": base["median_cpu_s"] / r["median_cpu_s"]})
        else:
            base = key.get((r["part"], None, None, "R50-FPN"))
            if base is not None:
                out.append({"part": r["part"], "case": r["case"],
                            "time_over_R50_wall": r["median_s"] / base["median_s"],
                            "time_over_R50_cpu": r["median_cpu_s"] / base["median_cpu_s"]})
    return out


def print_table(rows, rats, info):
    print(f"\n# {info['time_utc']} UTC, {info['torch_threads']} threads, torch {info['torch']}; {info['uptime']}")
    rat = {(q["part"], q.get("variant") or q.get("setting"), q.get("T"), q["case"]): q for q in rats}
    print(f"{'part':10} {'case':28} {'T':>2} {'wall ms':>9} {'cpu ms':>9} {'peak MiB':>8}  ratios (wall | cpu)")
    for r in rows:
        q = rat.get((r["part"], r.get("variant") or r.get("setting"), r.get("T"), r["case"]), {})
        name = f"{r.get('variant') or r.get('setting', '')} {r['case']}".strip()
        if r["part"] == "deploy":
            note = (f"x{q['speedup_vs_train_sj_wall']:.2f} | x{q['speedup_vs_train_sj_cpu']:.2f} vs train/sj; "
                    f"{r['macs'] / 1e9:.1f} GMAC, {q['gflops']:.0f} GFLOP/s = {100 * q['share_of_peak']:.0f}% of peak")
            if q["time_over_R50_wall"] is not None:
                note += f"; {q['time_over_R50_wall']:.2f} of R50-FPN time"
        elif r["part"] == "backbone":
            note = f"x{q['speedup_vs_train_sj_wall']:.2f} | x{q['speedup_vs_train_sj_cpu']:.2f} vs train/sj"
            if r["T"] == 4:
                note += f"; T4/T1 {q['T4_over_T1_wall']:.2f} | {q['T4_over_T1_cpu']:.2f}"
        elif r["part"] in ("quickstart", "ema", "roi_align"):
            note = f"x{q['speedup_vs_baseline_wall']:.2f} | x{q['speedup_vs_baseline_cpu']:.2f} vs baseline"
        elif r["part"] == "spike_levels":
            note = (f"time x{q['time_vs_baseline_wall']:.2f} | x{q['time_vs_baseline_cpu']:.2f} of {q['baseline']}"
                    if q else "")
        elif r["part"] == "processes":
            note = (f"{r['images_per_s']:.1f} images/s: x{q['images_per_s_vs_baseline']:.2f} images/s, "
                    f"x{q['step_time_vs_baseline']:.2f} step time vs 1 process")
        elif q:
            note = f"{q['time_over_R50_wall']:.2f} | {q['time_over_R50_cpu']:.2f} of R50-FPN time"
        else:
            note = ""
        mem = r["peak_mem_mib"] if r["peak_mem_mib"] is not None else "-"
        print(f"{r['part']:10} {name:28} {r.get('T', ''):>2} {r['median_s'] * 1e3:9.0f} "
              f"{r['median_cpu_s'] * 1e3:9.0f} {mem:>8}  {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--parts", nargs="+", default=["backbone", "maskrcnn", "train", "quickstart", "roi_align", "ema"],
                        choices=["backbone", "maskrcnn", "train", "quickstart", "roi_align", "ema",
                                 "processes", "spike_levels", "deploy"])
    parser.add_argument("--variants", nargs="+", default=["15m", "55m"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--det-size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-reps", type=int, default=2)
    parser.add_argument("--quickstart-reps", type=int, default=20)
    parser.add_argument("--process-reps", type=int, default=3)
    parser.add_argument("--process-iters", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    info = machine_info()
    rows = []
    parts = {"backbone": bench_backbone, "maskrcnn": bench_maskrcnn, "train": bench_train,
             "quickstart": bench_quickstart, "roi_align": bench_roi_align, "ema": bench_ema,
             "processes": bench_processes, "spike_levels": bench_spike_levels, "deploy": bench_deploy}
    for part in args.parts:
        parts[part](args, rows)
        gc.collect()
    rats = ratios(rows)
    print_table(rows, rats, info)
    result = {"args": vars(args), "machine": info, "machine_after": machine_info(), "rows": rows, "ratios": rats}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
