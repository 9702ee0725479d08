"""metaspike_shapes: a synthetic instance-segmentation dataset, deterministic by seed.

Each image has a random background (a colour gradient plus noise) and 1-4 shapes (circle, square,
triangle) of varied size, rotation and colour; shapes may overlap, later ones occluding earlier ones,
and each instance's mask is its *visible* part. :func:`render_shapes_image` is the single generator:
the instance splits below (COCO json + PNG images) and the semantic-segmentation splits are built from it.

On first use a split is written in COCO format under ``$DETECTRON2_DATASETS/metaspike_shapes_v1/``
(default ``./datasets``)::

    metaspike_shapes_v1/{train,val}/000000.png ...
    metaspike_shapes_v1/annotations/instances_{train,val}.json   (RLE masks, category ids 1..3)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_COLORS",
    "SHAPES_SPLITS",
    "ShapesSplit",
    "render_shapes_image",
    "iter_shapes_split",
    "ensure_shapes_split",
    "register_shapes_instances",
    "register_all_shapes",
]

SHAPES_CLASSES = ("circle", "square", "triangle")
#: RGB colours for visualization, one per class.
SHAPES_COLORS = ((220, 20, 60), (0, 130, 230), (250, 170, 30))
DATASET_DIRNAME = "metaspike_shapes_v1"


@dataclass(frozen=True)
class ShapesSplit:
    """One split: how many images, their size and the seed that makes them."""

    num_images: int
    image_size: Tuple[int, int]  # (H, W)
    seed: int


#: The built-in splits (registered as ``metaspike_shapes_<split>``).
SHAPES_SPLITS: Dict[str, ShapesSplit] = {
    "train": ShapesSplit(num_images=1000, image_size=(160, 160), seed=0),
    "val": ShapesSplit(num_images=100, image_size=(160, 160), seed=1),
}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
    img += rng.normal(0, 8, size=img.shape)
    return img


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """Full (un-occluded) binary mask of one shape of class ``cls``, placed at random."""
    side = min(h, w)
    r = rng.uniform(0.09, 0.25) * side
    cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
    mask = np.zeros((h, w), np.uint8)
    if SHAPES_CLASSES[cls] == "circle":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 1, thickness=-1)
    else:
        n = 4 if SHAPES_CLASSES[cls] == "square" else 3
        theta = rng.uniform(0, 2 * np.pi) + np.arange(n) * 2 * np.pi / n
        pts = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _colour_far_from(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    for _ in range(50):
        c = rng.uniform(0, 255, size=3)
        if np.linalg.norm(c - ref) >= min_dist:
            return c
    return 255.0 - ref


def render_shapes_image(rng: np.random.Generator, image_size: Tuple[int, int] = (160, 160),
                        max_instances: int = 4) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Render one image. Returns ``(image (H, W, 3) uint8 RGB, [(class_id 0..2, visible mask (H, W) bool), ...])``.

    Instances are in drawing order (later ones on top). A new shape that would leave an earlier one
    less than 40 % (or 30 pixels) visible is placed again (up to 20 tries) or skipped, so every shape in
    the image is annotated and recognisable.
    """
    h, w = image_size
    img = _background(rng, h, w)
    placed: List[Tuple[int, np.ndarray, int]] = []  # (class, visible mask, full area)
    for _ in range(int(rng.integers(1, max_instances + 1))):
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        for _attempt in range(20):
            full = _shape_mask(rng, cls, h, w)
            occluded = [(c, m & ~full, a) for c, m, a in placed]
            if all(m.sum() >= max(30, 0.4 * a) for _, m, a in occluded):
                placed = occluded + [(cls, full, int(full.sum()))]
                break
    canvas = img
    for _, mask, _ in placed:  # visible masks are disjoint, so the drawing order no longer matters
        colour = _colour_far_from(rng, img[mask].mean(axis=0))
        shade = rng.uniform(0.85, 1.0, size=(h, w, 1))
        canvas = np.where(mask[..., None], colour[None, None] * shade, canvas)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return image, [(c, m) for c, m, _ in placed]


def iter_shapes_split(split: ShapesSplit) -> Iterator[Tuple[int, np.ndarray, List[Tuple[int, np.ndarray]]]]:
    """``(index, image, instances)`` for every image of a split, deterministic by ``split.seed``."""
    rng = np.random.default_rng(split.seed)
    for i in range(split.num_images):
        image, instances = render_shapes_image(rng, split.image_size)
        yield i, image, instances


def _write_split(split: ShapesSplit, name: str, image_dir: Path, json_file: Path) -> None:
    images, annotations = [], []
    for i, image, instances in iter_shapes_split(split):
        file_name = f"{i:06d}.png"
        cv2.imwrite(str(image_dir / file_name), image[:, :, ::-1])
        h, w = image.shape[:2]
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for cls, mask in instances:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
            })
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(SHAPES_CLASSES)]
    info = {"description": f"metaspike synthetic shapes, split {name}", "num_images": split.num_images,
            "image_size": list(split.image_size), "seed": split.seed}
    with open(json_file, "w") as f:
        json.dump({"info": info, "images": images, "annotations": annotations, "categories": categories}, f)


def ensure_shapes_split(name: str, split: ShapesSplit, root: str | os.PathLike) -> Tuple[Path, Path]:
    """Write split ``name`` under ``root/metaspike_shapes_v1`` unless it is there; returns (json, image dir).

    The files are written to a temporary directory and moved into place, so concurrent or interrupted
    runs never leave a half-written split behind.
    """
    base = Path(root) / DATASET_DIRNAME
    json_file, image_dir = base / "annotations" / f"instances_{name}.json", base / name
    if json_file.is_file() and image_dir.is_dir():
        return json_file, image_dir
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{name}."))
    try:
        (tmp / "images").mkdir()
        _write_split(split, name, tmp / "images", tmp / "instances.json")
        (base / "annotations").mkdir(exist_ok=True)
        if not image_dir.is_dir():
            os.replace(tmp / "images", image_dir)
        if not json_file.is_file():
            os.replace(tmp / "instances.json", json_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json_file, image_dir


def register_shapes_instances(dataset_name: str, split_name: str, split: ShapesSplit, root: str | os.PathLike):
    """Register ``dataset_name`` (COCO format, evaluator "coco"); the files are generated on first load."""
    base = Path(root) / DATASET_DIRNAME
    json_file, image_dir = base / "annotations" / f"instances_{split_name}.json", base / split_name

    def load():
        ensure_shapes_split(split_name, split, root)
        return load_coco_json(str(json_file), str(image_dir), dataset_name)

    DatasetCatalog.register(dataset_name, load)
    MetadataCatalog.get(dataset_name).set(
        json_file=str(json_file), image_root=str(image_dir), evaluator_type="coco",
        thing_classes=list(SHAPES_CLASSES), thing_colors=[list(c) for c in SHAPES_COLORS],
        thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SHAPES_CLASSES))},
    )


def register_all_shapes(root: str | os.PathLike) -> None:
    """Register ``metaspike_shapes_train`` and ``metaspike_shapes_val``."""
    for split_name, split in SHAPES_SPLITS.items():
        register_shapes_instances(f"metaspike_shapes_{split_name}", split_name, split, root)
