"""metaspike_shapes_sem_seg: the synthetic shapes as a semantic-segmentation dataset.

Same generator as the detection quickstart (:func:`metaspike_d2.data.shapes.render_shapes_image`: random
gradient backgrounds, 1-4 circles / squares / triangles of random size, rotation and occlusion), with two
changes that let a tiny spiking network learn it from scratch on a CPU in minutes: 64x64 images, and each
shape repainted in its class colour (``SHAPES_COLORS``, shaded and noisy) instead of a random one. The
label of a pixel is 0 for background and ``1 + class`` for the visible part of a shape (4 classes).
On first use a split is written under ``$DETECTRON2_DATASETS/metaspike_shapes_sem_seg_v2/`` (default
``./datasets``)::

    metaspike_shapes_sem_seg_v2/<split>/images/000000.png   (RGB)
    metaspike_shapes_sem_seg_v2/<split>/labels/000000.png   (uint8 label map)

Registered names: ``metaspike_shapes_sem_seg_train`` and ``metaspike_shapes_sem_seg_val``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

from .missing import datasets_root
from .shapes import SHAPES_CLASSES, SHAPES_COLORS, ShapesSplit, iter_shapes_split

__all__ = [
    "SHAPES_SEM_SEG_CLASSES",
    "SHAPES_SEM_SEG_SPLITS",
    "semantic_label",
    "class_coloured",
    "ensure_shapes_sem_seg_split",
    "register_shapes_sem_seg",
]

SHAPES_SEM_SEG_CLASSES = ("background", *SHAPES_CLASSES)
DATASET_DIRNAME = "metaspike_shapes_sem_seg_v2"

#: The built-in splits (registered as ``metaspike_shapes_sem_seg_<split>``); seeds differ from detection's.
SHAPES_SEM_SEG_SPLITS: Dict[str, ShapesSplit] = {
    "train": ShapesSplit(num_images=2000, image_size=(64, 64), seed=10),
    "val": ShapesSplit(num_images=200, image_size=(64, 64), seed=11),
}


def semantic_label(image_size: Tuple[int, int], instances: List[Tuple[int, np.ndarray]]) -> np.ndarray:
    """``(H, W)`` uint8 label map from ``[(class 0..2, visible mask), ...]``: 0 = background, 1 + class."""
    label = np.zeros(image_size, np.uint8)
    for cls, mask in instances:
        label[mask] = cls + 1
    return label


def class_coloured(image: np.ndarray, instances: List[Tuple[int, np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    """Repaint every visible shape in its class colour, with a random shade (0.7-1.0) and pixel noise."""
    out = image.astype(np.float32)
    for cls, mask in instances:
        colour = np.asarray(SHAPES_COLORS[cls], np.float32) * rng.uniform(0.7, 1.0)
        out[mask] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def _split_dirs(root: Path, name: str) -> Tuple[Path, Path]:
    base = Path(root) / DATASET_DIRNAME / name
    return base / "images", base / "labels"


def ensure_shapes_sem_seg_split(name: str, split: ShapesSplit, root: str | os.PathLike) -> Tuple[Path, Path]:
    """Write split ``name`` unless it is there (atomically, via a temporary directory); returns (images, labels)."""
    image_dir, label_dir = _split_dirs(Path(root), name)
    if image_dir.is_dir() and label_dir.is_dir():
        return image_dir, label_dir
    base = image_dir.parent
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base.parent, prefix=f".{name}."))
    try:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        rng = np.random.default_rng(split.seed + 1000)
        for i, image, instances in iter_shapes_split(split):
            image = class_coloured(image, instances, rng)
            cv2.imwrite(str(tmp / "images" / f"{i:06d}.png"), image[:, :, ::-1])
            cv2.imwrite(str(tmp / "labels" / f"{i:06d}.png"), semantic_label(image.shape[:2], instances))
        try:
            os.replace(tmp, base)
        except OSError:  # written meanwhile by another process
            if not (image_dir.is_dir() and label_dir.is_dir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image_dir, label_dir


def register_shapes_sem_seg(root: str | os.PathLike | None = None) -> None:
    """Register ``metaspike_shapes_sem_seg_{train,val}`` (evaluator "sem_seg"); files are made on first load."""
    root = Path(root if root is not None else datasets_root())
    for split_name, split in SHAPES_SEM_SEG_SPLITS.items():
        name = f"metaspike_shapes_sem_seg_{split_name}"
        image_dir, label_dir = _split_dirs(root, split_name)

        def load(n=split_name, s=split):
            images, labels = ensure_shapes_sem_seg_split(n, s, root)
            return load_sem_seg(str(labels), str(images), gt_ext="png", image_ext="png")

        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            stuff_classes=list(SHAPES_SEM_SEG_CLASSES),
            stuff_colors=[[0, 0, 0], *[list(c) for c in SHAPES_COLORS]],
            image_root=str(image_dir),
            sem_seg_root=str(label_dir),
            evaluator_type="sem_seg",
            ignore_label=255,
        )


register_shapes_sem_seg()
