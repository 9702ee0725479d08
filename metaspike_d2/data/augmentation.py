"""Training/test augmentation of the detection configs, including the original's DETR-style crop."""
from __future__ import annotations

from typing import List

from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation

__all__ = ["build_detection_augmentation"]


def build_detection_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """Detectron2's augmentation list, or, in training with ``INPUT.CROP.ENABLED`` and a non-empty
    ``INPUT.CROP.PRE_RESIZE_MIN_SIZE``, the DETR-style chain of the original Mask R-CNN config::

        flip -> resize (shorter side in PRE_RESIZE_MIN_SIZE) -> RandomCrop(CROP.TYPE, CROP.SIZE)
             -> resize (shorter side in MIN_SIZE_TRAIN, longer side <= MAX_SIZE_TRAIN)
    """
    if not (is_train and cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.PRE_RESIZE_MIN_SIZE):
        augs = build_augmentation(cfg, is_train)
        if is_train and cfg.INPUT.CROP.ENABLED:
            augs.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        return augs
    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    augs += [
        T.ResizeShortestEdge(cfg.INPUT.CROP.PRE_RESIZE_MIN_SIZE, cfg.INPUT.MAX_SIZE_TRAIN, "choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
    ]
    return augs
