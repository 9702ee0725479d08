"""Images for the energy tool: a real image folder or built-in synthetic images (no downloads)."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["synthetic_images", "list_images", "load_image", "classification_tensor", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def synthetic_images(num: int, size: Tuple[int, int], seed: int = 0) -> List[np.ndarray]:
    """``num`` deterministic RGB ``uint8`` images ``(H, W, 3)``: a smooth colour gradient with a few filled
    rectangles and disks (natural-image-like statistics: flat regions and edges, unlike noise)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for _ in range(num):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        mix = (xx / max(w - 1, 1))[..., None] * rng.uniform(0.2, 1.0) + (yy / max(h - 1, 1))[..., None] * rng.uniform(0, 0.8)
        img = a * (1 - np.clip(mix, 0, 1)) + b * np.clip(mix, 0, 1)
        for _ in range(int(rng.integers(2, 6))):
            colour = rng.uniform(0, 255, 3)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.08, 0.3) * min(h, w)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * rng.uniform(0.5, 1.5))
            img[mask] = colour
        images.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    return images


def list_images(root: str, num: int) -> List[str]:
    """The first ``num`` image files under ``root`` (recursively, sorted: an ImageFolder-style tree or a flat dir)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    return paths[:num]


def load_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def classification_tensor(images: Sequence[np.ndarray], size: int, crop_pct: float = 0.875,
                          mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
    """timm-style eval preprocessing: resize the short side to ``size / crop_pct`` (bicubic), centre crop
    ``size``, scale to [0, 1], normalize. Returns ``(B, 3, size, size)`` float32."""
    import torch
    from PIL import Image

    out = []
    for arr in images:
        im = Image.fromarray(arr)
        short = int(round(size / crop_pct))
        w, h = im.size
        scale = short / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = np.asarray(im, dtype=np.float32) / 255.0
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        out.append(torch.from_numpy(x.transpose(2, 0, 1).copy()))
    return torch.stack(out)
