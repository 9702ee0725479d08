"""ONNX export of re-parameterized Meta-SpikeFormer models: plain tensor operations, no custom operators.

Spiking neurons trace to comparisons (a LIF from rest at T=1 is ``X >= tau * V_th``; for T > 1 the time
loop unrolls, :func:`~metaspike_d2.neurons.lif_graph`), so any ONNX runtime runs the graph. T is static
(it fixes the unrolled loop); batch and image size are dynamic.

:func:`export_onnx` is the one writer (atomic: a failed export leaves no file behind) and stamps every
graph with ``metaspike.*`` metadata (task, T, spike levels, input layout) that the runtimes read back
(:mod:`metaspike_d2.runtime`). :func:`export_classifier` exports a classifier; the Detectron2 models go
through :mod:`metaspike_d2.d2.export`.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .backbone import MetaSpikeFormer
from .reparam import reparameterize

__all__ = ["DEFAULT_OPSET", "METADATA_PREFIX", "export_onnx", "export_classifier", "spiking_settings"]

#: ONNX opset of the exported graphs (RoiAlign needs >= 16 for ``coordinate_transformation_mode``, i.e. aligned).
DEFAULT_OPSET = 17
#: Prefix of the metadata keys this project writes into a graph.
METADATA_PREFIX = "metaspike."


def spiking_settings(model: nn.Module) -> Dict[str, str]:
    """T and D of the (first) Meta-SpikeFormer inside ``model``, as graph metadata."""
    backbone = next((m for m in model.modules() if isinstance(m, MetaSpikeFormer)), None)
    if backbone is None:
        return {}
    return {"time_steps": str(backbone.time_steps), "spike_levels": str(int(backbone.spike_levels))}


def export_onnx(module: nn.Module, args: Tuple[torch.Tensor, ...], path: str | os.PathLike, *,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_axes: Mapping[str, Mapping[int, str]], metadata: Optional[Mapping[str, str]] = None,
                opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``module(*args)`` (eval mode, no autograd) to an ONNX file at ``path``, atomically.

    Uses the tracing exporter (``dynamo=False``): Detectron2's :class:`~detectron2.export.TracingAdapter`
    and the unrolled neuron loops are built for it. ``metadata`` is written as ``metaspike.<key>`` pairs.
    Raises ``ValueError`` if ``path`` does not end in ``.onnx``.
    """
    import onnx  # deferred: only exporting needs it

    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"export: the output file must end in .onnx, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # shapes are recorded as graph operations; the remaining tracer notes concern Python-side
            # constants (T, the neuron thresholds) that are static by design
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(module, tuple(args), tmp, input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        graph = onnx.load(tmp)
        for key, value in (metadata or {}).items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, str(value)
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export_classifier(model: nn.Module, path: str | os.PathLike, *, image_size: int = 224,
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export a Meta-SpikeFormer classifier in its fast re-parameterized form (``reparameterize(model,
    "fast")``): input ``image`` ``(B, 3, H, W)`` float32 (normalized as for PyTorch), output ``logits``
    ``(B, num_classes)`` (the mean over T). Batch, H and W are dynamic; ``image_size`` only sizes the trace."""
    fast = reparameterize(model, "fast")
    example = torch.zeros(1, 3, image_size, image_size)
    metadata = {"task": "classification", "input": "image: (B, 3, H, W) float32, normalized",
                **spiking_settings(fast)}
    return export_onnx(fast, (example,), path, input_names=["image"], output_names=["logits"],
                       dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
                       metadata=metadata, opset=opset)
