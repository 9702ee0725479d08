#!/usr/bin/env python
"""Train a Mask R-CNN config for a few iterations on synthetic shapes and report images/s, peak memory and the LIF
kernel spikingjelly picked (a thin wrapper of ``maskrcnn_step_benchmark`` in benchmarks/gpu.py, whose part d runs
the same step on random inputs as part of the whole GPU check).

    python tools/gpu_check_detection.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml \
        --iters 50 --batch 8 --amp
    python tools/gpu_check_detection.py --config-file .../mask_rcnn_metaspike_15m_FPN_T4.yaml --iters 50 --batch 8 --amp

Images are rendered by the shapes generator at ``--size`` (default 800x1333, the COCO test scale);
the model has 3 classes and no pretrained weights (speed and memory do not depend on them).
"""
import argparse
import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _gpu_module():
    spec = importlib.util.spec_from_file_location("metaspike_benchmarks_gpu", os.path.join(ROOT, "benchmarks", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="iterations excluded from the timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    from spikingjelly.activation_based.functional import neuron_implementation

    gpu = _gpu_module()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = gpu.maskrcnn_step_benchmark(args.config_file, device=device, batch=args.batch, size=tuple(args.size),
                                      iters=args.iters, warmup=args.warmup, precision="fp16" if args.amp else "fp32",
                                      opts=args.opts, inputs="shapes", num_classes=3, count_flops=False)
    report = {
        "config": args.config_file, "T": res["T"], "batch": args.batch, "size": list(args.size), "amp": args.amp,
        "iters": args.iters, "images_per_s": args.batch / res["step_s"], "step_s": res["step_s"],
        "peak_memory_gib": res["peak_memory_gib"], "lif_kernel": neuron_implementation("lif", device),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "final_loss": res["final_loss"],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
