"""Training recipes: the original's ImageNet recipe, and one for small datasets, chosen from the data.

The ImageNet recipe (LAMB at 6e-4 x batch / 256, RandAugment m9, random-resized crops of 8-100 % of the
image, random erasing, label smoothing) is tuned for 1.28M images and hundreds of epochs; on a few thousand
small images it makes no progress in tens of epochs. The small-data recipe (AdamW at 5e-3 for a batch of 32,
crops of 70-100 %, no RandAugment / erasing / smoothing) learns them. ``--recipe auto`` (the default) picks
``small`` when the training set has fewer than :data:`SMALL_DATASET_IMAGES` images or the input is smaller
than :data:`SMALL_INPUT_SIZE` px, else ``imagenet``; any flag given on the command line or in a ``--config``
file wins over the recipe. The ImageNet configs under classification/configs name ``recipe: imagenet``.
"""
from __future__ import annotations

import argparse
from typing import Dict, Tuple

__all__ = ["RECIPES", "SMALL_DATASET_IMAGES", "SMALL_INPUT_SIZE", "choose_recipe", "apply_recipe"]

#: Flag values of each recipe (flag dests of classification/train.py); flags not listed keep their defaults.
RECIPES: Dict[str, Dict[str, object]] = {
    "imagenet": {  # the original's main_finetune.py
        "opt": "lambc", "blr": 6e-4, "weight_decay": 0.05, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
        "scale": [0.08, 1.0], "smoothing": 0.1,
    },
    "small": {  # thousands of images, tens of epochs (classification/configs/synthetic_tiny.yaml)
        "opt": "adamw", "blr": 0.04, "weight_decay": 0.05, "aa": "", "reprob": 0.0, "scale": [0.7, 1.0],
        "smoothing": 0.0,
    },
}

#: ``auto`` chooses ``small`` below this many training images ...
SMALL_DATASET_IMAGES = 100_000
#: ... or below this input size (px).
SMALL_INPUT_SIZE = 96


def choose_recipe(requested: str, num_train_images: int, input_size: int) -> Tuple[str, str]:
    """``(recipe name, reason)`` for ``--recipe requested`` ("auto", "imagenet" or "small")."""
    if requested != "auto":
        if requested not in RECIPES:
            raise ValueError(f"--recipe must be 'auto' or one of {sorted(RECIPES)}, got {requested!r}")
        return requested, "--recipe " + requested
    if num_train_images < SMALL_DATASET_IMAGES:
        return "small", f"auto: {num_train_images:,} training images < {SMALL_DATASET_IMAGES:,}"
    if input_size < SMALL_INPUT_SIZE:
        return "small", f"auto: input {input_size} px < {SMALL_INPUT_SIZE} px"
    return "imagenet", f"auto: {num_train_images:,} training images at {input_size} px"


def apply_recipe(args: argparse.Namespace, num_train_images: int) -> str:
    """Fill every recipe flag that is still ``None`` (not given) from the chosen recipe; returns a log line
    that names the recipe, why it was chosen, the values it set and how to override them."""
    name, reason = choose_recipe(args.recipe, num_train_images, args.input_size)
    filled = {}
    for key, value in RECIPES[name].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
            filled[key] = value
    given = sorted(set(RECIPES[name]) - set(filled))
    shown = " ".join(f"--{k.replace('_', '-')} {_show(v)}" for k, v in filled.items())
    line = f"recipe '{name}' ({reason}): {shown or 'every recipe flag was given'}"
    if given:
        line += f"; given explicitly: {', '.join('--' + k.replace('_', '-') for k in given)}"
    other = "imagenet" if name == "small" else "small"
    return line + f". Override with --recipe {other} or any of these flags."


def _show(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return repr(value) if value == "" else str(value)
