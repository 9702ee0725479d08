"""ADE20K-150 (SceneParsing, ``ADEChallengeData2016``) for semantic segmentation.

The names are Detectron2's builtin ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` (150 classes,
``evaluator_type="sem_seg"``, ``ignore_label=255``) with the same layout::

    $DETECTRON2_DATASETS/ADEChallengeData2016/
      images/{training,validation}/*.jpg
      annotations/{training,validation}/*.png              (the download: 0 = "other", 1..150 = classes)
      annotations_detectron2/{training,validation}/*.png   (tools/prepare_ade20k_sem_seg.py: k -> k-1, 0 -> 255)

Importing this module re-registers both names with a loader that checks these paths first and, when
something is missing, raises :class:`DatasetNotFoundError` naming the paths and the prepare command
(Detectron2's own loader fails with a bare ``FileNotFoundError`` from ``PathManager.ls``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np
from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .missing import DatasetNotFoundError, datasets_root, register_sem_seg_dataset, require_paths

__all__ = ["ADE20K_SPLITS", "NUM_CLASSES", "shift_ade20k_labels", "load_ade20k_sem_seg", "register_ade20k_sem_seg"]

#: dataset name -> split directory.
ADE20K_SPLITS = {"ade20k_sem_seg_train": "training", "ade20k_sem_seg_val": "validation"}
NUM_CLASSES = 150
PREPARE_COMMAND = "python tools/prepare_ade20k_sem_seg.py"


def shift_ade20k_labels(label: np.ndarray) -> np.ndarray:
    """ADE20K label map -> Detectron2 training ids: class k (1..150) -> k-1, 0 ("other") -> 255.

    The same shift as mmseg's ``reduce_zero_label=True`` in the original. Raises ``ValueError`` on
    values above 150 (not an ADE20K-150 annotation).
    """
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f"ADE20K annotations are uint8 label maps, got dtype {label.dtype}")
    if label.size and label.max() > NUM_CLASSES:
        raise ValueError(f"ADE20K-150 labels are 0..{NUM_CLASSES}, found {int(label.max())}")
    return label - np.uint8(1)  # uint8 arithmetic: 0 wraps to 255


def load_ade20k_sem_seg(root: os.PathLike, split: str) -> List[Dict]:
    """Detectron2 dataset dicts (``file_name``, ``sem_seg_file_name``) of one split of ``root``."""
    root = Path(root)
    image_dir = root / "images" / split
    gt_dir = root / "annotations_detectron2" / split
    if not image_dir.is_dir() or not (root / "annotations" / split).is_dir():
        how = ("Download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu), unzip it under the "
               f"dataset root, then run `{PREPARE_COMMAND} --root {root}`.")
    else:
        how = f"Create the Detectron2 labels with `{PREPARE_COMMAND} --root {root}`."
    require_paths(f"ADE20K {split}", [image_dir, gt_dir], how)
    if not any(gt_dir.glob("*.png")):
        raise DatasetNotFoundError(f"dataset 'ADE20K {split}': no PNG labels in {gt_dir}. {how}")
    return load_sem_seg(str(gt_dir), str(image_dir), gt_ext="png", image_ext="jpg")


def register_ade20k_sem_seg(root: os.PathLike | None = None) -> None:
    """(Re-)register ``ade20k_sem_seg_{train,val}`` under ``root`` (default ``$DETECTRON2_DATASETS``)."""
    root = Path(root if root is not None else datasets_root()) / "ADEChallengeData2016"
    for name, split in ADE20K_SPLITS.items():
        register_sem_seg_dataset(name, lambda r=root, s=split: load_ade20k_sem_seg(r, s),
                                 stuff_classes=ADE20K_SEM_SEG_CATEGORIES, image_root=root / "images" / split,
                                 sem_seg_root=root / "annotations_detectron2" / split)


register_ade20k_sem_seg()
