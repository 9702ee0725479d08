"""Training augmentation of the semantic-segmentation configs (as Detectron2's DeepLab / PointRend projects).

    resize (shorter side from INPUT.MIN_SIZE_TRAIN, longer <= INPUT.MAX_SIZE_TRAIN)
    -> RandomCrop_CategoryAreaConstraint(CROP.TYPE, CROP.SIZE, CROP.SINGLE_CATEGORY_MAX_AREA)  if CROP.ENABLED
    -> ColorAugSSD (the photometric distortion of mmseg/SSD)                                 if INPUT.COLOR_AUG_SSD
    -> horizontal flip

The original's mmseg pipeline is RandomResize(2048x512, ratio 0.5-2) -> RandomCrop(512, cat_max_ratio 0.75)
-> flip -> PhotoMetricDistortion; test images are resized with INPUT.MIN/MAX_SIZE_TEST by Detectron2's
default test mapper.
"""
from __future__ import annotations

from typing import List

from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

__all__ = ["build_sem_seg_augmentation"]


def build_sem_seg_augmentation(cfg) -> List[T.Augmentation]:
    """The training augmentations of a ``SemanticSegmentor`` config."""
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs
