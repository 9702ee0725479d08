"""Semantic-segmentation data: ADE20K/VOC prepare scripts on tiny fake trees, label shifting, registration,
missing-data errors, synthetic shapes and the training augmentation."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from metaspike_d2.data import DatasetNotFoundError  # noqa: E402
from metaspike_d2.data.ade20k import register_ade20k_sem_seg, shift_ade20k_labels  # noqa: E402
from metaspike_d2.data.shapes import ShapesSplit  # noqa: E402
from metaspike_d2.data.shapes_sem_seg import ensure_shapes_sem_seg_split, semantic_label  # noqa: E402
from metaspike_d2.data.voc import register_voc_sem_seg  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture
def restore_registrations():
    yield
    register_ade20k_sem_seg()
    register_voc_sem_seg()


def test_shift_ade20k_labels():
    label = np.array([[0, 1, 2], [149, 150, 0]], np.uint8)
    np.testing.assert_array_equal(shift_ade20k_labels(label), [[255, 0, 1], [148, 149, 255]])
    with pytest.raises(ValueError, match="0..150"):
        shift_ade20k_labels(np.array([[151]], np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        shift_ade20k_labels(np.array([[1]], np.int32))


def make_fake_ade20k(root):
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    labels = {}
    for split, names in (("training", ["ADE_train_1", "ADE_train_2"]), ("validation", ["ADE_val_1"])):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for name in names:
            image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(base / "images" / split / f"{name}.jpg")
            label = rng.integers(0, 151, (12, 16), dtype=np.uint8)
            label[0, :3] = [0, 1, 150]
            Image.fromarray(label).save(base / "annotations" / split / f"{name}.png")
            labels[(split, name)] = label
    return base, labels


def test_prepare_ade20k_and_registration(tmp_path, restore_registrations, capsys):
    base, labels = make_fake_ade20k(tmp_path)
    assert load_tool("prepare_ade20k_sem_seg").main(["--root", str(base)]) == 0
    assert "training: 2 label maps" in capsys.readouterr().out
    for (split, name), label in labels.items():
        out = np.asarray(Image.open(base / "annotations_detectron2" / split / f"{name}.png"))
        assert out.dtype == np.uint8 and out.shape == label.shape
        np.testing.assert_array_equal(out[0, :3], [255, 0, 149])
        np.testing.assert_array_equal(out, np.where(label == 0, 255, label.astype(int) - 1))
    register_ade20k_sem_seg(tmp_path)
    dicts = DatasetCatalog.get("ade20k_sem_seg_train")
    assert sorted(os.path.basename(d["file_name"]) for d in dicts) == ["ADE_train_1.jpg", "ADE_train_2.jpg"]
    assert all(d["sem_seg_file_name"].startswith(str(base / "annotations_detectron2" / "training")) for d in dicts)
    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255 and len(meta.stuff_classes) == 150
    # SemSegEvaluator through train_net's builder (NumPy-2-safe label reader): a perfect prediction -> mIoU 100
    import torch

    from metaspike_d2.d2.sem_seg import build_sem_seg_evaluator

    evaluator = build_sem_seg_evaluator("ade20k_sem_seg_val")
    evaluator.reset()
    for d in DatasetCatalog.get("ade20k_sem_seg_val"):
        gt = torch.from_numpy(np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64))
        logits = torch.nn.functional.one_hot(gt.clamp(max=149), 150).permute(2, 0, 1).float()
        evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": logits}])
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_missing_ade20k_names_paths_and_prepare_command(tmp_path, restore_registrations):
    register_ade20k_sem_seg(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        DatasetCatalog.get("ade20k_sem_seg_val")
    message = str(err.value)
    assert str(tmp_path / "ADEChallengeData2016" / "annotations_detectron2" / "validation") in message
    assert str(tmp_path / "ADEChallengeData2016" / "images" / "validation") in message
    assert "ADEChallengeData2016.zip" in message and "tools/prepare_ade20k_sem_seg.py" in message
    base, _ = make_fake_ade20k(tmp_path)  # downloaded but not prepared: only the prepare step is asked for
    with pytest.raises(DatasetNotFoundError, match="labels with `python tools/prepare_ade20k_sem_seg.py --root"):
        DatasetCatalog.get("ade20k_sem_seg_train")
    with pytest.raises(DatasetNotFoundError, match="ADE20K"):
        load_tool("prepare_ade20k_sem_seg").main(["--root", str(tmp_path / "nowhere")])


def test_prepare_voc_registration_and_missing(tmp_path, restore_registrations):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    register_voc_sem_seg(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="VOCtrainval_11-May-2012.tar.*tools/prepare_voc_sem_seg.py"):
        DatasetCatalog.get("voc_2012_sem_seg_train")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    label = np.zeros((10, 12), np.uint8)
    label[2:5, 3:7], label[0] = 15, 255
    palette = Image.fromarray(label).convert("P")
    palette.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    for name in ("2007_000001", "2007_000002"):
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        palette.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000002\n")
    with pytest.raises(DatasetNotFoundError, match="Create the Detectron2 labels"):
        DatasetCatalog.get("voc_2012_sem_seg_val")
    assert load_tool("prepare_voc_sem_seg").main(["--root", str(base)]) == 0
    out = Image.open(base / "SegmentationClass_detectron2" / "2007_000001.png")
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), label)  # indices, not the palette's grey levels
    dicts = DatasetCatalog.get("voc_2012_sem_seg_train")
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["2007_000001.jpg", "2007_000002.jpg"]
    meta = MetadataCatalog.get("voc_2012_sem_seg_val")
    assert len(meta.stuff_classes) == 21 and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"


def test_shapes_sem_seg_split(tmp_path):
    split = ShapesSplit(num_images=3, image_size=(32, 48), seed=5)
    images, labels = ensure_shapes_sem_seg_split("tiny", split, tmp_path)
    assert sorted(p.name for p in images.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    for file in labels.iterdir():
        label = np.asarray(Image.open(file))
        assert label.shape == (32, 48) and set(np.unique(label)) <= {0, 1, 2, 3} and label.max() > 0
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    np.testing.assert_array_equal(semantic_label((4, 4), [(2, mask)])[1:3, 1:3], 3)
    # deterministic: a second call finds the split and does not rewrite it
    stamp = (labels / "000000.png").stat().st_mtime_ns
    ensure_shapes_sem_seg_split("tiny", split, tmp_path)
    assert (labels / "000000.png").stat().st_mtime_ns == stamp


def test_registered_shapes_sem_seg_metadata():
    meta = MetadataCatalog.get("metaspike_shapes_sem_seg_val")
    assert meta.stuff_classes == ["background", "circle", "square", "triangle"]
    assert meta.evaluator_type == "sem_seg" and "metaspike_shapes_sem_seg_train" in DatasetCatalog.list()


def test_sem_seg_augmentation_resize_then_crop():
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T

    from metaspike_d2.d2 import add_metaspike_config
    from metaspike_d2.data.sem_seg_augmentation import build_sem_seg_augmentation

    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/ADE20K-SemanticSegmentation/semfpn_metaspike_15m_T1.yaml"))
    augs = build_sem_seg_augmentation(cfg)
    assert [type(a).__name__ for a in augs] == [
        "ResizeShortestEdge", "RandomCrop_CategoryAreaConstraint", "ColorAugSSDTransform", "RandomFlip"]
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    sem_seg = np.random.default_rng(1).integers(0, 150, (300, 400), dtype=np.uint8)
    aug_input = T.AugInput(image, sem_seg=sem_seg)
    T.AugmentationList(augs)(aug_input)
    h, w = aug_input.sem_seg.shape
    assert aug_input.image.shape[:2] == (h, w) and h <= 512 and w <= 512 and min(h, w) >= 256
