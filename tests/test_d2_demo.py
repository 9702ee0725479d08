"""tools/demo.py writes a visualization for an image (instances), and the predictor draws sem_seg outputs."""
import importlib.util

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from metaspike_d2.d2 import add_metaspike_config
from metaspike_d2.d2.predictor import VisualizationDemo
from metaspike_d2.data.shapes import render_shapes_image

QUICKSTART = "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml"
SMALL = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
         "MODEL.ROI_BOX_HEAD.CONV_DIM", "32"]


def test_demo_writes_visualization(tmp_path):
    image, _ = render_shapes_image(np.random.default_rng(0), (96, 128))
    path = tmp_path / "in.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    spec = importlib.util.spec_from_file_location("demo", "tools/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out_dir = tmp_path / "out"
    demo.main(["--config-file", QUICKSTART, "--input", str(path), "--output", str(out_dir) + "/",
               "--confidence-threshold", "0.0", "--opts", *SMALL])
    written = cv2.imread(str(out_dir / "in.png"))
    assert written is not None and written.shape == (96, 128, 3)


def test_visualization_of_sem_seg_outputs():
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list([*SMALL, "DATASETS.TEST", "('test_d2_demo_sem_seg',)"])
    MetadataCatalog.get("test_d2_demo_sem_seg").set(stuff_classes=["a", "b", "c"], stuff_colors=[[0, 0, 0]] * 3)
    vis_demo = VisualizationDemo(cfg)
    vis_demo.predictor = lambda image: {"sem_seg": torch.randn(3, *image.shape[:2])}
    predictions, vis = vis_demo.run_on_image(np.zeros((32, 48, 3), np.uint8))
    assert vis.get_image().shape == (32, 48, 3) and "sem_seg" in predictions
