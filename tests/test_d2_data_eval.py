"""Synthetic shapes dataset (determinism, COCO files), COCO evaluation on it, and missing-dataset errors."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn

from metaspike_d2.data import DatasetNotFoundError, add_dataset_path_checks
from metaspike_d2.data.shapes import (
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    ShapesSplit,
    iter_shapes_split,
    register_shapes_instances,
    render_shapes_image,
)


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", "tools/train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builtin_splits_registered():
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"metaspike_shapes_{split}")
        assert meta.evaluator_type == "coco" and meta.thing_classes == list(SHAPES_CLASSES)
    assert SHAPES_SPLITS["train"].seed != SHAPES_SPLITS["val"].seed


def test_renderer_is_deterministic_and_masks_are_disjoint():
    a = list(iter_shapes_split(ShapesSplit(5, (64, 80), seed=3)))
    b = list(iter_shapes_split(ShapesSplit(5, (64, 80), seed=3)))
    c = list(iter_shapes_split(ShapesSplit(5, (64, 80), seed=4)))
    for (_, ia, ma), (_, ib, mb) in zip(a, b):
        assert np.array_equal(ia, ib) and len(ma) == len(mb)
        assert all(ca == cb and np.array_equal(x, y) for (ca, x), (cb, y) in zip(ma, mb))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))
    image, instances = render_shapes_image(np.random.default_rng(0), (96, 96))
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and instances
    total = np.zeros((96, 96), int)
    for cls, mask in instances:
        assert 0 <= cls < len(SHAPES_CLASSES) and mask.dtype == bool and mask.sum() >= 30
        total += mask
    assert total.max() == 1  # visible masks never overlap


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2ds")
    name = "test_d2_shapes_tiny"
    if name not in DatasetCatalog.list():
        register_shapes_instances(name, "tiny", ShapesSplit(6, (64, 64), seed=7), root)
    return name, root


def test_split_written_in_coco_format_on_first_use(tiny_shapes):
    name, root = tiny_shapes
    json_file = root / "metaspike_shapes_v1" / "annotations" / "instances_tiny.json"
    assert not json_file.exists()
    dicts = DatasetCatalog.get(name)
    assert json_file.is_file() and len(dicts) == 6
    coco = json.loads(json_file.read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPES_CLASSES)
    assert all(isinstance(a["segmentation"]["counts"], str) and a["area"] > 0 for a in coco["annotations"])
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert all(0 <= a["category_id"] < 3 for d in dicts for a in d["annotations"])  # contiguous ids


class _OracleModel(nn.Module):
    """Returns the ground truth of each image as predictions (AP must be 100)."""

    def __init__(self, dicts):
        super().__init__()
        self.by_id = {d["image_id"]: d for d in dicts}

    def forward(self, inputs):
        import pycocotools.mask as mask_util
        outputs = []
        for x in inputs:
            d = self.by_id[x["image_id"]]
            inst = Instances((d["height"], d["width"]))
            anns = d["annotations"]
            inst.pred_boxes = Boxes(torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                   a["bbox"][1] + a["bbox"][3]] for a in anns]))
            inst.scores = torch.ones(len(anns))
            inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
            inst.pred_masks = BitMasks(torch.stack([torch.from_numpy(mask_util.decode(a["segmentation"])).bool()
                                                    for a in anns])).tensor
            outputs.append({"instances": inst})
        return outputs


def test_coco_evaluation_of_perfect_predictions(tiny_shapes, tmp_path):
    name, _ = tiny_shapes
    train_net = _load_train_net()
    from detectron2.config import get_cfg
    from metaspike_d2.d2 import add_metaspike_config
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file("configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml")
    evaluator = train_net.Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    results = inference_on_dataset(_OracleModel(DatasetCatalog.get(name)), build_detection_test_loader(cfg, name),
                                   evaluator)
    assert results["bbox"]["AP50"] == pytest.approx(100.0) and results["segm"]["AP"] == pytest.approx(100.0)


def test_missing_coco_names_expected_paths(tmp_path):
    name = "coco_test_d2_missing"
    json_file, image_root = tmp_path / "coco/annotations/instances_x.json", tmp_path / "coco/x"
    register_coco_instances(name, {}, str(json_file), str(image_root))
    add_dataset_path_checks("coco")
    with pytest.raises(DatasetNotFoundError) as e:
        DatasetCatalog.get(name)
    assert str(json_file) in str(e.value) and str(image_root) in str(e.value) and "DETECTRON2_DATASETS" in str(e.value)
    assert getattr(DatasetCatalog["coco_2017_val"], "path_checked", False)  # detectron2's builtin names too


def test_detr_style_augmentation_chain():
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from metaspike_d2.d2 import add_metaspike_config
    from metaspike_d2.data import build_detection_augmentation
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file("configs/Base-MetaSpike-RCNN-FPN.yaml")
    augs = build_detection_augmentation(cfg, is_train=True)
    assert [type(a) for a in augs] == [T.RandomFlip, T.ResizeShortestEdge, T.RandomCrop, T.ResizeShortestEdge]
    assert list(augs[1].short_edge_length) == [400, 500, 600] and augs[2].crop_size == [384, 600]
    image = np.zeros((480, 640, 3), np.uint8)
    out = T.AugmentationList(augs)(T.AugInput(image))
    assert out is not None
    assert [type(a) for a in build_detection_augmentation(cfg, is_train=False)] == [T.ResizeShortestEdge]
