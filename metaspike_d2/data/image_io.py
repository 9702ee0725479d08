"""Image reading that either returns the expected ``(H, W, 3) uint8`` array or names the file that failed.

* :func:`read_image`: grayscale (``L``, ``1``), RGBA / LA (alpha dropped), palette (``P``, via its colours),
  CMYK and 16-bit / 32-bit integer or float images (``I;16``, ``I``, ``F``: scaled to 0..255 by their
  bit depth, not clipped) become 3-channel uint8 in ``format`` ("BGR", Detectron2's default, or "RGB";
  "L" gives ``(H, W, 1)``). EXIF orientation is applied as Detectron2 does. A missing, corrupt or
  truncated file raises :class:`ImageReadError` naming the file.
* :class:`RobustDatasetMapper`: Detectron2's ``DatasetMapper`` reading with :func:`read_image`. In training,
  with ``DATALOADER.SKIP_BAD_IMAGES True``, an unreadable image is skipped (the mapper returns ``None``, so
  Detectron2's ``MapDataset`` draws another image) and counted, with a logged warning naming the file and the
  running count. Evaluation (``is_train=False``) never skips.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image", "to_rgb", "RobustDatasetMapper"]

logger = logging.getLogger(__name__)


class ImageReadError(OSError):
    """An image file is missing, corrupt, truncated or in a mode that cannot be converted."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> mode ``RGB`` (8 bits per channel)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if mode == "F":
            lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
            array = (array - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            peak = int(array.max()) if array.size else 0
            bits = 8 if peak < 256 else 16 if peak < 65536 else 32
            array = array.astype(np.float64) / (2 ** bits - 1) * 255.0
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.convert("RGB")  # L, 1, LA, RGBA (alpha dropped), CMYK, YCbCr, ...


def read_image(file_name: str, format: str = "BGR") -> np.ndarray:
    """Read ``file_name`` as ``(H, W, 3)`` uint8 in ``format`` ("BGR", "RGB"; "L" -> ``(H, W, 1)``)."""
    try:
        with open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: truncated / corrupt data fail here, not later in a worker
            image = utils._apply_exif_orientation(image)
            image = to_rgb(image)
    except FileNotFoundError as e:
        raise ImageReadError(f"image file not found: {file_name}") from e
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {file_name}: {e} (corrupt or truncated file?)") from e
    if format == "L":
        return np.asarray(image.convert("L"))[..., None]
    return utils.convert_PIL_to_numpy(image, format)


class RobustDatasetMapper(DatasetMapper):
    """``DatasetMapper`` with :func:`read_image`; optionally skips (and counts) unreadable training images."""

    num_skipped = 0  # per process

    def __init__(self, cfg, is_train: bool = True, **kwargs):
        super().__init__(cfg, is_train=is_train, **kwargs)
        self.skip_bad_images = bool(is_train and cfg.DATALOADER.get("SKIP_BAD_IMAGES", False))

    def __call__(self, dataset_dict):
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
        except ImageReadError as e:
            if not self.skip_bad_images:
                raise
            RobustDatasetMapper.num_skipped += 1
            logger.warning("skipping unreadable training image (%d so far in this process; "
                           "DATALOADER.SKIP_BAD_IMAGES): %s", RobustDatasetMapper.num_skipped, e)
            return None
        return self._map_image(copy.deepcopy(dataset_dict), image)

    def _map_image(self, dataset_dict, image):
        """The rest of ``DatasetMapper.__call__`` (Detectron2 0.7), from the decoded image on."""
        utils.check_image_size(dataset_dict, image)
        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            name = dataset_dict.pop("sem_seg_file_name")
            try:
                sem_seg_gt = utils.read_image(name, "L").squeeze(2)
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageReadError(f"cannot read segmentation label {name}: {e}") from e
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
