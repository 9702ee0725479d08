#!/usr/bin/env python
"""Write PASCAL VOC 2012 segmentation labels as plain uint8 PNGs that Detectron2 can read.

Reads the palette PNGs ``<root>/SegmentationClass/*.png`` (indices 0..20, 255 = boundary, ignored) and
writes their indices unchanged to ``<root>/SegmentationClass_detectron2/*.png`` (mode "L").
Usage: ``python tools/prepare_voc_sem_seg.py [--root $DETECTRON2_DATASETS/VOCdevkit/VOC2012]``.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metaspike_d2.data.missing import require_paths  # noqa: E402
from metaspike_d2.data.voc import LABEL_DIR, VOC_SEM_SEG_CLASSES, voc_root  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=voc_root(),
                        help="the VOC2012 folder (default: $DETECTRON2_DATASETS/VOC2012 or .../VOCdevkit/VOC2012)")
    args = parser.parse_args(argv)
    src, dst = args.root / "SegmentationClass", args.root / LABEL_DIR
    require_paths("VOC2012", [src], "Download VOCtrainval_11-May-2012.tar "
                  "(http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and untar it there.")
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.png"))
    for file in tqdm(files, desc="SegmentationClass", unit="img"):
        label = np.asarray(Image.open(file))  # palette indices for mode "P"
        bad = np.setdiff1d(np.unique(label), [*range(len(VOC_SEM_SEG_CLASSES)), 255])
        if label.ndim != 2 or bad.size:
            raise ValueError(f"{file}: not a VOC label map (shape {label.shape}, unexpected values {bad[:5]})")
        Image.fromarray(label.astype(np.uint8)).save(dst / file.name)
    print(f"{len(files)} label maps -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
