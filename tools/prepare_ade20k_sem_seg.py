#!/usr/bin/env python
"""Write ADE20K-150 labels in Detectron2's convention (as Mask2Former's script of the same name).

Reads ``<root>/annotations/{training,validation}/*.png`` (0 = "other", 1..150 = classes) and writes
``<root>/annotations_detectron2/{training,validation}/*.png`` with class k -> k-1 and 0 -> 255 (ignored).
Usage: ``python tools/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]``.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metaspike_d2.data.ade20k import ADE20K_SPLITS, shift_ade20k_labels  # noqa: E402
from metaspike_d2.data.missing import datasets_root, require_paths  # noqa: E402


def convert_split(root: Path, split: str) -> int:
    """Convert one split; returns the number of label maps written."""
    src, dst = root / "annotations" / split, root / "annotations_detectron2" / split
    files = sorted(src.glob("*.png"))
    dst.mkdir(parents=True, exist_ok=True)
    for file in tqdm(files, desc=split, unit="img"):
        label = np.asarray(Image.open(file))
        try:
            shifted = shift_ade20k_labels(label)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e
        Image.fromarray(shifted).save(dst / file.name)
    return len(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=datasets_root() / "ADEChallengeData2016",
                        help="the ADEChallengeData2016 folder (default: $DETECTRON2_DATASETS/ADEChallengeData2016)")
    args = parser.parse_args(argv)
    splits = list(ADE20K_SPLITS.values())
    require_paths("ADE20K", [args.root / "annotations" / s for s in splits],
                  "Download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu) and unzip it there.")
    for split in splits:
        n = convert_split(args.root, split)
        print(f"{split}: {n} label maps -> {args.root / 'annotations_detectron2' / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
