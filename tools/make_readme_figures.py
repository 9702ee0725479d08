#!/usr/bin/env python
"""Draw the README's two pictures from the segmentation quickstart's trained weights.

    python tools/make_readme_figures.py --weights output/quickstart_semfpn_metaspike_tiny_shapes/model_final.pth
    python tools/make_readme_figures.py --train      # trains the quickstart first (about 4-6 min on 2 CPU cores)

writes, under ``--output-dir`` (default ``docs/images``):

* ``quickstart_prediction.png``: the first ``--num-images`` validation images of the built-in shapes (top row)
  and what ``tools/demo.py`` draws for them (bottom row, Detectron2's Visualizer). The 64 px images are
  enlarged ``--scale`` times (nearest neighbour) before they are handed to the demo, so that its labels are
  legible; the model resizes them back to its 64 px test size, so it sees the original image.
* ``firing_rates.png``: the input firing rate of every spike-driven layer, as ``tools/analyze_energy.py``
  plots it, over ``--energy-images`` validation images; the energy per image is printed.

Both scripts are run through their own ``main``, so the pictures show what their commands produce.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = "configs/quickstart/semfpn_metaspike_tiny_shapes.yaml"
VAL_SET = "metaspike_shapes_sem_seg_val"
DEFAULT_WEIGHTS = "output/quickstart_semfpn_metaspike_tiny_shapes/model_final.pth"


def _load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="model_final.pth of the segmentation quickstart")
    p.add_argument("--train", action="store_true",
                   help="train the quickstart first (into --train-dir) and use its model_final.pth")
    p.add_argument("--train-dir", default="output/readme_figures_quickstart", help="OUTPUT_DIR of --train")
    p.add_argument("--output-dir", default=os.path.join("docs", "images"), help="where the PNGs go")
    p.add_argument("--num-images", type=int, default=4, help="validation images in the prediction picture")
    p.add_argument("--scale", type=int, default=4, help="enlargement of the 64 px images for drawing")
    p.add_argument("--energy-images", type=int, default=16, help="validation images for the firing rates")
    p.add_argument("--max-width", type=int, default=900, help="downscale wider pictures to this width (px)")
    return p


def _train(train_dir: str) -> str:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG,
           "OUTPUT_DIR", train_dir]
    print("[figures] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return os.path.join(train_dir, "model_final.pth")


def _val_images(n: int):
    from detectron2.data import DatasetCatalog

    import metaspike_d2.d2  # noqa: F401  (registers the built-in datasets)

    return [d["file_name"] for d in DatasetCatalog.get(VAL_SET)[:n]]


def _shrink(path: str, max_width: int) -> None:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # a palette PNG: small


def prediction_figure(weights: str, out_path: str, num_images: int, scale: int, tmp: str) -> str:
    import numpy as np
    from PIL import Image

    paths = _val_images(num_images)
    big_dir, drawn_dir = os.path.join(tmp, "inputs"), os.path.join(tmp, "drawn")
    os.makedirs(big_dir)
    big = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        target = os.path.join(big_dir, os.path.basename(p))
        img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(target)
        big.append(target)
    demo = _load_tool("demo")
    demo.main(["--config-file", CONFIG, "--input", *big, "--output", drawn_dir + os.sep,
               "--opts", "MODEL.WEIGHTS", weights])
    tiles = [np.concatenate([np.asarray(Image.open(b).convert("RGB")),
                             np.asarray(Image.open(os.path.join(drawn_dir, os.path.basename(b))).convert("RGB"))],
                            axis=0) for b in big]
    gap = np.full((tiles[0].shape[0], 6, 3), 255, dtype=np.uint8)
    row = np.concatenate([t if i == 0 else np.concatenate([gap, t], axis=1) for i, t in enumerate(tiles)], axis=1)
    Image.fromarray(row).save(out_path, optimize=True)
    return out_path


def firing_rate_figure(weights: str, out_path: str, num_images: int, tmp: str) -> str:
    energy = _load_tool("analyze_energy")
    out = os.path.join(tmp, "energy")
    report = energy.main(["--config-file", CONFIG, "--weights", weights, "--dataset", VAL_SET,
                          "--num-images", str(num_images), "--output", out, "--max-rows", "0"])
    shutil.copyfile(os.path.join(out, "firing_rates.png"), out_path)
    print(f"[figures] energy per image: {report.totals.energy_mj_per_image:.4f} mJ "
          f"over {num_images} validation images", flush=True)
    return out_path


def main(argv=None) -> list:
    args = get_parser().parse_args(argv)
    os.chdir(ROOT)
    weights = _train(args.train_dir) if args.train else args.weights
    if not os.path.isfile(weights):
        raise SystemExit(f"{weights} does not exist: train the quickstart first "
                         f"(python tools/train_net.py --config-file {CONFIG}) or pass --train")
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        written.append(prediction_figure(weights, os.path.join(args.output_dir, "quickstart_prediction.png"),
                                         args.num_images, args.scale, tmp))
        written.append(firing_rate_figure(weights, os.path.join(args.output_dir, "firing_rates.png"),
                                          args.energy_images, tmp))
    for path in written:
        _shrink(path, args.max_width)
        print(f"[figures] wrote {path} ({os.path.getsize(path) // 1024} KB)", flush=True)
    return written


if __name__ == "__main__":
    main()
