#!/usr/bin/env python
"""GPU check of issue 3: train a Mask R-CNN config for a few iterations on scaled-up synthetic shapes and
report images/s, peak memory and the LIF kernel spikingjelly picked.

    python tools/gpu_check_detection.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_metaspike_15m_FPN_T1.yaml \
        --iters 50 --batch 8 --amp
    python tools/gpu_check_detection.py --config-file .../mask_rcnn_metaspike_15m_FPN_T4.yaml --iters 50 --batch 8 --amp

Images are rendered by the shapes generator at ``--size`` (default 800x1333, the COCO test scale);
the model has 3 classes and no pretrained weights (speed and memory do not depend on them).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from spikingjelly.activation_based.functional import neuron_implementation  # noqa: E402

from metaspike_d2.d2 import add_metaspike_config, build_optimizer  # noqa: E402
from metaspike_d2.data.shapes import render_shapes_image  # noqa: E402


def make_batch(n: int, size, seed: int = 0):
    """``n`` detectron2 training inputs rendered at ``size`` = (H, W), with boxes, classes and masks."""
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        image, instances = render_shapes_image(rng, size, max_instances=8)
        inst = Instances(size)
        masks = BitMasks(torch.from_numpy(np.stack([m for _, m in instances])))
        inst.gt_masks, inst.gt_boxes = masks, masks.get_bounding_boxes()
        inst.gt_classes = torch.tensor([c for c, _ in instances])
        batch.append({"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
                      "instances": inst, "height": size[0], "width": size[1]})
    return batch


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

    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.RETINANET.NUM_CLASSES", 3,
                         "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu", *args.opts])
    device = torch.device(cfg.MODEL.DEVICE)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    batch = make_batch(args.batch, tuple(args.size))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with EventStorage():
        for it in range(args.iters):
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
                loss = sum(model(batch).values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sync()
            times.append(time.perf_counter() - start)
    timed = times[args.warmup:] or times
    report = {
        "config": args.config_file, "T": cfg.MODEL.METASPIKE.T, "batch": args.batch, "size": list(args.size),
        "amp": args.amp, "iters": args.iters, "images_per_s": args.batch * len(timed) / sum(timed),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "lif_kernel": neuron_implementation("lif", device),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "final_loss": loss.item(),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
