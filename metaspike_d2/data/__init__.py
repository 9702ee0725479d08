"""Datasets of metaspike-d2. Importing this module registers them with Detectron2:

* ``metaspike_shapes_train`` / ``metaspike_shapes_val``: synthetic instance segmentation, generated on
  first use under ``$DETECTRON2_DATASETS`` (default ``./datasets``), see :mod:`.shapes`;
* Detectron2's builtin ``coco_*`` names get loaders that name the expected files when they are missing.
* semantic segmentation: ``metaspike_shapes_sem_seg_train/val`` (synthetic, :mod:`.shapes_sem_seg`),
  ``ade20k_sem_seg_train/val`` (:mod:`.ade20k`) and ``voc_2012_sem_seg_train/val`` (:mod:`.voc`); missing
  files raise :class:`DatasetNotFoundError` naming the paths and the prepare command.
"""
import os

from . import ade20k, shapes, shapes_sem_seg, voc  # noqa: F401  (semantic segmentation registration)
from .augmentation import build_detection_augmentation
from .coco import DatasetNotFoundError, add_dataset_path_checks, check_dataset_paths
from .shapes import register_all_shapes, render_shapes_image

_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_shapes(_root)
add_dataset_path_checks("coco")

__all__ = [
    "shapes",
    "build_detection_augmentation",
    "DatasetNotFoundError",
    "add_dataset_path_checks",
    "check_dataset_paths",
    "register_all_shapes",
    "render_shapes_image",
]
