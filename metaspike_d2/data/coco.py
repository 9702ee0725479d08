"""COCO through Detectron2's builtin names (``coco_2017_train``, ``coco_2017_val``, ...), with clear errors.

Detectron2 registers those names under ``$DETECTRON2_DATASETS`` (default ``./datasets``) when
``detectron2.data`` is imported, but a missing file only surfaces as a bare "file not found" deep inside
the loader. :func:`add_dataset_path_checks` wraps their loaders so that a missing dataset raises an error
naming every expected path and the variable that sets the root.
"""
from __future__ import annotations

import os
from typing import Callable, List

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["DatasetNotFoundError", "add_dataset_path_checks", "check_dataset_paths"]

#: Metadata fields that name files or folders a dataset needs.
_PATH_FIELDS = ("json_file", "image_root", "panoptic_json", "panoptic_root", "sem_seg_root")


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset's files are not where its metadata says."""


def check_dataset_paths(name: str) -> None:
    """Raise :class:`DatasetNotFoundError` listing the expected paths if any of them is missing."""
    meta = MetadataCatalog.get(name)
    paths = [(field, getattr(meta, field)) for field in _PATH_FIELDS if hasattr(meta, field)]
    missing = [(field, p) for field, p in paths if not os.path.exists(p)]
    if missing:
        lines = "\n".join(f"  {field}: {os.path.abspath(p)}" + ("  (missing)" if (field, p) in missing else "")
                          for field, p in paths)
        raise DatasetNotFoundError(
            f"dataset '{name}' is not available; expected:\n{lines}\n"
            f"The root is $DETECTRON2_DATASETS (now {os.environ.get('DETECTRON2_DATASETS', 'unset -> ./datasets')}); "
            "for COCO it must contain coco/annotations/instances_{train,val}2017.json and coco/{train,val}2017/. "
            "See docs/detection.md, or train on the built-in metaspike_shapes_train/val.")


def _checked(name: str, loader: Callable[[], List[dict]]) -> Callable[[], List[dict]]:
    def load():
        check_dataset_paths(name)
        return loader()

    load.path_checked = True
    return load


def add_dataset_path_checks(substring: str = "coco") -> None:
    """Wrap the loader of every registered dataset whose name contains ``substring`` (idempotent)."""
    for name in DatasetCatalog.list():
        if substring not in name or getattr(DatasetCatalog[name], "path_checked", False):
            continue
        loader = DatasetCatalog[name]
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, _checked(name, loader))
