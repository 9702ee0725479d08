"""Own datasets from the command line (metaspike_d2/data/own_data.py): COCO json, Pascal VOC XML and
semantic-segmentation PNGs, their errors, the class count set from the data, and two tiny training runs."""
import argparse
import importlib.util
import itertools
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from metaspike_d2.data import DatasetNotFoundError, own_data
from metaspike_d2.data.own_data import DatasetFormatError

ROOT = Path(__file__).resolve().parents[1]
DET_CFG = str(ROOT / "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml")
SEM_CFG = str(ROOT / "configs/quickstart/semfpn_metaspike_tiny_shapes.yaml")
_ids = itertools.count()


def _name(stem="own"):
    """A dataset name not used before in this process (registrations are process-global)."""
    return f"test_{stem}_{next(_ids)}"


def _load(tool):
    spec = importlib.util.spec_from_file_location(tool, ROOT / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_net():
    return _load("train_net")


def _parse(*argv):
    return own_data.add_dataset_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def _write_image(path, width=64, height=48, boxes=(), seed=0):
    """Noise with a bright rectangle per box ((x0, y0, x1, y1), 0-based, exclusive), as .jpg or .png."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        array[y0:y1, x0:x1] = (220, 40, 40) if i % 2 == 0 else (40, 40, 220)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _xml(filename, width, height, objects=(), size=True):
    """A Pascal VOC annotation; objects: (name, xmin, ymin, xmax, ymax[, difficult]) in 1-based pixels."""
    objs = ""
    for obj in objects:
        name, xmin, ymin, xmax, ymax, difficult = (*obj, 0)[:6]
        objs += (f"<object><name>{name}</name><pose>Unspecified</pose><difficult>{difficult}</difficult>"
                 f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
                 "</object>")
    size_xml = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>images</folder><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def _voc_set(root, annotations, width=64, height=48):
    """root/images/<stem>.jpg and root/annotations/<stem>.xml for {stem: [objects]}."""
    for i, (stem, objects) in enumerate(annotations.items()):
        boxes = [(int(o[1]) - 1, int(o[2]) - 1, int(o[3]), int(o[4])) for o in objects]
        _write_image(root / "images" / f"{stem}.jpg", width, height, boxes, seed=i)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{stem}.xml").write_text(_xml(f"{stem}.jpg", width, height, objects))
    return str(root / "images"), str(root / "annotations")


def _register_voc(*sets, classes=None):
    """Register VOC folder pairs (image_dir, ann_dir) under new names; returns the names."""
    names = [_name("voc") for _ in sets]
    argv = [a for n, (i, a_) in zip(names, sets) for a in ("--register-voc", n, i, a_)]
    own_data.register_from_args(_parse(*argv, *(["--classes", classes] if classes else [])))
    return names


# ---------------------------------------------------------------------------------------------------------
# Pascal VOC


def test_voc_boxes_converted_and_class_order_is_the_union_of_all_sets(tmp_path):
    train = _voc_set(tmp_path / "train", {
        "a": [("raccoon", 5, 7, 20, 30), ("cat", 1, 1, 64, 48, 1)],  # the whole image, difficult
        "b": [("raccoon", 0, 3, 65, 10)],                            # 1 px outside on both sides: clipped
        "c": []})                                                    # no boxes: kept, counted
    val = _voc_set(tmp_path / "val", {"d": [("dog", 10, 10, 30, 40)]})
    train_name, val_name = _register_voc(train, val)
    dicts = DatasetCatalog.get(train_name)
    assert [Path(d["file_name"]).name for d in dicts] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [d["image_id"] for d in dicts] == [0, 1, 2] and (dicts[0]["height"], dicts[0]["width"]) == (48, 64)
    classes = ["cat", "dog", "raccoon"]  # sorted union over train and val: one order for both
    for name in (train_name, val_name):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == classes and meta.evaluator_type == "coco"
    a = dicts[0]["annotations"]
    assert a[0] == {"bbox": [4.0, 6.0, 20.0, 30.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2}
    assert a[1]["bbox"] == [0.0, 0.0, 64.0, 48.0] and a[1]["category_id"] == 0  # (1, 1, W, H) -> the image
    assert dicts[1]["annotations"][0]["bbox"] == [0.0, 2.0, 64.0, 10.0]
    assert dicts[2]["annotations"] == []
    assert DatasetCatalog.get(val_name)[0]["annotations"][0]["category_id"] == 1
    summary = own_data._FROM_ARGS[train_name]["summary"]
    assert "3 images, 3 boxes" in summary and "1 marked difficult: kept" in summary
    assert "1 boxes reached up to 1 px outside" in summary and "1 images without boxes" in summary
    dicts[0]["annotations"].clear()  # callers get copies
    assert len(DatasetCatalog.get(train_name)[0]["annotations"]) == 2


def test_voc_classes_option_fixes_the_order_and_unannotated_images_are_counted(tmp_path):
    images, anns = _voc_set(tmp_path, {"a": [("raccoon", 5, 7, 20, 30)], "b": [("cat", 2, 2, 9, 9)]})
    _write_image(tmp_path / "images" / "spare.png")
    (tmp_path / "annotations" / "b.xml").write_text(_xml("b.png", 64, 48, [("cat", 2, 2, 9, 9)]))  # it is b.jpg
    (name,) = _register_voc((images, anns), classes="raccoon,cat,dog")
    assert MetadataCatalog.get(name).thing_classes == ["raccoon", "cat", "dog"]
    assert [d["annotations"][0]["category_id"] for d in DatasetCatalog.get(name)] == [0, 1]
    summary = own_data._FROM_ARGS[name]["summary"]
    assert "1 images in" in summary and "spare.png" in summary and "classes without any box here: ['dog']" in summary
    assert "1 XMLs name an image that does not exist, the image of the same stem and another extension was used: " \
           "b.xml" in summary and DatasetCatalog.get(name)[1]["file_name"].endswith("b.jpg")


def _bad_voc(tmp_path, case):
    """A VOC folder pair with one defect; returns (image_dir, ann_dir, --classes, error type, message parts)."""
    images, anns = _voc_set(tmp_path, {"ok": [("raccoon", 5, 7, 20, 30)]})
    bad = tmp_path / "annotations" / "bad.xml"
    _write_image(tmp_path / "images" / "bad.jpg")
    xml, classes, err, parts = None, None, DatasetFormatError, [str(bad)]
    if case == "no size":
        xml, parts = _xml("bad.jpg", 64, 48, [("raccoon", 1, 1, 5, 5)], size=False), [str(bad), "no <size>"]
    elif case == "zero size":
        xml, parts = _xml("bad.jpg", 0, 48, [("raccoon", 1, 1, 5, 5)]), [str(bad), "width 0"]
    elif case == "size mismatch":
        xml, parts = _xml("bad.jpg", 640, 480), [str(bad), "640x480", "64x48"]
    elif case == "box outside":
        xml, parts = _xml("bad.jpg", 64, 48, [("raccoon", 10, 5, 70, 20)]), [str(bad), "xmax=70", "64x48"]
    elif case == "empty box":
        xml, parts = _xml("bad.jpg", 64, 48, [("raccoon", 20, 5, 20, 9)]), [str(bad), "xmin=20", "xmax=20"]
    elif case == "missing image":
        xml, err = _xml("gone.jpg", 64, 48), DatasetNotFoundError
        parts = [str(bad), str(tmp_path / "images" / "gone.jpg")]
    elif case == "unknown class":
        xml, classes, parts = _xml("bad.jpg", 64, 48, [("dgo", 1, 1, 5, 5)]), "raccoon,dog", [str(bad), "'dgo'"]
    elif case == "not xml":
        xml, parts = "<annotation><size>", [str(bad), "not valid XML"]
    elif case == "empty dir":
        anns, err = str(tmp_path / "empty"), DatasetNotFoundError
        (tmp_path / "empty").mkdir()
        parts = [anns, "no .xml files"]
    if xml is not None:
        bad.write_text(xml)
    return images, anns, classes, err, parts


@pytest.mark.parametrize("case", ["no size", "zero size", "size mismatch", "box outside", "empty box",
                                  "missing image", "unknown class", "not xml", "empty dir"])
def test_voc_bad_input_names_file_and_value(tmp_path, case):
    images, anns, classes, err, parts = _bad_voc(tmp_path, case)
    with pytest.raises(err) as info:
        _register_voc((images, anns), classes=classes)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_names_must_be_new_and_repeating_a_command_line_is_a_no_op(tmp_path):
    images, anns = _voc_set(tmp_path, {"a": [("raccoon", 5, 7, 20, 30)]})
    with pytest.raises(DatasetFormatError, match="'metaspike_shapes_train' is already registered"):
        own_data.register_from_args(_parse("--register-voc", "metaspike_shapes_train", images, anns))
    name = _name()
    with pytest.raises(DatasetFormatError, match=f"'{name}' is given twice"):
        own_data.register_from_args(_parse("--register-voc", name, images, anns, "--register-voc", name, images, anns))
    args = _parse("--register-voc", name, images, anns)
    assert own_data.register_from_args(args) == [name]
    assert own_data.register_from_args(pickle.loads(pickle.dumps(args))) == [name]  # same command line: no-op
    with pytest.raises(DatasetFormatError, match=f"'{name}' is already registered"):
        own_data.register_from_args(_parse("--register-voc", name, images, anns, "--classes", "raccoon"))
    # a bad set registers nothing: the good one before it can be registered once the data is fixed
    other, bad = _name(), _bad_voc(tmp_path / "bad", "no size")
    args = _parse("--register-voc", other, images, anns, "--register-voc", _name(), *bad[:2])
    with pytest.raises(DatasetFormatError, match="no <size>"):
        own_data.register_from_args(args)
    assert other not in DatasetCatalog.list()
    (tmp_path / "bad" / "annotations" / "bad.xml").unlink()
    assert own_data.register_from_args(args)[0] == other
    with pytest.raises(DatasetFormatError, match="before the first KEY VALUE"):
        own_data.register_from_args(argparse.Namespace(opts=["SOLVER.MAX_ITER", "2", "--register-voc", "x"]))


# ---------------------------------------------------------------------------------------------------------
# COCO json


def _coco(tmp_path, images=("x.jpg", "y.jpg"), write=("x.jpg", "y.jpg")):
    for f in write:
        _write_image(tmp_path / "img" / f)
    data = {"images": [{"id": i + 1, "file_name": f, "width": 64, "height": 48} for i, f in enumerate(images)],
            "categories": [{"id": 3, "name": "b"}, {"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 12], "area": 120,
                             "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return str(tmp_path / "ann.json"), str(tmp_path / "img")


def test_coco_json_registration(tmp_path):
    json_file, image_dir = _coco(tmp_path)
    name = _name("coco")
    own_data.register_from_args(_parse("--register-coco", name, json_file, image_dir))
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["a", "b"] and meta.evaluator_type == "coco" and meta.json_file == json_file
    dicts = DatasetCatalog.get(name)  # Detectron2's load_coco_json: contiguous ids in the same order
    assert len(dicts) == 2 and dicts[0]["annotations"][0]["category_id"] == 1
    assert dicts[0]["annotations"][0]["bbox"] == [2, 3, 10, 12] and meta.thing_classes == ["a", "b"]
    summary = own_data._FROM_ARGS[name]["summary"]
    assert "1 images without boxes" in summary and "a (id 1)" in summary  # class without annotations
    missing = tmp_path / "m"
    json_file, image_dir = _coco(missing, write=("x.jpg",))
    with pytest.raises(DatasetNotFoundError, match=r"1 of 2 images are not in .*: y\.jpg"):
        own_data.register_from_args(_parse("--register-coco", _name(), json_file, image_dir))


# ---------------------------------------------------------------------------------------------------------
# semantic segmentation PNGs


def _sem_seg_set(root, stems=("a", "b", "c"), num_classes=3, ignore=11, size=(64, 48)):
    """CamVid-like: root/train/<stem>.jpg, root/trainannot/<stem>.png (values 0..K-1 and ``ignore``)."""
    for i, stem in enumerate(stems):
        _write_image(root / "train" / f"{stem}.jpg", *size, seed=i)
        label = np.zeros(size[::-1], np.uint8)
        w = size[0] // num_classes
        for k in range(num_classes):
            label[:, k * w:(k + 1) * w] = k
        label[:4] = ignore
        (root / "trainannot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(root / "trainannot" / f"{stem}.png")
    names = ["sky", "road", "car", "pedestrian"][:num_classes]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return str(root / "train"), str(root / "trainannot"), str(root / "classes.txt")


def test_sem_seg_pairs_by_stem_with_camvid_ignore_label(tmp_path):
    images, labels, classes = _sem_seg_set(tmp_path)
    name = _name("sem")
    own_data.register_from_args(_parse("--register-sem-seg", name, images, labels, classes, "--ignore-label", "11"))
    dicts = DatasetCatalog.get(name)
    assert [(Path(d["file_name"]).name, Path(d["sem_seg_file_name"]).name) for d in dicts] == [
        ("a.jpg", "a.png"), ("b.jpg", "b.png"), ("c.jpg", "c.png")]
    assert (dicts[0]["height"], dicts[0]["width"]) == (48, 64)
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == ["sky", "road", "car"] and meta.ignore_label == 11
    assert meta.evaluator_type == "sem_seg"
    assert "ignore label 11 (8.3% of the pixels)" in own_data._FROM_ARGS[name]["summary"]


def _bad_sem_seg(tmp_path, case):
    images, labels, classes = _sem_seg_set(tmp_path)
    root, ignore = tmp_path, "11"
    if case == "value out of range":
        label = np.zeros((48, 64), np.uint8)
        label[5, 5] = 7
        Image.fromarray(label).save(root / "trainannot" / "b.png")
        return images, labels, classes, ignore, DatasetFormatError, [str(root / "trainannot" / "b.png"), "value(s) 7"]
    if case == "default ignore 255 refuses 11":
        return images, labels, classes, None, DatasetFormatError, [str(root / "trainannot" / "a.png"), "value(s) 11"]
    if case == "size mismatch":
        Image.fromarray(np.zeros((40, 64), np.uint8)).save(root / "trainannot" / "c.png")
        return images, labels, classes, ignore, DatasetFormatError, [str(root / "trainannot" / "c.png"), "64x40",
                                                                     str(root / "train" / "c.jpg"), "64x48"]
    if case == "image without label":
        _write_image(root / "train" / "d.jpg")
        return images, labels, classes, ignore, DatasetFormatError, [str(root / "train" / "d.jpg"), "no label"]
    if case == "label without image":
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "trainannot" / "e.png")
        return images, labels, classes, ignore, DatasetFormatError, [str(root / "trainannot" / "e.png"), "no image"]
    if case == "missing classes.txt":
        gone = str(root / "nope.txt")
        return images, labels, gone, ignore, DatasetNotFoundError, [gone, "does not exist"]
    if case == "empty label dir":
        (root / "empty").mkdir()
        return images, str(root / "empty"), classes, ignore, DatasetNotFoundError, [str(root / "empty"), "no .png"]
    if case == "colour label":
        Image.fromarray(np.dstack([np.zeros((48, 64), np.uint8), np.ones((48, 64), np.uint8),
                                   np.zeros((48, 64), np.uint8)])).save(root / "trainannot" / "a.png")
        return images, labels, classes, ignore, DatasetFormatError, [str(root / "trainannot" / "a.png"), "colour RGB"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["value out of range", "default ignore 255 refuses 11", "size mismatch",
                                  "image without label", "label without image", "missing classes.txt",
                                  "empty label dir", "colour label"])
def test_sem_seg_bad_input_names_file_and_value(tmp_path, case):
    images, labels, classes, ignore, err, parts = _bad_sem_seg(tmp_path, case)
    argv = ["--register-sem-seg", _name(), images, labels, classes] + (["--ignore-label", ignore] if ignore else [])
    with pytest.raises(err) as info:
        own_data.register_from_args(_parse(*argv))
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


# ---------------------------------------------------------------------------------------------------------
# the config: NUM_CLASSES from the data, through tools/train_net.py's parser and load_config


def test_num_classes_follow_the_data_unless_given(train_net, tmp_path):
    train = _voc_set(tmp_path / "t", {"a": [("raccoon", 5, 7, 20, 30), ("cat", 2, 2, 9, 9)]})
    val = _voc_set(tmp_path / "v", {"b": [("dog", 5, 7, 20, 30)]})
    tn, vn = _name("voc"), _name("voc")
    head = ["--config-file", DET_CFG, "--register-voc", tn, *train, "--register-voc", vn, *val]
    sets = ["DATASETS.TRAIN", f"('{tn}',)", "DATASETS.TEST", f"('{vn}',)", "MODEL.MASK_ON", "False"]
    args = train_net.argument_parser().parse_args([*head, *sets])
    assert args.register_voc == [[tn, *train], [vn, *val]]
    cfg = train_net.load_config(args)  # the quickstart config says 3 (the shapes)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and cfg.MODEL.RETINANET.NUM_CLASSES == 3
    assert MetadataCatalog.get(vn).thing_classes == ["cat", "dog", "raccoon"]
    lines = own_data.log_summary(cfg, args.opts, log=lambda line: None)
    assert f"MODEL.ROI_HEADS.NUM_CLASSES = 3: set from dataset {tn}" in lines

    # a worker process starts with empty catalogs and gets only the (pickled) arguments: same config
    for n in (tn, vn):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
        own_data._FROM_ARGS.pop(n)
    worker_cfg = train_net.load_config(pickle.loads(pickle.dumps(args)))
    assert worker_cfg.dump() == cfg.dump() and MetadataCatalog.get(tn).thing_classes == ["cat", "dog", "raccoon"]

    agree = train_net.load_config(train_net.argument_parser().parse_args(
        [*head, *sets, "MODEL.ROI_HEADS.NUM_CLASSES", "3"]))
    assert agree.MODEL.ROI_HEADS.NUM_CLASSES == 3
    with pytest.raises(DatasetFormatError, match=rf"MODEL.ROI_HEADS.NUM_CLASSES 5 is given on the command line, "
                                                 rf"but dataset {tn} has 3 classes \['cat', 'dog', 'raccoon'\]"):
        train_net.load_config(train_net.argument_parser().parse_args(
            [*head, *sets, "MODEL.ROI_HEADS.NUM_CLASSES", "5"]))
    with pytest.raises(DatasetFormatError, match=f"MODEL.MASK_ON is True but dataset {tn} has boxes only"):
        train_net.load_config(train_net.argument_parser().parse_args([*head, *sets[:4]]))
    # --eval-only / demo: no own training set -> the test set's classes
    cfg = train_net.load_config(train_net.argument_parser().parse_args(
        [*head, "--eval-only", "DATASETS.TEST", f"('{vn}',)", "MODEL.MASK_ON", "False"]))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3


def test_sem_seg_num_classes_and_ignore_value(train_net, tmp_path):
    images, labels, classes = _sem_seg_set(tmp_path)
    name = _name("sem")
    head = ["--config-file", SEM_CFG, "--register-sem-seg", name, images, labels, classes, "--ignore-label", "11"]
    sets = ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)"]
    cfg = train_net.load_config(train_net.argument_parser().parse_args([*head, *sets]))
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3 and cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 11
    with pytest.raises(DatasetFormatError, match=r"MODEL.SEM_SEG_HEAD.NUM_CLASSES 4 is given .* has 3 classes"):
        train_net.load_config(train_net.argument_parser().parse_args(
            [*head, *sets, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"]))
    with pytest.raises(DatasetFormatError, match="semantic segmentation dataset but the config's "
                                                 "MODEL.META_ARCHITECTURE is GeneralizedRCNN"):
        train_net.load_config(train_net.argument_parser().parse_args([*head[:1], DET_CFG, *head[2:], *sets]))


def test_demo_and_energy_tool_use_the_registered_dataset(tmp_path):
    images, anns = _voc_set(tmp_path, {"a": [("raccoon", 5, 7, 20, 30)], "b": [("cat", 2, 2, 9, 9)]})
    demo = _load("demo")
    name = _name("voc")
    args = demo.get_parser().parse_args(["--config-file", DET_CFG, "--register-voc", name, images, anns,
                                         "--opts", "MODEL.MASK_ON", "False"])
    cfg = demo.setup_cfg(args)
    assert cfg.DATASETS.TEST == (name,) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2  # class names: ["cat", "raccoon"]
    tool = _load("analyze_energy")
    args = tool.parse_args(["--config-file", DET_CFG, "--register-voc", name, images, anns, "--dataset", name,
                            "--num-images", "1", "MODEL.MASK_ON", "False", "DATASETS.TEST", f"('{name}',)"])
    assert tool._own_data_opts(args)[:2] == ["MODEL.ROI_HEADS.NUM_CLASSES", 2]
    raw, source = tool._images(args, (64, 64))
    assert source == name and len(raw) == 1 and raw[0].shape == (48, 64, 3)


# ---------------------------------------------------------------------------------------------------------
# end to end: tools/train_net.py on generated data (2 iterations, then the evaluation)


def test_train_net_on_voc_xml_end_to_end(train_net, tmp_path):
    def objects(i):
        return [("red", 5 + i, 6, 30 + i, 34), ("blue", 36, 30 - i, 60, 60)][:1 + i % 2]

    train = _voc_set(tmp_path / "train", {f"t{i}": objects(i) for i in range(4)}, 64, 64)
    val = _voc_set(tmp_path / "val", {f"v{i}": objects(i) for i in range(2)}, 64, 64)
    tn, vn = _name("e2e_voc"), _name("e2e_voc")
    out = tmp_path / "out"
    args = train_net.argument_parser().parse_args([
        "--config-file", DET_CFG, "--register-voc", tn, *train, "--register-voc", vn, *val,
        "DATASETS.TRAIN", f"('{tn}',)", "DATASETS.TEST", f"('{vn}',)", "MODEL.MASK_ON", "False",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "CPU_PROCESSES", "1",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL_EMA.ENABLED", "False", "OUTPUT_DIR", str(out)])
    train_net.launch_from_args(args)
    log = (out / "log.txt").read_text()
    assert f"MODEL.ROI_HEADS.NUM_CLASSES = 2: set from dataset {tn}" in log
    assert "Evaluation results for bbox" in log and re.search(r"\|\s+AP\s+\|\s+AP50\s+\|", log), log[-3000:]
    assert re.search(r"copypaste: (nan|[0-9.]+),", log)  # the AP values (anything after 2 iterations)
    assert (out / "inference" / f"{vn}_coco_format.json").exists()  # converted by COCOEvaluator


def test_train_net_on_sem_seg_pngs_end_to_end(train_net, tmp_path):
    images, labels, classes = _sem_seg_set(tmp_path, stems=("a", "b", "c", "d"), size=(64, 64))
    name = _name("e2e_sem")
    out = tmp_path / "out"
    train_net.launch_from_args(train_net.argument_parser().parse_args([
        "--config-file", SEM_CFG, "--register-sem-seg", name, images, labels, classes, "--ignore-label", "11",
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)", "SOLVER.MAX_ITER", "2",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "CPU_PROCESSES", "1", "OUTPUT_DIR", str(out)]))
    log = (out / "log.txt").read_text()
    assert "MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 11: set from dataset" in log
    assert "mIoU" in log and "IoU-car" in log, log[-3000:]
