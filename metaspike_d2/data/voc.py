"""PASCAL VOC 2012 semantic segmentation (21 classes with background, ignore 255).

Registered as ``voc_2012_sem_seg_train`` / ``voc_2012_sem_seg_val`` from the standard layout::

    $DETECTRON2_DATASETS/VOC2012/   (or VOCdevkit/VOC2012, both are looked for)
      JPEGImages/*.jpg
      SegmentationClass/*.png                   (the download: palette PNGs)
      ImageSets/Segmentation/{train,val}.txt
      SegmentationClass_detectron2/*.png        (tools/prepare_voc_sem_seg.py: plain uint8 label maps)

The prepare step is needed because Detectron2 reads labels with ``Image.convert("L")``, which turns
palette indices into grey levels. (The original's VOC configs kept 150 classes; here it is 21.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

from .missing import DatasetNotFoundError, datasets_root, register_sem_seg_dataset, require_paths

__all__ = ["VOC_SEM_SEG_CLASSES", "VOC_SPLITS", "voc_root", "load_voc_sem_seg", "register_voc_sem_seg"]

VOC_SEM_SEG_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
#: dataset name -> image set.
VOC_SPLITS = {"voc_2012_sem_seg_train": "train", "voc_2012_sem_seg_val": "val"}
LABEL_DIR = "SegmentationClass_detectron2"
PREPARE_COMMAND = "python tools/prepare_voc_sem_seg.py"


def voc_root(root: os.PathLike | None = None) -> Path:
    """``<root>/VOC2012`` if it exists, else ``<root>/VOCdevkit/VOC2012`` (the tarball's layout)."""
    root = Path(root if root is not None else datasets_root())
    return root / "VOC2012" if (root / "VOC2012").is_dir() else root / "VOCdevkit" / "VOC2012"


def load_voc_sem_seg(root: os.PathLike, split: str) -> List[Dict]:
    """Dataset dicts (``file_name``, ``sem_seg_file_name``) of the ids in ``ImageSets/Segmentation/<split>.txt``."""
    root = Path(root)
    ids_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not (root / "SegmentationClass").is_dir():
        how = ("Download VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/), untar it "
               f"under the dataset root, then run `{PREPARE_COMMAND} --root {root}`.")
    else:
        how = f"Create the Detectron2 labels with `{PREPARE_COMMAND} --root {root}`."
    require_paths(f"VOC2012 {split}", [root / "JPEGImages", ids_file, root / LABEL_DIR], how)
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    dicts = [{"file_name": str(root / "JPEGImages" / f"{i}.jpg"),
              "sem_seg_file_name": str(root / LABEL_DIR / f"{i}.png")} for i in ids]
    absent = [d["sem_seg_file_name"] for d in dicts if not os.path.isfile(d["sem_seg_file_name"])]
    if absent:
        raise DatasetNotFoundError(f"dataset 'VOC2012 {split}': {len(absent)} of {len(dicts)} labels missing "
                                   f"(e.g. {absent[0]}). {how}")
    return dicts


def register_voc_sem_seg(root: os.PathLike | None = None) -> None:
    """(Re-)register ``voc_2012_sem_seg_{train,val}`` under ``root`` (default ``$DETECTRON2_DATASETS``)."""
    base = voc_root(root)
    for name, split in VOC_SPLITS.items():
        register_sem_seg_dataset(name, lambda r=base, s=split: load_voc_sem_seg(r, s),
                                 stuff_classes=VOC_SEM_SEG_CLASSES, image_root=base / "JPEGImages",
                                 sem_seg_root=base / LABEL_DIR)


register_voc_sem_seg()
