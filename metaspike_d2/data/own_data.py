"""Register one's own datasets from the command line (``tools/train_net.py``, ``tools/demo.py``,
``tools/analyze_energy.py``), without writing Python::

    --register-coco NAME JSON IMAGE_DIR                          COCO json (Detectron2's register_coco_instances)
    --register-voc NAME IMAGE_DIR ANNOTATION_DIR [--classes a,b] Pascal VOC XML boxes, one XML per image
    --register-sem-seg NAME IMAGE_DIR LABEL_DIR CLASSES_TXT [--ignore-label N]   label PNGs (class indices)

Each flag is repeatable and registers ``NAME`` for ``DATASETS.TRAIN`` / ``DATASETS.TEST``. Everything is
read and checked once, at registration: bad input raises :class:`DatasetFormatError` (a ``ValueError``;
content) or :class:`DatasetNotFoundError` (a ``FileNotFoundError``; missing files, empty folders), naming the
file and the value. What Detectron2's conventions leave out (images without boxes, dropped from training by
``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; images nobody annotated) is counted and logged.

:func:`dataset_config_overrides` then derives the config from the data: the class count
(``MODEL.ROI_HEADS.NUM_CLASSES`` and ``MODEL.RETINANET.NUM_CLASSES``, or ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``
and ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``) unless the command line's overrides set it, in which case a value
that disagrees with the data is an error.

Registration lives in one process's catalogs only: Detectron2's ``launch`` spawns workers that start empty,
so every process calls :func:`register_from_args` with the parsed arguments (``tools/train_net.py`` does it
in ``load_config``, which the parent and every worker run). A second call with the same arguments in one
process is a no-op.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from PIL import Image, UnidentifiedImageError

from .coco import DatasetNotFoundError

__all__ = [
    "DatasetFormatError",
    "DatasetNotFoundError",
    "IMAGE_EXTENSIONS",
    "add_dataset_arguments",
    "register_from_args",
    "registered_from_args",
    "load_voc_detection",
    "load_sem_seg_pngs",
    "inspect_coco_json",
    "read_classes_txt",
    "dataset_config_overrides",
    "log_summary",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: box coordinates may lie this many pixels outside the image (they are then clipped, and counted)
BOX_TOLERANCE = 1.0
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_OWN_FLAGS = ("--register-coco", "--register-voc", "--register-sem-seg", "--classes", "--ignore-label")
_DETECTION_KEYS = ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")
_SEM_SEG_ARCHS = ("SemanticSegmentor",)
_DETECTION_ARCHS = ("GeneralizedRCNN", "RetinaNet", "ProposalNetwork")


class DatasetFormatError(ValueError):
    """The content of a dataset given on the command line is wrong (the message names the file and value)."""


# name -> {"key", "kind" ("detection" | "sem_seg"), "classes", "summary", "has_masks", "ignore_label"}
_FROM_ARGS: Dict[str, dict] = {}


# ------------------------------------------------------------------------------------------------------------
# command line


def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--register-coco``, ``--register-voc``, ``--classes``, ``--register-sem-seg``, ``--ignore-label``."""
    g = parser.add_argument_group(
        "own datasets", "register datasets for DATASETS.TRAIN / DATASETS.TEST (repeatable; give them before the "
        "KEY VALUE config overrides). The class count is set from the data unless the overrides set it.")
    g.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                   help="a COCO-format json and its image folder")
    g.add_argument("--register-voc", nargs=3, action="append", metavar=("NAME", "IMAGE_DIR", "ANNOTATION_DIR"),
                   help="Pascal VOC XML boxes (one XML per image in ANNOTATION_DIR, images in IMAGE_DIR)")
    g.add_argument("--classes", default=None, metavar="A,B,C",
                   help="class names of every --register-voc set, in this order (default: the sorted union of "
                        "the names in the XMLs of all --register-voc sets); other names are an error")
    g.add_argument("--register-sem-seg", nargs=4, action="append",
                   metavar=("NAME", "IMAGE_DIR", "LABEL_DIR", "CLASSES_TXT"),
                   help="semantic segmentation: label PNGs whose pixel values index the lines of CLASSES_TXT, "
                        "paired with the images by file stem (x.jpg <-> x.png)")
    g.add_argument("--ignore-label", type=int, default=None, metavar="N",
                   help="label value of unlabelled pixels in --register-sem-seg sets (default 255)")
    return parser


