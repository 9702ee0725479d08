"""Single-image prediction and visualization (Detectron2's ``demo/predictor.py`` pattern).

:class:`MetaSpikePredictor` is ``DefaultPredictor`` loading weights through :class:`MetaSpikeCheckpointer`, or
running an exported graph (``backend="onnxruntime"`` / ``"openvino"``, :mod:`metaspike_d2.d2.export`);
:class:`VisualizationDemo` draws instance, semantic or panoptic outputs with Detectron2's ``Visualizer``.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from .export import build_inference_model

__all__ = ["MetaSpikePredictor", "VisualizationDemo"]


class MetaSpikePredictor:
    """``predictor(image (H, W, 3) uint8 BGR) -> model outputs`` for one image (eval mode, test resize).
    ``backend``: ``"pytorch"`` (``MODEL.WEIGHTS`` a checkpoint) or an exported graph's runtime."""

    def __init__(self, cfg, backend: str = "pytorch"):
        self.cfg = cfg.clone()
        self.model = build_inference_model(self.cfg, backend)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, original_image: np.ndarray) -> dict:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]


class VisualizationDemo:
    """Run a predictor and draw its outputs: ``instances``, ``sem_seg`` or ``panoptic_seg``."""

    def __init__(self, cfg, instance_mode: ColorMode = ColorMode.IMAGE, backend: str = "pytorch"):
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
        self.cpu_device = torch.device("cpu")
        self.instance_mode = instance_mode
        self.predictor = MetaSpikePredictor(cfg, backend)

    def _draw(self, visualizer, predictions: dict) -> VisImage:
        if "panoptic_seg" in predictions:
            panoptic_seg, segments_info = predictions["panoptic_seg"]
            return visualizer.draw_panoptic_seg_predictions(panoptic_seg.to(self.cpu_device), segments_info)
        if "sem_seg" in predictions:
            return visualizer.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to(self.cpu_device))
        return visualizer.draw_instance_predictions(predictions=predictions["instances"].to(self.cpu_device))

    def run_on_image(self, image: np.ndarray) -> Tuple[dict, VisImage]:
        """``image``: (H, W, 3) uint8 BGR. Returns the predictions and the visualized image (RGB)."""
        predictions = self.predictor(image)
        visualizer = Visualizer(image[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        return predictions, self._draw(visualizer, predictions)

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Yield visualized BGR frames of a video or webcam stream."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            success, frame = video.read()
            if not success:
                break
            predictions = self.predictor(frame)
            rgb = frame[:, :, ::-1]
            if "panoptic_seg" in predictions:
                panoptic_seg, segments_info = predictions["panoptic_seg"]
                vis = video_visualizer.draw_panoptic_seg_predictions(
                    rgb, panoptic_seg.to(self.cpu_device), segments_info)
            elif "instances" in predictions:
                vis = video_visualizer.draw_instance_predictions(rgb, predictions["instances"].to(self.cpu_device))
            else:
                vis = video_visualizer.draw_sem_seg(rgb, predictions["sem_seg"].argmax(dim=0).to(self.cpu_device))
            yield cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
