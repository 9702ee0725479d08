"""Path checks and registration for the semantic-segmentation datasets (one missing-data error)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, List

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco import DatasetNotFoundError

__all__ = ["DatasetNotFoundError", "datasets_root", "require_paths", "register_sem_seg_dataset"]


def datasets_root() -> Path:
    """Detectron2's dataset root: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return Path(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))


def require_paths(dataset: str, paths: Iterable[os.PathLike], how: str) -> None:
    """Raise :class:`DatasetNotFoundError` listing every missing path of ``dataset`` and ``how`` to fix it."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset {dataset!r}: missing " + ", ".join(missing) + f". {how} "
            "(the root is $DETECTRON2_DATASETS, default ./datasets)")


def register_sem_seg_dataset(name: str, loader: Callable[[], List[dict]], *, stuff_classes: List[str],
                             image_root: os.PathLike, sem_seg_root: os.PathLike) -> None:
    """(Re-)register a semantic-segmentation dataset (ignore label 255, ``SemSegEvaluator``); an existing
    registration of ``name`` is replaced, so a later call with another root wins."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(stuff_classes=list(stuff_classes), image_root=str(image_root),
                                  sem_seg_root=str(sem_seg_root), evaluator_type="sem_seg", ignore_label=255)