def _args_key(args) -> tuple:
    return tuple((flag, tuple(map(tuple, getattr(args, flag.lstrip("-").replace("-", "_"), None) or ())))
                 for flag in ("--register-coco", "--register-voc", "--register-sem-seg")) + (
        getattr(args, "classes", None), getattr(args, "ignore_label", None))


def _check_opts(opts: Sequence[str]) -> None:
    misplaced = [o for o in opts if isinstance(o, str) and o.split("=")[0] in _OWN_FLAGS]
    if misplaced:
        raise DatasetFormatError(
            f"{misplaced[0]} appears among the config overrides (KEY VALUE ...), which take the rest of the command "
            "line: give the --register-* / --classes / --ignore-label options before the first KEY VALUE pair")


def registered_from_args() -> List[str]:
    """The names this process registered through :func:`register_from_args`, in registration order."""
    return list(_FROM_ARGS)


def register_from_args(args) -> List[str]:
    """Register the datasets of ``args`` (see :func:`add_dataset_arguments`); returns their names.

    Call it in every process (spawned workers do not inherit the parent's catalogs). Calling it again with
    the same arguments in the same process changes nothing; a ``NAME`` that is already registered otherwise
    (a built-in dataset, twice on one command line, or another call) is an error.
    """
    _check_opts(getattr(args, "opts", None) or [])
    coco = getattr(args, "register_coco", None) or []
    voc = getattr(args, "register_voc", None) or []
    sem = getattr(args, "register_sem_seg", None) or []
    classes_opt = getattr(args, "classes", None)
    ignore_opt = getattr(args, "ignore_label", None)
    if classes_opt is not None and not voc:
        raise DatasetFormatError(f"--classes {classes_opt} only applies to --register-voc, and none was given")
    if ignore_opt is not None and not sem:
        raise DatasetFormatError(f"--ignore-label {ignore_opt} only applies to --register-sem-seg, and none was given")
    names = [spec[0] for spec in (*coco, *voc, *sem)]
    key = _args_key(args)
    if names and all(_FROM_ARGS.get(n, {}).get("key") == key and n in DatasetCatalog.list() for n in names):
        return names  # this process already registered this command line
    seen = set()
    for n in names:
        if not _NAME_RE.match(n):
            raise DatasetFormatError(f"dataset NAME {n!r}: use letters, digits, '_', '-' and '.' only "
                                     "(it goes into DATASETS.TRAIN/TEST tuples on the command line)")
        if n in seen:
            raise DatasetFormatError(f"dataset NAME {n!r} is given twice on the command line")
        if n in DatasetCatalog.list():
            raise DatasetFormatError(f"dataset NAME {n!r} is already registered (a built-in dataset or an earlier "
                                     "registration): choose another name")
        seen.add(n)

    # read and check everything first: a bad set registers nothing, so the fixed command line can run again
    todo = []  # (name, register(), record)
    for name, json_file, image_dir in coco:
        info = inspect_coco_json(json_file, image_dir)

        def register(name=name, json_file=json_file, image_dir=image_dir, info=info):
            register_coco_instances(name, {}, str(json_file), str(image_dir))
            # the values load_coco_json sets, known before loading (NUM_CLASSES, the demo's class names)
            MetadataCatalog.get(name).set(thing_classes=info["classes"],
                                          thing_dataset_id_to_contiguous_id=info["id_map"])

        todo.append((name, register, _record(key, "detection", info["classes"],
                                             f"{name}: COCO json {json_file}: {info['summary']}",
                                             has_masks=info["has_masks"])))
    if voc:
        fixed = _parse_classes_opt(classes_opt) if classes_opt is not None else None
        parsed = [_parse_voc_dir(image_dir, ann_dir, fixed) for _, image_dir, ann_dir in voc]
        classes = fixed or sorted({obj[0] for p in parsed for rec in p["records"] for obj in rec["objects"]})
        if not classes:
            raise DatasetFormatError("no <object> in any XML of the --register-voc sets " +
                                     ", ".join(f"{n} ({a})" for n, _, a in voc) + ": there is nothing to detect")
        origin = "--classes" if fixed else "the sorted union of the names in every --register-voc set's XMLs"
        for (name, image_dir, ann_dir), p in zip(voc, parsed):
            dicts, summary = _voc_dicts(p, classes)

            def register(name=name, dicts=dicts, image_dir=image_dir, ann_dir=ann_dir, classes=tuple(classes)):
                DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
                MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="coco",
                                              image_root=str(image_dir), own_annotation_dir=str(ann_dir))

            todo.append((name, register, _record(
                key, "detection", classes,
                f"{name}: Pascal VOC {ann_dir} + {image_dir}: {summary}; classes ({origin}): {classes}")))
    ignore = 255 if ignore_opt is None else int(ignore_opt)
    for name, image_dir, label_dir, classes_txt in sem:
        dicts, classes, summary = load_sem_seg_pngs(image_dir, label_dir, classes_txt, ignore)

        def register(name=name, dicts=dicts, classes=classes, image_dir=image_dir, label_dir=label_dir):
            DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
            MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=ignore, evaluator_type="sem_seg",
                                          image_root=str(image_dir), sem_seg_root=str(label_dir))

        todo.append((name, register, _record(key, "sem_seg", classes, f"{name}: semantic segmentation {image_dir} + "
                                                                      f"{label_dir}: {summary}", ignore_label=ignore)))
    for name, register, record in todo:
        register()
        _FROM_ARGS[name] = record
        logger.info("registered %s", record["summary"])
    return names


