"""ONNX export of the Detectron2 models and a model that runs the exported graph in Detectron2's place.

:func:`export_detectron2_model` traces a built model (re-parameterized, ``MODEL.METASPIKE.REPARAM_INFERENCE``
or ``"fast"``) through Detectron2's :class:`~detectron2.export.TracingAdapter`: the graph takes one image
``(3, H, W)`` float32 in the config's ``INPUT.FORMAT`` after the test resize (normalization and padding are
inside the graph) and returns the model's outputs *before* post-processing, on the resized image:

* ``GeneralizedRCNN`` / ``RetinaNet``: ``pred_boxes (N, 4)``, ``scores (N,)``, ``pred_classes (N,)`` and, for
  Mask R-CNN, ``pred_masks (N, 1, M, M)`` (the mask head's probabilities);
* ``SemanticSegmentor``: ``sem_seg (K, H_pad, W_pad)``.

:class:`ExportedModel` is an ``nn.Module`` with the Detectron2 model's interface (``list[dict] -> list[dict]``):
it runs the graph on :class:`~metaspike_d2.runtime.GraphSession` and applies Detectron2's own
post-processing (``detector_postprocess``: rescaling and mask pasting; ``sem_seg_postprocess``), so
``inference_on_dataset``, the evaluators, the predictor and the demo use it unchanged.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from detectron2.export import TracingAdapter
from detectron2.layers import ROIAlign
from detectron2.modeling import GeneralizedRCNN, RetinaNet, SemanticSegmentor
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..export import DEFAULT_OPSET, export_onnx, spiking_settings
from ..reparam import reparameterize
from ..runtime import GraphSession
from .roi_align import MatmulROIAlign

__all__ = ["INFERENCE_BACKENDS", "INSTANCE_FIELDS", "export_detectron2_model", "ExportedModel", "graph_task",
           "build_inference_model"]

#: ``--backend`` choices: the PyTorch model (weights ``.pth``) or an exported graph (weights ``.onnx``).
INFERENCE_BACKENDS = ("pytorch", "onnxruntime", "openvino")

#: Output order of a detector's graph (Detectron2's ``Instances`` fields, masks only with a mask head).
INSTANCE_FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_masks")


def graph_task(model: nn.Module) -> str:
    """``"instances"`` (detectors) or ``"sem_seg"``; a clear error for any other meta-architecture."""
    if isinstance(model, (GeneralizedRCNN, RetinaNet)):
        return "instances"
    if isinstance(model, SemanticSegmentor):
        return "sem_seg"
    raise TypeError(f"export: {type(model).__name__} is not supported; exportable meta-architectures are "
                    "GeneralizedRCNN (Mask/Faster/Cascade R-CNN), RetinaNet and SemanticSegmentor")


def _inference(model: nn.Module, inputs: List[Dict[str, torch.Tensor]]):
    """One image through the model without post-processing, as a tuple in the graph's output order."""
    if isinstance(model, GeneralizedRCNN):  # GeneralizedRCNN.inference, with masks computed as _masks_of says
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        instances = model.roi_heads._forward_box(features, proposals)[0]
        if model.roi_heads.mask_on:
            instances = _masks_of(model.roi_heads, features, instances)
    elif isinstance(model, RetinaNet):
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        instances = model.forward_inference(images, features, model.head(features))[0]
    else:  # SemanticSegmentor (its forward, up to the logits on the padded image)
        images = [(x["image"] - model.pixel_mean) / model.pixel_std for x in inputs]
        images = ImageList.from_tensors(images, model.backbone.size_divisibility,
                                        padding_constraints=model.backbone.padding_constraints)
        logits, _ = model.sem_seg_head(model.backbone(images.tensor), None)
        return (logits[0],)
    fields = [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
    if instances.has("pred_masks"):
        fields.append(instances.pred_masks)
    return tuple(fields)


def _masks_of(heads: nn.Module, features, instances: Instances) -> Instances:
    """The mask head on ``instances`` plus one dummy box, which is dropped again: the graph then never runs the
    mask head on zero boxes, which ONNX's reshapes (GroupNorm's among them) cannot express. Every box's mask
    is computed on its own (GroupNorm and the neurons are per box), so the dummy changes no other mask."""
    dummy = Instances(instances.image_size, pred_boxes=Boxes(instances.pred_boxes.tensor.new_tensor([[0, 0, 1, 1]])),
                      scores=instances.scores.new_zeros(1), pred_classes=instances.pred_classes.new_zeros(1))
    padded = heads.forward_with_given_boxes(features, [Instances.cat([instances, dummy])])[0]
    return padded[:-1]


def export_detectron2_model(model: nn.Module, cfg, path: str | os.PathLike, *, reparam: str = "fast",
                            opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (built from ``cfg``, weights loaded) to ONNX, re-parameterized with ``reparam``.

    The trace uses one image of the test size (``INPUT.MIN_SIZE_TEST`` square, capped by ``MAX_SIZE_TEST``);
    image height and width stay dynamic. Returns the path written.
    """
    task = graph_task(model)
    model = reparameterize(model, reparam) if reparam else copy.deepcopy(model).eval()
    _use_onnx_roi_align(model)
    side = min(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = torch.rand(3, side, side) * 255
    adapter = TracingAdapter(model, [{"image": image}], inference_func=_inference)
    adapter.eval()
    if task == "sem_seg":
        names = ["sem_seg"]
        axes = {"sem_seg": {1: "padded_height", 2: "padded_width"}}
    else:
        names = list(INSTANCE_FIELDS[: len(adapter(*adapter.flattened_inputs))])
        axes = {n: {0: "detections"} for n in names}
    metadata = {"task": task, "meta_architecture": cfg.MODEL.META_ARCHITECTURE, "input_format": cfg.INPUT.FORMAT,
                "num_classes": str(_num_classes(cfg)), "outputs": ",".join(names),
                "input": "image: (3, H, W) float32 pixels after the test resize, INPUT.FORMAT channel order",
                "reparameterization": reparam or "none", **spiking_settings(model)}
    return export_onnx(adapter, adapter.flattened_inputs, path, input_names=["image"], output_names=names,
                       dynamic_axes={"image": {1: "height", 2: "width"}, **axes}, metadata=metadata, opset=opset)


def _use_onnx_roi_align(model: nn.Module) -> None:
    """Swap the matmul RoIAlign (a CPU training kernel whose sampling grid is sized from the data) for
    Detectron2's ``ROIAlign``, which exports to ONNX's ``RoiAlign`` with the same sampling (equal within
    1e-12 in float64, tests/test_roi_align.py)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, MatmulROIAlign):
                setattr(parent, name, ROIAlign(child.output_size, child.spatial_scale, child.sampling_ratio,
                                               aligned=child.aligned))


def _num_classes(cfg) -> int:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "SemanticSegmentor":
        return cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    return cfg.MODEL.RETINANET.NUM_CLASSES if "RetinaNet" in arch else cfg.MODEL.ROI_HEADS.NUM_CLASSES


class ExportedModel(nn.Module):
    """An exported graph with the Detectron2 model's interface: ``model(list of {"image", "height",
    "width"}) -> list of {"instances"} or {"sem_seg"}``, post-processed by Detectron2 as the PyTorch
    model does. ``backend``: ``"onnxruntime"`` or ``"openvino"``; ``threads`` 0: the runtime's default.

    The graph's metadata must agree with ``cfg`` (meta-architecture, class count, input format, T and
    spike levels): a graph exported from another config is refused with both values named.
    """

    def __init__(self, cfg, path: str | os.PathLike, backend: str = "onnxruntime", threads: int = 0):
        super().__init__()
        self.session = GraphSession(path, backend, threads)
        meta = self.session.metadata
        expected = {"meta_architecture": cfg.MODEL.META_ARCHITECTURE, "num_classes": str(_num_classes(cfg)),
                    "input_format": cfg.INPUT.FORMAT, "time_steps": str(cfg.MODEL.METASPIKE.T),
                    "spike_levels": str(cfg.MODEL.METASPIKE.SPIKE_LEVELS)}
        for key, value in expected.items():
            if key in meta and meta[key] != value:
                raise ValueError(f"{path}: the graph was exported with {key}={meta[key]}, the config says {value}; "
                                 "export it again from this config (tools/export_model.py --config-file ...)")
        if meta.get("task") not in ("instances", "sem_seg"):
            raise ValueError(f"{path}: not a Detectron2 graph of this project (metadata task={meta.get('task')!r}); "
                             "export it with tools/export_model.py --config-file CFG")
        self.task = meta["task"]
        self.output_names = meta.get("outputs", "").split(",")
        self.eval()  # inference only: forward refuses training mode

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, object]]:
        if self.training:
            raise RuntimeError("an exported graph runs inference only")
        return [self._one(x) for x in batched_inputs]

    def _one(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, object]:
        image = inputs["image"]
        image_size = tuple(image.shape[-2:])
        height, width = inputs.get("height", image_size[0]), inputs.get("width", image_size[1])
        outputs = dict(zip(self.output_names, self.session(image.float().cpu().numpy())))
        if self.task == "sem_seg":
            logits = torch.from_numpy(outputs["sem_seg"])
            return {"sem_seg": sem_seg_postprocess(logits, image_size, height, width)}
        instances = Instances(image_size)
        instances.pred_boxes = Boxes(torch.from_numpy(outputs["pred_boxes"]))
        instances.scores = torch.from_numpy(outputs["scores"])
        instances.pred_classes = torch.from_numpy(outputs["pred_classes"].astype(np.int64))
        if "pred_masks" in outputs:
            instances.pred_masks = torch.from_numpy(outputs["pred_masks"])
        return {"instances": detector_postprocess(instances, height, width)}


