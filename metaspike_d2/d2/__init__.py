"""Detectron2 glue of metaspike-d2. Importing it registers the backbones, heads, meta-architectures and
datasets (``import metaspike_d2.d2``), like Detectron2 projects do."""
from . import backbone, retinanet, roi_heads, rpn, sem_seg  # noqa: F401  (registration)
from .. import data  # noqa: F401  (dataset registration)
from .checkpoint import MetaSpikeCheckpointer
from .config import add_metaspike_config
from .solver import build_lr_scheduler, build_optimizer

__all__ = ["add_metaspike_config", "MetaSpikeCheckpointer", "build_optimizer", "build_lr_scheduler"]