def _record(key, kind, classes, summary, has_masks=False, ignore_label=None) -> dict:
    return {"key": key, "kind": kind, "classes": list(classes), "summary": summary, "has_masks": has_masks,
            "ignore_label": ignore_label}


def _parse_classes_opt(text: str) -> List[str]:
    classes = [c.strip() for c in text.split(",")]
    if not text.strip() or any(not c for c in classes):
        raise DatasetFormatError(f"--classes {text!r}: give comma-separated non-empty names, e.g. --classes cat,dog")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise DatasetFormatError(f"--classes {text!r}: {dup} appear more than once")
    return classes


# ------------------------------------------------------------------------------------------------------------
# files


def _require_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what} {path} " + ("is not a directory" if path.exists() else "does not exist"))
    return path


def _list_files(folder: Path, extensions: Iterable[str]) -> Tuple[List[Path], List[Path]]:
    """(files of ``folder`` with one of ``extensions`` (case-insensitive), the other files), both sorted."""
    extensions = tuple(extensions)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    matching = [p for p in files if p.suffix.lower() in extensions]
    return matching, [p for p in files if p.suffix.lower() not in extensions]


def _image_size(path: Path, context: str = "") -> Tuple[int, int]:
    """(width, height) as Detectron2 reads the image (EXIF orientation applied); only the header is read."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # a broken EXIF block: Detectron2 ignores it as well
                orientation = 1
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DatasetFormatError(f"{context}cannot read image {path}: {e}") from e
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _few(items: Sequence, n: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------------------------
# COCO json


def inspect_coco_json(json_file, image_dir) -> dict:
    """Check a COCO json against its image folder; returns ``classes`` (by category id, as Detectron2's
    ``load_coco_json`` orders them), ``id_map``, ``has_masks`` and a ``summary``.

    Detectron2 loads the json lazily, when training starts; it is read here once more because the class
    count must be known when the config is built, and a missing image should fail now, not mid-training.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise DatasetNotFoundError(f"COCO json {json_file} does not exist")
    image_dir = _require_dir(image_dir, "COCO image folder")
    try:
        data = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{json_file}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise DatasetFormatError(f"{json_file}: a COCO json needs 'images' and 'categories' lists (and "
                                 f"'annotations'); found keys {sorted(data) if isinstance(data, dict) else type(data)}")
    cats = data["categories"]
    if not cats:
        raise DatasetFormatError(f"{json_file}: 'categories' is empty")
    cat_ids = sorted(c["id"] for c in cats)
    classes = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    images = data["images"]
    if not images:
        raise DatasetFormatError(f"{json_file}: 'images' is empty")
    missing = [im["file_name"] for im in images if not (image_dir / im["file_name"]).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{json_file}: {len(missing)} of {len(images)} images are not in {image_dir}: "
                                   f"{_few(missing)}")
    image_ids = {im["id"] for im in images}
    anns = data.get("annotations", [])
    per_cat = {i: 0 for i in cat_ids}
    with_boxes = set()
    for a in anns:
        if a.get("category_id") not in per_cat:
            raise DatasetFormatError(f"{json_file}: annotation id {a.get('id')} has category_id "
                                     f"{a.get('category_id')}, which is not in 'categories' (ids {cat_ids})")
        if a.get("image_id") not in image_ids:
            raise DatasetFormatError(f"{json_file}: annotation id {a.get('id')} has image_id {a.get('image_id')}, "
                                     "which is not in 'images'")
        per_cat[a["category_id"]] += 1
        if not a.get("iscrowd", 0):
            with_boxes.add(a["image_id"])
    # load_coco_json keeps only non-empty segmentations; the mask head needs one on every (non-crowd) box
    solid = [a for a in anns if not a.get("iscrowd", 0)]
    has_masks = bool(solid) and all(a.get("segmentation") for a in solid)
    unused = [f"{c['name']} (id {c['id']})" for c in cats if per_cat[c["id"]] == 0]
    crowd = sum(1 for a in anns if a.get("iscrowd", 0))
    summary = (f"{len(images)} images, {len(anns)} annotations{' with masks' if has_masks else ''}, "
               f"{len(classes)} classes {classes}")
    if crowd:
        summary += f"; {crowd} crowd annotations (ignored in training, as in COCO)"
    if len(images) - len(with_boxes):
        summary += (f"; {len(images) - len(with_boxes)} images without boxes: DATALOADER.FILTER_EMPTY_ANNOTATIONS "
                    "(default True) drops them from training, evaluation keeps them")
    if unused:
        summary += f"; classes without any annotation (still counted in NUM_CLASSES): {unused}"
    return {"classes": classes, "id_map": {v: i for i, v in enumerate(cat_ids)}, "has_masks": has_masks,
            "summary": summary}


