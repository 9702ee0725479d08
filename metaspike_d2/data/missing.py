"""Path checks for the semantic-segmentation datasets, raising the project's one missing-data error."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .coco import DatasetNotFoundError

__all__ = ["DatasetNotFoundError", "datasets_root", "require_paths"]


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
