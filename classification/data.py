"""Datasets, transforms and samplers for classification, all on timm's data utilities.

* ``build_transform``: timm ``create_transform`` with the original recipe (main_finetune.py): training
  RandomResizedCrop + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing 0.25 (pixel mode),
  bicubic, no color jitter; eval resize ``input/crop_pct`` (256 for 224) -> center crop, ImageNet mean/std.
* ``build_dataset``: timm ``ImageDataset`` over an ImageFolder tree ``<root>/{train,val}/<class>/<image>``;
  ``"synthetic"`` generates (once, deterministically) a 10-class shape/texture ImageFolder under a cache dir.
* ``ShardSampler``: a distributed eval sampler without padding, so summed metrics are exact.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform

__all__ = [
    "SYNTHETIC_CLASSES",
    "DEFAULT_CROP_PCT",
    "build_transform",
    "build_dataset",
    "make_synthetic_imagefolder",
    "synthetic_root",
    "ShardSampler",
]

#: eval resize 256 -> center crop 224; for other input sizes the resize scales with it (e.g. 64 -> 73 -> 64).
DEFAULT_CROP_PCT = 224 / 256

SYNTHETIC_CLASSES = (
    "disc", "square", "triangle", "ring", "cross", "frame",
    "hstripes", "vstripes", "checker", "dots",
)

IMAGEFOLDER_HELP = (
    "expected an ImageFolder tree: DATA_PATH/train/<class_name>/<images> and DATA_PATH/val/<class_name>/<images> "
    "(the same class folder names in both), or --data-path synthetic for the built-in generated data"
)


def _posterize(img, bits_to_keep, **__):
    """timm's ``posterize`` op for Pillow >= 13. RandAugment ``PosterizeIncreasing`` at magnitude 10 (reached with
    ``mstd0.5`` around m9) asks for 0 bits; Pillow 13's ``ImageOps.posterize`` now rejects bits < 1 with a
    ValueError (crashing a training run within the first epoch), where older Pillow returned a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)  # what Pillow < 13 returned for 0 bits
    return ImageOps.posterize(img, int(bits_to_keep))


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()


def build_transform(is_train: bool, input_size: int = 224, *, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                    reprob: float = 0.25, remode: str = "pixel", recount: int = 1, scale: Sequence[float] = (0.08, 1.0),
                    hflip: float = 0.5, interpolation: str = "bicubic", crop_pct: float = DEFAULT_CROP_PCT,
                    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """The original's train / eval transform, through timm's ``create_transform``."""
    if is_train:
        return create_transform(
            input_size=input_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=None,
            auto_augment=auto_augment or None, interpolation=interpolation, re_prob=reprob, re_mode=remode,
            re_count=recount, mean=mean, std=std)
    return create_transform(input_size=input_size, is_training=False, interpolation=interpolation,
                            crop_pct=crop_pct, mean=mean, std=std)


def build_dataset(data_path: str, split: str, transform, *, synthetic_dir: Optional[str] = None,
                  synthetic_per_class: Sequence[int] = (200, 50)) -> ImageDataset:
    """``ImageDataset`` for ``<data_path>/<split>``; ``data_path == "synthetic"`` uses the generated data."""
    if data_path == "synthetic":
        root = make_synthetic_imagefolder(synthetic_dir, train_per_class=synthetic_per_class[0],
                                          val_per_class=synthetic_per_class[1])
    else:
        root = Path(data_path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data-path {data_path}: no such directory; {IMAGEFOLDER_HELP}")
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing split folder '{split}'; {IMAGEFOLDER_HELP}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder}: no class folders; {IMAGEFOLDER_HELP}")
    try:
        dataset = ImageDataset(str(folder), transform=transform)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise FileNotFoundError(f"{folder}: {e}; {IMAGEFOLDER_HELP}") from e
    dataset.classes = classes
    return dataset


# --------------------------------------------------------------------------------------------------
# Built-in synthetic data: 10 shape / texture classes. Colours are random per image (RandAugment inverts
# and shifts colours), so the class lies only in the geometry.

def synthetic_root(cache_dir: Optional[str] = None) -> Path:
    base = cache_dir or os.environ.get("METASPIKE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "metaspike_d2")
    return Path(base).expanduser()


def _colours(rng: np.random.Generator):
    """Foreground / background colours with a clear luminance difference."""
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        if abs(float(fg.mean()) - float(bg.mean())) > 70:
            return tuple(int(c) for c in fg), tuple(int(c) for c in bg)


def _regular_polygon(cx, cy, r, n, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_sample(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    fg, bg = _colours(rng)
    name = SYNTHETIC_CLASSES[label]
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    # shapes: centre jittered, radius 25-42% of the side, random rotation
    r = size * rng.uniform(0.25, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, int(r * rng.uniform(0.25, 0.4)))
    if name == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, r * 1.1, 4, angle), fill=fg)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r * 1.2, 3, angle), fill=fg)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
    elif name == "frame":
        draw.polygon(_regular_polygon(cx, cy, r * 1.15, 4, angle), outline=fg, width=width)
    elif name == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a) * r * 1.1, math.sin(a) * r * 1.1
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=width)
    else:  # full-image textures: random period and phase
        period = size * rng.uniform(0.12, 0.22)
        phase = rng.uniform(0, period)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        if name == "hstripes":
            mask = ((yy + phase) % period) < period / 2
        elif name == "vstripes":
            mask = ((xx + phase) % period) < period / 2
        elif name == "checker":
            mask = (((xx + phase) // (period / 1.0)) + ((yy + phase) // (period / 1.0))) % 2 == 0
        else:  # dots
            d = np.hypot(((xx + phase) % period) - period / 2, ((yy + phase) % period) - period / 2)
            mask = d < period * 0.28
        arr = np.where(mask[..., None], np.array(fg, np.float32), np.array(bg, np.float32))
        img = Image.fromarray(arr.astype(np.uint8))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_synthetic_imagefolder(cache_dir: Optional[str] = None, *, train_per_class: int = 200,
                               val_per_class: int = 50, image_size: int = 96, seed: int = 0) -> Path:
    """Generate (first use only) the synthetic ImageFolder and return its root (``train/`` and ``val/``).

    Deterministic: the same arguments give byte-identical images. Generated into a temporary folder and
    renamed, so concurrent or interrupted runs never see a partial tree.
    """
    spec = dict(classes=SYNTHETIC_CLASSES, train=train_per_class, val=val_per_class, size=image_size, seed=seed,
                version=1)
    tag = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = synthetic_root(cache_dir) / f"synthetic_cls_{train_per_class}_{val_per_class}_{image_size}_{tag}"
    if (root / "DONE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for label, name in enumerate(SYNTHETIC_CLASSES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                rng = np.random.default_rng([seed, split_id, label])
                for i in range(count):
                    _draw_sample(label, rng, image_size).save(folder / f"{name}_{i:05d}.png")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        (tmp / "DONE").write_text("ok\n")
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            if not (root / "DONE").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...`` without padding (``DistributedSampler`` pads with duplicates, which
    would bias summed eval metrics)."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