def build_inference_model(cfg, backend: str = "pytorch") -> nn.Module:
    """The model that ``--eval-only``, the predictor and the demo run, in eval mode.

    ``"pytorch"``: built from ``cfg``, ``MODEL.WEIGHTS`` loaded (``weights_only``), then
    ``MODEL.METASPIKE.REPARAM_INFERENCE`` applied. ``"onnxruntime"`` / ``"openvino"``: ``MODEL.WEIGHTS`` is a
    graph written by ``tools/export_model.py`` and runs as an :class:`ExportedModel` with ``CPU_THREADS`` threads.
    """
    if backend not in INFERENCE_BACKENDS:
        raise ValueError(f"backend must be one of {INFERENCE_BACKENDS}, got {backend!r}")
    weights = cfg.MODEL.WEIGHTS
    if backend == "pytorch":
        if weights.endswith(".onnx"):
            raise ValueError(f"MODEL.WEIGHTS {weights} is an exported graph: run it with --backend onnxruntime "
                             "(or openvino)")
        from detectron2.modeling import build_model

        from .checkpoint import MetaSpikeCheckpointer
        from .config import maybe_reparameterize

        model = build_model(cfg).eval()
        MetaSpikeCheckpointer(model).load(weights)
        return maybe_reparameterize(cfg, model)
    if not weights.endswith(".onnx"):
        raise ValueError(f"--backend {backend} runs an exported graph, so MODEL.WEIGHTS must be a .onnx file, got "
                         f"{weights!r}; write one with: python tools/export_model.py --config-file CFG "
                         "--output model.onnx MODEL.WEIGHTS model_final.pth")
    return ExportedModel(cfg, weights, backend, threads=max(int(cfg.CPU_THREADS), 0)).eval()
