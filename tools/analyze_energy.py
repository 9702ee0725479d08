#!/usr/bin/env python
"""Energy, firing rates and spike maps of a Meta-SpikeFormer model (docs/energy.md).

Classification (timm model name)::

    python tools/analyze_energy.py --model metaspikeformer_55m --time-steps 4 --num-images 8
    python tools/analyze_energy.py --model metaspikeformer_55m --weights ckpt.pth --dataset /data/imagenet/val

Detectron2 (config + weights)::

    python tools/analyze_energy.py --config-file configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml \
        --num-images 4 [--weights model_final.pth] [KEY VALUE ...]

A model trained on one's own data: the same ``--register-coco`` / ``--register-voc`` / ``--register-sem-seg``
options as tools/train_net.py (the class count follows from the data), and ``--dataset NAME`` to analyse
that registered dataset's images::

    python tools/analyze_energy.py --config-file CFG --weights model_final.pth \
        --register-voc raccoon_val raccoon/images raccoon/annotations --dataset raccoon_val MODEL.MASK_ON False

Prints the per-layer table and totals, and writes ``energy.json``, ``layers.csv``, ``firing_rates.png``
(and ``spike_maps.png`` with ``--image IMG``) to ``--output``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metaspike_d2.checkpoint import load_checkpoint_file  # noqa: E402
from metaspike_d2.energy import PRESETS, EnergyConstants  # noqa: E402
from metaspike_d2.energy.data import classification_tensor, list_images, load_image, synthetic_images  # noqa: E402
from metaspike_d2.energy.plots import capture_stage_spikes, plot_firing_rates, plot_spike_maps  # noqa: E402
from metaspike_d2.energy.runner import analyze, calibrate_batchnorm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="timm classification model, e.g. metaspikeformer_55m")
    src.add_argument("--config-file", help="Detectron2 config (detection or segmentation)")
    p.add_argument("--weights", default="", help="checkpoint (classification: our .pth; Detectron2: MODEL.WEIGHTS)")
    p.add_argument("--time-steps", "-T", type=int, default=None,
                   help="time steps T (default: 4 for --model, MODEL.METASPIKE.T for --config-file)")
    p.add_argument("--num-images", type=int, default=8, help="images to average over")
    p.add_argument("--dataset", default="synthetic",
                   help="'synthetic' (built-in images, default), an image folder (ImageFolder tree or flat) or, "
                        "with --config-file, a registered Detectron2 dataset (e.g. a --register-* NAME)")
    p.add_argument("--input-size", type=int, default=None,
                   help="classification: square input side (default 224); Detectron2: test short side "
                        "(default INPUT.MIN_SIZE_TEST)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000, help="classification head size")
    p.add_argument("--spike-levels", type=int, default=None,
                   help="D of the neurons (classification default: the --weights' spike_levels, else 1; "
                        "Detectron2: sets MODEL.METASPIKE.SPIKE_LEVELS)")
    p.add_argument("--output", default=None, help="output folder (default output/energy/<model or config>)")
    p.add_argument("--image", default=None, help="also plot this image's spike maps per stage and time step")
    p.add_argument("--energy-preset", choices=sorted(PRESETS), default="fp32",
                   help="45 nm energy per op: fp32 4.6/0.9 pJ (default, the papers'), fp16 1.5/0.4, int8 0.23/0.03")
    p.add_argument("--e-mac", type=float, default=None, help="override E_MAC in pJ")
    p.add_argument("--e-ac", type=float, default=None, help="override E_AC in pJ")
    p.add_argument("--bn-calibrate", choices=("auto", "on", "off"), default="auto",
                   help="re-estimate BN statistics on the images first; 'auto' = only without --weights "
                        "(random weights otherwise barely fire); never for trained weights")
    p.add_argument("--calibration-images", type=int, default=2,
                   help="images (the first ones analysed) used for --bn-calibrate (default 2)")
    p.add_argument("--exact-synops", action="store_true",
                   help="also run spikingjelly's SynOpCounter (operator-level exact weight uses; slow)")
    p.add_argument("--max-rows", type=int, default=None, help="rows of the printed layer table (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="Detectron2 config overrides KEY VALUE ...")
    from metaspike_d2.data.own_data import add_dataset_arguments

    return add_dataset_arguments(p).parse_args(argv)


def _images(args, size_hw):
    if args.dataset == "synthetic":
        return synthetic_images(args.num_images, size_hw, seed=args.seed), "synthetic"
    if args.config_file and not os.path.exists(args.dataset):
        from detectron2.data import DatasetCatalog

        if args.dataset in DatasetCatalog.list():  # a registered dataset: its first --num-images images
            paths = [d["file_name"] for d in DatasetCatalog.get(args.dataset)[:args.num_images]]
            return [load_image(p) for p in paths], args.dataset
    paths = list_images(args.dataset, args.num_images)
    return [load_image(p) for p in paths], os.path.abspath(args.dataset)


def _classification(args, constants):
    import timm

    import metaspike_d2  # noqa: F401  (registers the models with timm)

    t = args.time_steps or 4
    levels = args.spike_levels
    if args.weights:
        ckpt = load_checkpoint_file(args.weights)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
        if levels is None and "spike_levels" in state:
            levels = int(state["spike_levels"])
    kwargs = {"num_classes": args.num_classes, "time_steps": t, "spike_levels": levels or 1}
    if args.weights:
        kwargs["checkpoint_path"] = args.weights
    model = timm.create_model(args.model, **kwargs)
    size = args.input_size or 224
    raw, dataset = _images(args, (size * 8 // 7, size * 8 // 7))
    images = classification_tensor(raw, size)
    bs = max(1, args.batch_size)
    chunks = list(torch.split(images, bs))
    runs = [(lambda x=x: model(x)) for x in chunks]
    calibrated = _maybe_calibrate(args, model, runs)
    report = analyze(model, [(r, int(x.shape[0])) for r, x in zip(runs, chunks)], t, constants, args.model,
                     [3, size, size], dataset, progress=_progress(args.num_images))

    def spike_run(path):
        img = load_image(path)
        x = classification_tensor([img], size)
        return lambda: model(x), np.asarray(_show(img, size))

    return model, report, spike_run, calibrated, runs


def _show(img, size):
    """The classification crop of ``img`` for display (same resize/crop, no normalisation)."""
    x = classification_tensor([img], size, mean=(0, 0, 0), std=(1, 1, 1))[0]
    return (x.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)


def _detectron2(args, constants):
    from metaspike_d2.d2.energy_hook import build_d2_energy_model

    levels = [] if args.spike_levels is None else ["MODEL.METASPIKE.SPIKE_LEVELS", str(args.spike_levels)]
    model, cfg, t, prepare = build_d2_energy_model(args.config_file, args.weights,
                                                    list(args.opts) + levels + _own_data_opts(args), args.time_steps,
                                                    args.input_size)
    size = cfg.INPUT.MIN_SIZE_TEST
    raw, dataset = _images(args, (size, size * 4 // 3))
    bs = max(1, args.batch_size)
    groups = [raw[i:i + bs] for i in range(0, len(raw), bs)]
    runs = [prepare(g, backbone_only=True) for g in groups]
    calibrated = _maybe_calibrate(args, model, runs)
    full = [(prepare(g), len(g)) for g in groups]
    name = os.path.splitext(os.path.basename(args.config_file))[0]
    report = analyze(model, full, t, constants, name, [3, size, None], dataset, progress=_progress(args.num_images))

    def spike_run(path):
        img = load_image(path)
        return prepare([img]), img

    return model, report, spike_run, calibrated, [r for r, _ in full]


def _own_data_opts(args):
    """Register the --register-* datasets; the overrides their class count implies (unless given)."""
    from detectron2.config import get_cfg

    from metaspike_d2.d2 import add_metaspike_config
    from metaspike_d2.data import own_data

    if not own_data.register_from_args(args):
        return []
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    extra = own_data.dataset_config_overrides(cfg, args.opts)
    cfg.merge_from_list(extra)
    own_data.log_summary(cfg, args.opts, log=lambda line: print(f"[energy] {line}", flush=True))
    return extra


def _maybe_calibrate(args, model, runs):
    """``runs``: one callable per batch of ``--batch-size`` images."""
    if args.bn_calibrate == "on" or (args.bn_calibrate == "auto" and not args.weights):
        bs = max(1, args.batch_size)
        use = runs[:max(1, -(-max(1, args.calibration_images) // bs))]
        start = time.time()
        n = calibrate_batchnorm(model, use)
        images = min(len(use) * bs, args.num_images)
        print(f"[energy] untrained weights: re-estimated the statistics of {n} BN layers on the first "
              f"{images} images in {time.time() - start:.1f} s (--bn-calibrate off to disable)", flush=True)
        return images
    return 0


def _progress(total):
    start = time.time()

    def cb(done):
        print(f"[energy] {done}/{total} images, {time.time() - start:.1f} s", flush=True)

    return cb


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.num_images < 1:
        raise SystemExit("--num-images must be >= 1")
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if args.model and args.opts:
        raise SystemExit(f"config overrides {args.opts} only apply to --config-file")
    if args.model and (args.register_coco or args.register_voc or args.register_sem_seg):
        raise SystemExit("--register-coco / --register-voc / --register-sem-seg only apply to --config-file")
    constants = EnergyConstants.from_preset(args.energy_preset, args.e_mac, args.e_ac)
    name = args.model or os.path.splitext(os.path.basename(args.config_file))[0]
    out = args.output or os.path.join("output", "energy", name)
    start = time.time()
    if args.model:
        model, report, spike_run, calibrated, runs = _classification(args, constants)
    else:
        model, report, spike_run, calibrated, runs = _detectron2(args, constants)
    elapsed = time.time() - start
    os.makedirs(out, exist_ok=True)
    extra = {"bn_calibrated": bool(calibrated), "bn_calibration_images": calibrated,
             "weights": args.weights or None, "seconds": round(elapsed, 1)}
    if args.exact_synops:
        from metaspike_d2.energy import exact_synops

        model.eval()
        counts = {}
        for run in runs:
            for k, v in exact_synops(model, run).items():
                counts[k] = counts.get(k, 0) + v
        extra["spikingjelly_exact_synops_per_image"] = {k: v / report.num_images for k, v in counts.items()}
    paths = report.write(out)
    _add_fields(paths["json"], extra)
    print(report.format_table(args.max_rows))
    if calibrated:
        print("note: random weights with re-estimated BN statistics; firing rates (and energy) of a trained "
              "model differ")
    plot_firing_rates(report.layers, os.path.join(out, "firing_rates.png"),
                      f"{name}, T={report.time_steps}: input firing rate per spike-driven layer")
    written = [paths["json"], paths["csv"], os.path.join(out, "firing_rates.png")]
    if args.image:
        model.eval()
        run, shown = spike_run(args.image)
        spikes = capture_stage_spikes(model, run)
        written.append(plot_spike_maps(shown, spikes, os.path.join(out, "spike_maps.png"),
                                       f"{name}, T={report.time_steps}: {os.path.basename(args.image)}"))
    print(f"wrote {', '.join(written)}  ({elapsed:.1f} s)")
    return report


def _add_fields(path, extra):
    import json

    with open(path) as f:
        data = json.load(f)
    data.update(extra)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


if __name__ == "__main__":
    main()