# ------------------------------------------------------------------------------------------------------------
# Pascal VOC XML


def _number(node, tag: str, xml: Path, what: str) -> float:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise DatasetFormatError(f"{xml}: {what} has no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DatasetFormatError(f"{xml}: {what} <{tag}> is {text.strip()!r}, not a number") from None


def _parse_voc_xml(xml: Path, image_dir: Path) -> dict:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise DatasetFormatError(f"{xml}: not valid XML ({e})") from e
    filename = (root.findtext("filename") or "").strip()
    image = image_dir / filename if filename else None
    substituted = False
    if image is None or not image.is_file():
        # no <filename>: the image of the XML's stem; a <filename> that does not exist: the same stem with another
        # image extension (e.g. <filename>x.png</filename> for x.jpg, or no extension); counted in the log
        stem = Path(filename).stem if filename else xml.stem
        found = [image_dir / (stem + e) for e in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
                 if (image_dir / (stem + e)).is_file()]
        substituted = bool(found) and bool(filename)
        image = found[0] if found else (image or image_dir / (xml.stem + ".jpg"))
    if not image.is_file():
        raise DatasetNotFoundError(f"{xml}: image {image} " + (f"(its <filename> {filename!r}) " if filename else "")
                                   + "does not exist")
    size = root.find("size")
    if size is None:
        raise DatasetFormatError(f"{xml}: no <size> element; it must give the image's <width> and <height> in pixels")
    width, height = _number(size, "width", xml, "<size>"), _number(size, "height", xml, "<size>")
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise DatasetFormatError(f"{xml}: <size> is width {size.findtext('width').strip()}, height "
                                 f"{size.findtext('height').strip()}; both must be positive integers (the image is "
                                 f"{'x'.join(map(str, _image_size(image)))})")
    width, height = int(width), int(height)
    real = _image_size(image, f"{xml}: ")
    if real != (width, height):
        raise DatasetFormatError(f"{xml}: <size> says {width}x{height} (width x height) but image {image} is "
                                 f"{real[0]}x{real[1]}")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetFormatError(f"{xml}: <object> #{i + 1} has no <name>")
        what = f"<object> #{i + 1} ({name})"
        box = obj.find("bndbox")
        if box is None:
            raise DatasetFormatError(f"{xml}: {what} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box, t, xml, what) for t in ("xmin", "ymin", "xmax", "ymax"))
        coords = f"xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}"
        if xmax <= xmin or ymax <= ymin:
            raise DatasetFormatError(f"{xml}: {what} has an empty box ({coords}): xmax must exceed xmin and ymax ymin")
        # VOC pixels are 1-based and inclusive: valid boxes have 1 <= xmin, xmax <= width (+-1 px tolerated)
        if (xmin < 1 - BOX_TOLERANCE or ymin < 1 - BOX_TOLERANCE or xmax > width + BOX_TOLERANCE
                or ymax > height + BOX_TOLERANCE):
            raise DatasetFormatError(f"{xml}: {what} box ({coords}) lies outside the {width}x{height} image "
                                     f"(1-based pixel coordinates, {BOX_TOLERANCE:g} px tolerance)")
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
        objects.append((name, [xmin, ymin, xmax, ymax], difficult))
    return {"xml": xml, "file_name": str(image), "width": width, "height": height, "objects": objects,
            "substituted": substituted}


def _parse_voc_dir(image_dir, ann_dir, classes: Optional[List[str]]) -> dict:
    image_dir = _require_dir(image_dir, "VOC image folder")
    ann_dir = _require_dir(ann_dir, "VOC annotation folder")
    xmls, others = _list_files(ann_dir, (".xml",))
    if not xmls:
        raise DatasetNotFoundError(f"VOC annotation folder {ann_dir} has no .xml files"
                                   + (f" (it has {_few([p.name for p in others])})" if others else " (it is empty)"))
    images, _ = _list_files(image_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DatasetNotFoundError(f"VOC image folder {image_dir} has no images ({'/'.join(IMAGE_EXTENSIONS)})")
    records = [_parse_voc_xml(x, image_dir) for x in xmls]
    by_image: Dict[str, Path] = {}
    for r in records:
        if r["file_name"] in by_image:
            raise DatasetFormatError(f"{r['xml']} and {by_image[r['file_name']]} both annotate image {r['file_name']}")
        by_image[r["file_name"]] = r["xml"]
        if classes is not None:
            for name, _, _ in r["objects"]:
                if name not in classes:
                    raise DatasetFormatError(f"{r['xml']}: class {name!r} is not in --classes {','.join(classes)}")
    unannotated = [p.name for p in images if str(p) not in by_image]
    return {"records": records, "unannotated": unannotated, "others": [p.name for p in others],
            "image_dir": image_dir}


def _voc_dicts(parsed: dict, classes: List[str]) -> Tuple[List[dict], str]:
    dicts, boxes, difficult, clipped, empty = [], 0, 0, 0, 0
    per_class = dict.fromkeys(classes, 0)
    for image_id, r in enumerate(parsed["records"]):
        annotations = []
        for name, (xmin, ymin, xmax, ymax), hard in r["objects"]:
            # as detectron2/data/datasets/pascal_voc.py: 1-based inclusive pixels -> (xmin - 1, ymin - 1, xmax, ymax)
            box = [xmin - 1.0, ymin - 1.0, xmax, ymax]
            inside = [min(max(box[0], 0.0), r["width"]), min(max(box[1], 0.0), r["height"]),
                      min(max(box[2], 0.0), r["width"]), min(max(box[3], 0.0), r["height"])]
            clipped += inside != box
            difficult += hard
            per_class[name] += 1
            annotations.append({"bbox": inside, "bbox_mode": BoxMode.XYXY_ABS, "category_id": classes.index(name)})
        boxes += len(annotations)
        empty += not annotations
        dicts.append({"file_name": r["file_name"], "image_id": image_id, "height": r["height"], "width": r["width"],
                      "annotations": annotations})
    summary = f"{len(dicts)} images, {boxes} boxes"
    if difficult:
        summary += (f" ({difficult} marked difficult: kept as ordinary boxes in training and evaluation, as "
                    "Detectron2's own Pascal VOC loader keeps them)")
    if clipped:
        summary += f"; {clipped} boxes reached up to {BOX_TOLERANCE:g} px outside their image and were clipped to it"
    if empty:
        summary += (f"; {empty} images without boxes: DATALOADER.FILTER_EMPTY_ANNOTATIONS (default True) drops them "
                    "from training, evaluation keeps them")
    if parsed["unannotated"]:
        summary += (f"; {len(parsed['unannotated'])} images in {parsed['image_dir']} have no XML and are not used: "
                    f"{_few(parsed['unannotated'])}")
    if parsed["others"]:
        summary += f"; {len(parsed['others'])} non-XML files in the annotation folder ignored"
    renamed = [r["xml"].name for r in parsed["records"] if r["substituted"]]
    if renamed:
        summary += (f"; {len(renamed)} XMLs name an image that does not exist, the image of the same stem and "
                    f"another extension was used: {_few(renamed)}")
    absent = [c for c, n in per_class.items() if n == 0]
    if absent:
        summary += f"; classes without any box here: {absent}"
    return dicts, summary


def load_voc_detection(image_dir, ann_dir, classes: Optional[Sequence[str]] = None) -> Tuple[List[dict], List[str]]:
    """Detectron2 dataset dicts of one VOC folder pair and the class list (``classes``, or the sorted names
    found); boxes in ``XYXY_ABS``, converted from VOC's 1-based pixels as Detectron2's ``pascal_voc.py``."""
    parsed = _parse_voc_dir(image_dir, ann_dir, list(classes) if classes is not None else None)
    names = list(classes) if classes is not None else sorted({o[0] for r in parsed["records"] for o in r["objects"]})
    return _voc_dicts(parsed, names)[0], names


# ------------------------------------------------------------------------------------------------------------
# semantic segmentation PNGs


def read_classes_txt(path) -> List[str]:
    """One class name per line (trailing blank lines allowed)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"class list {path} does not exist (CLASSES_TXT: one class name per line)")
    lines = [line.strip() for line in path.read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DatasetFormatError(f"class list {path} is empty")
    if "" in lines:
        raise DatasetFormatError(f"class list {path}: line {lines.index('') + 1} is blank "
                                 "(line n names label value n-1)")
    dup = sorted({c for c in lines if lines.count(c) > 1})
    if dup:
        raise DatasetFormatError(f"class list {path}: {dup} appear more than once")
    return lines


def _read_label(path: Path) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The label map as training reads it (``Image.convert("L")``, RobustDatasetMapper); a PNG whose stored
    values differ from that (colour-coded RGB, a palette whose colours are not its indices, a 1-bit mask that
    would read as 0/255) is an error."""
    try:
        with Image.open(path) as im:
            im.load()
            seen = np.asarray(im.convert("L"))
            if im.mode == "L":
                return seen, im.size
            raw = np.asarray(im)
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DatasetFormatError(f"cannot read label {path}: {e}") from e
    if raw.ndim == 3:
        colour = raw[..., :3] if raw.shape[-1] >= 3 else raw[..., :1]  # without alpha
        if not (colour == colour[..., :1]).all():
            raise DatasetFormatError(f"label {path} is a colour {im.mode} image: labels must be single-channel PNGs "
                                     "whose pixel values are class indices (convert the colours to indices first)")
        raw = raw[..., 0]
    if raw.shape != seen.shape or not np.array_equal(raw, seen):
        raise DatasetFormatError(f"label {path} (mode {im.mode}) stores values that training would read differently "
                                 "(as grey levels): save it as an 8-bit single-channel (mode L) PNG of class indices")
    return seen, im.size


def load_sem_seg_pngs(image_dir, label_dir, classes_txt, ignore_label: int = 255) -> Tuple[List[dict], List[str], str]:
    """Dataset dicts (``file_name``, ``sem_seg_file_name``, ``height``, ``width``), the classes and a summary.

    Images and label PNGs are paired by file stem (``x.jpg`` <-> ``x.png``). Detectron2's ``load_sem_seg``
    pairs by stem as well, but it takes one image extension and only warns and keeps the intersection when
    the folders differ; here an unpaired file is an error.

    Every label PNG is read once here, with PIL/numpy: label maps are single-channel and compress well, so
    this costs milliseconds per image, and a value outside ``[0, num_classes)`` that is not the ignore label
    would otherwise surface mid-training as an index error in the loss (or a device-side assert on a GPU),
    or silently as a wrong confusion matrix in evaluation.
    """
    classes = read_classes_txt(classes_txt)
    image_dir = _require_dir(image_dir, "image folder")
    label_dir = _require_dir(label_dir, "label folder")
    if not 0 <= ignore_label <= 255:
        raise DatasetFormatError(f"--ignore-label {ignore_label}: 8-bit label PNGs hold 0..255")
    if ignore_label < len(classes):
        raise DatasetFormatError(f"--ignore-label {ignore_label} is class {classes[ignore_label]!r} (line "
                                 f"{ignore_label + 1} of {classes_txt}): remove it from the class list or ignore "
                                 "another value")
    images, other_images = _list_files(image_dir, IMAGE_EXTENSIONS)
    labels, other_labels = _list_files(label_dir, (".png",))
    if not images:
        raise DatasetNotFoundError(f"image folder {image_dir} has no images ({'/'.join(IMAGE_EXTENSIONS)})")
    if not labels:
        raise DatasetNotFoundError(f"label folder {label_dir} has no .png labels")
    by_stem: Dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            raise DatasetFormatError(f"images {by_stem[p.stem]} and {p} have the same stem: which one does label "
                                     f"{p.stem}.png belong to?")
        by_stem[p.stem] = p
    label_by_stem = {p.stem: p for p in labels}
    no_label = [str(p) for s, p in by_stem.items() if s not in label_by_stem]
    if no_label:
        raise DatasetFormatError(f"{len(no_label)} images have no label <stem>.png in {label_dir}: {_few(no_label)}")
    no_image = [str(p) for s, p in label_by_stem.items() if s not in by_stem]
    if no_image:
        raise DatasetFormatError(f"{len(no_image)} labels have no image of the same stem in {image_dir}: "
                                 f"{_few(no_image)}")
    counts = np.zeros(256, np.int64)
    dicts = []
    for stem, image in sorted(by_stem.items()):
        label = label_by_stem[stem]
        values, label_size = _read_label(label)
        image_size = _image_size(image)
        if label_size != image_size:
            raise DatasetFormatError(f"label {label} is {label_size[0]}x{label_size[1]} but image {image} is "
                                     f"{image_size[0]}x{image_size[1]} (width x height)")
        hist = np.bincount(values.ravel(), minlength=256)
        bad = [v for v in np.flatnonzero(hist) if v >= len(classes) and v != ignore_label]
        if bad:
            raise DatasetFormatError(f"label {label} has value(s) {_few([int(v) for v in bad], 10)} outside the "
                                     f"{len(classes)} classes of {classes_txt} (0..{len(classes) - 1}) that are not "
                                     f"the ignore label {ignore_label} (--ignore-label)")
        counts += hist
        dicts.append({"file_name": str(image), "sem_seg_file_name": str(label),
                      "height": image_size[1], "width": image_size[0]})
    absent = [c for i, c in enumerate(classes) if counts[i] == 0]
    ignored = counts[ignore_label] / max(1, counts.sum())
    summary = (f"{len(dicts)} image/label pairs, {len(classes)} classes {classes}, ignore label {ignore_label} "
               f"({ignored:.1%} of the pixels)")
    if absent:
        summary += f"; classes without any pixel here: {absent}"
    if other_images or other_labels:
        summary += (f"; {len(other_images) + len(other_labels)} files that are neither images nor .png labels "
                    f"ignored: {_few([p.name for p in other_images + other_labels])}")
    return dicts, classes, summary


# ------------------------------------------------------------------------------------------------------------
# config


def _keys_given(opts: Sequence[str]) -> set:
    return {str(opts[i]) for i in range(0, len(opts or ()), 2)}


def _in_use(cfg) -> Tuple[List[str], List[str]]:
    train = [n for n in cfg.DATASETS.TRAIN if n in _FROM_ARGS]
    test = [n for n in cfg.DATASETS.TEST if n in _FROM_ARGS]
    return train, test


def _derive(cfg) -> Tuple[Optional[str], List[str], Dict[str, int]]:
    """(reference dataset, its classes, {KEY: value the data implies}); checks that the datasets fit together."""
    train, test = _in_use(cfg)
    used = train or test
    if not used:
        return None, [], {}
    ref = used[0]
    classes = _FROM_ARGS[ref]["classes"]
    for n in train + test:
        if _FROM_ARGS[n]["kind"] != _FROM_ARGS[ref]["kind"]:
            raise DatasetFormatError(f"datasets {ref} ({_FROM_ARGS[ref]['kind']}) and {n} ({_FROM_ARGS[n]['kind']}) "
                                     "are of different kinds")
        if _FROM_ARGS[n]["classes"] != classes:
            raise DatasetFormatError(f"datasets {ref} and {n} have different class lists: {classes} vs "
                                     f"{_FROM_ARGS[n]['classes']}; training and evaluation need one class order "
                                     "(for VOC: register both on one command line, or give --classes)")
    kind, arch = _FROM_ARGS[ref]["kind"], cfg.MODEL.META_ARCHITECTURE
    if (kind == "detection" and arch in _SEM_SEG_ARCHS) or (kind == "sem_seg" and arch in _DETECTION_ARCHS):
        other = "a detection (e.g. mask_rcnn_*)" if kind == "detection" else "a semantic segmentation (e.g. semfpn_*)"
        what = "detection" if kind == "detection" else "semantic segmentation"
        raise DatasetFormatError(f"dataset {ref} is a {what} dataset but the config's "
                                 f"MODEL.META_ARCHITECTURE is {arch}: use {other} config")
    if kind == "detection":
        if cfg.MODEL.MASK_ON:
            no_masks = [n for n in train + test if not _FROM_ARGS[n]["has_masks"]]
            if no_masks:
                raise DatasetFormatError(f"MODEL.MASK_ON is True but dataset {no_masks[0]} has boxes only (no "
                                         "'segmentation'): add MODEL.MASK_ON False to the command line")
        return ref, classes, {k: len(classes) for k in _DETECTION_KEYS}
    return ref, classes, {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": len(classes),
                          "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": _FROM_ARGS[ref]["ignore_label"]}


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def dataset_config_overrides(cfg, opts: Sequence[str] = ()) -> List:
    """``[KEY, VALUE, ...]`` that make ``cfg`` fit the registered datasets it uses (for ``cfg.merge_from_list``).

    The classes are those of the command-line datasets in ``DATASETS.TRAIN`` (else in ``DATASETS.TEST``, for
    evaluation and the demo); all of them, train and test, must share one class list. Detection sets
    ``MODEL.ROI_HEADS.NUM_CLASSES`` and ``MODEL.RETINANET.NUM_CLASSES``, semantic segmentation
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` and ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``, each unless ``opts`` (the
    command line's overrides) gives it; a given value that disagrees with the data raises
    :class:`DatasetFormatError`, as do ``MODEL.MASK_ON`` with a boxes-only dataset, a dataset of the other task
    than ``MODEL.META_ARCHITECTURE`` and train / test sets with different classes. Pure: depends on ``cfg``,
    ``opts`` and the registrations only, so that the parent process and every worker derive the same config.
    """
    ref, classes, wanted = _derive(cfg)
    given = _keys_given(opts)
    out = []
    for key, value in wanted.items():
        if key not in given:
            out += [key, value]
        elif _get(cfg, key) != value:
            data = (f"{value} class{'es' if value != 1 else ''} {classes}" if key.endswith("NUM_CLASSES")
                    else f"ignore label {value} (--ignore-label)")
            raise DatasetFormatError(f"{key} {_get(cfg, key)} is given on the command line, but dataset {ref} has "
                                     f"{data}: drop {key} (it follows from the data) or fix the data")
    return out


def log_summary(cfg, opts: Sequence[str] = (), log=None) -> List[str]:
    """Log what the command-line datasets are and which config values they set; returns the lines.

    ``log``: a logger (default this module's) or a function such as ``print``. Call it once the process's
    loggers are set up (registration itself runs before, while the config is built)."""
    last_key = _FROM_ARGS[next(reversed(_FROM_ARGS))]["key"] if _FROM_ARGS else None
    latest = [n for n in _FROM_ARGS if _FROM_ARGS[n]["key"] == last_key]  # the latest command line's
    lines = [_FROM_ARGS[n]["summary"] for n in latest]
    train, test = _in_use(cfg)
    unused = [n for n in latest if n not in train + test]
    if unused:
        lines.append(f"registered but in neither DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} nor DATASETS.TEST "
                     f"{tuple(cfg.DATASETS.TEST)}: {unused}")
    ref, _, wanted = _derive(cfg)
    given = _keys_given(opts)
    for key, value in wanted.items():
        how = ("given on the command line, agrees with" if key in given
               else "set from")
        lines.append(f"{key} = {value}: {how} dataset {ref}")
    emit = (log or logger).info if log is None or isinstance(log, logging.Logger) else log
    for line in lines:
        emit(line)
    return lines
