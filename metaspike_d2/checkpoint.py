"""Safe checkpoint I/O: one loader (``weights_only=True``), strict key checks with a report, atomic saves,
and the explicit key map from the original BICLab checkpoints to ours.

Every checkpoint load in this project goes through :func:`load_checkpoint_file`, so loading weights
never runs code. The only non-tensor class allowlisted is ``argparse.Namespace`` (the original's files
store their command line under ``"args"``).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

from .backbone import ORIGINAL_V_THRESHOLD
from .blocks import ORIGINAL_PROJ_BN_EPS

__all__ = [
    "CheckpointError",
    "LoadReport",
    "load_checkpoint_file",
    "extract_state_dict",
    "load_state_dict_strict",
    "save_atomic",
    "original_key_map",
    "convert_original_state_dict",
    "infer_widths",
    "backbone_state_dict",
    "save_backbone_weights",
    "load_backbone_weights",
    "convert_original_checkpoint",
]

logger = logging.getLogger(__name__)

#: Classes a checkpoint may contain besides tensors and plain Python containers.
SAFE_GLOBALS = [argparse.Namespace]

CONVERT_HINT = (
    "Only tensors, plain Python values and argparse.Namespace are accepted (weights_only=True). "
    "Convert an original BICLab checkpoint with `python tools/convert_original.py --input FILE --output OUT.pth`; "
    "for any other file, re-save its state_dict with plain torch.save({'model': model.state_dict()}, path) "
    "on a machine where you trust it."
)


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read, or does not match the model it is loaded into."""


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the minimal allowlist and errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to unpickle arbitrary objects ({e}). {CONVERT_HINT}") from e
    except (EOFError, RuntimeError, zipfile.BadZipFile) as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({size} bytes; truncated or corrupt download?): {e}") from e


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: its ``"model"`` or ``"state_dict"`` entry, or the dict itself."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:10]} (is this a state dict?)")
    return dict(checkpoint)


@dataclass
class LoadReport:
    """What a state-dict load matched and what it did not."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def show(keys):
            keys = list(keys)
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            return ", ".join(map(str, keys[:limit])) + more

        lines = [f"{self.source}: {len(self.loaded)} tensors matched"]
        if self.missing:
            lines.append(f"  missing in the checkpoint ({len(self.missing)}): {show(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}): {show(self.unexpected)}")
        if self.mismatched:
            lines.append(f"  shape mismatches ({len(self.mismatched)}): "
                         + show(f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched))
        return "\n".join(lines)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                           allow_partial: bool = False) -> LoadReport:
    """Load ``state_dict`` into ``model``; refuse (with the full list of differences) unless it matches.

    With ``allow_partial=True`` the matching tensors are loaded and the differences are logged as a warning
    instead: an explicit, reported partial load, never a silent one.
    """
    own = model.state_dict()
    report = LoadReport(source)
    usable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state_dict]
    if not report.complete:
        if not allow_partial:
            raise CheckpointError(report.describe() + "\nRefusing a partial load (pass the explicit partial-load "
                                  "option to load only the matching tensors).")
        logger.warning("partial load:\n%s", report.describe())
    model.load_state_dict(usable, strict=False)  # differences were checked and reported above
    return report


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename: a kill at any moment leaves
    either the previous file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------------------
# The original BICLab layout -> ours.

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: original module path -> our module path, for the fixed stage layout.
_ORIGINAL_STAGES = (
    [("downsample1_1", "stem.downsample", "ds"), ("ConvBlock1_1.0", "stem.blocks.0", "conv"),
     ("downsample1_2", "stage1.downsample", "ds"), ("ConvBlock1_2.0", "stage1.blocks.0", "conv"),
     ("downsample2", "stage2.downsample", "ds"), ("ConvBlock2_1.0", "stage2.blocks.0", "conv"),
     ("ConvBlock2_2.0", "stage2.blocks.1", "conv"), ("downsample3", "stage3.downsample", "ds")]
    + [(f"block3.{j}", f"stage3.blocks.{j}", "attn") for j in range(6)]
    + [("downsample4", "stage4.downsample", "ds")]
    + [(f"block4.{j}", f"stage4.blocks.{j}", "attn") for j in range(2)]
)


def _module_keys(kind: str) -> List[Tuple[str, str]]:
    """(original suffix, our suffix) pairs for one module of the given kind."""
    bn = lambda a, b: [(f"{a}.{s}", f"{b}.{s}") for s in _BN]  # noqa: E731
    if kind == "ds":
        return [("encode_conv.weight", "conv.weight"), ("encode_conv.bias", "conv.bias"), *bn("encode_bn", "bn")]
    if kind == "conv":
        return [("Conv.pwconv1.weight", "sepconv.pwconv1.weight"), *bn("Conv.bn1", "sepconv.bn1"),
                ("Conv.dwconv.weight", "sepconv.dwconv.weight"), ("Conv.pwconv2.weight", "sepconv.pwconv2.weight"),
                *bn("Conv.bn2", "sepconv.bn2"), ("conv1.weight", "conv1.weight"), *bn("bn1", "bn1"),
                ("conv2.weight", "conv2.weight"), *bn("bn2", "bn2")]
    pairs = []
    for x in ("q", "k", "v", "proj"):
        o, n = f"attn.{x}_conv", f"attn.{x}_conv"
        pairs += [(f"{o}.0.body.0.weight", f"{n}.pw1.weight"), *bn(f"{o}.0.body.1.bn", f"{n}.bn_pad"),
                  (f"{o}.0.body.2.0.weight", f"{n}.dw.weight"), (f"{o}.0.body.2.1.weight", f"{n}.pw2.weight"),
                  *bn(f"{o}.0.body.2.2", f"{n}.bn"), *bn(f"{o}.1", f"attn.{x}_bn")]
    for i in (1, 2):
        pairs += [(f"mlp.fc{i}_conv.weight", f"mlp.fc{i}.weight"), (f"mlp.fc{i}_conv.bias", f"mlp.fc{i}.bias"),
                  *bn(f"mlp.fc{i}_bn", f"mlp.bn{i}")]
    return pairs


def original_key_map(heads: Tuple[str, ...] = ("head",)) -> Dict[str, str]:
    """Every key of an original classification state dict -> our key (backbone, plus the given heads)."""
    mapping = {}
    for orig, ours, kind in _ORIGINAL_STAGES:
        for a, b in _module_keys(kind):
            mapping[f"{orig}.{a}"] = f"{ours}.{b}"
    for head in heads:
        mapping[f"{head}.weight"] = f"{head}.weight"
        mapping[f"{head}.bias"] = f"{head}.bias"
    return mapping


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "original checkpoint"
                                ) -> Dict[str, torch.Tensor]:
    """Map an original ``Spiking_vit_MetaFormer`` state dict to ours, key by key.

    ``head`` and ``head_kd`` are converted when present. Fails listing every missing or unexpected key.
    The token-MLP weights change from Conv1d ``(out, in, 1)`` to 1x1 Conv2d ``(out, in, 1, 1)``. The
    neuron-setting buffers get the original's values (``v_threshold`` 1.0, ``attn_proj_bn_eps`` 1e-5, binary
    ``spike_levels`` 1), so a
    converted checkpoint computes the original's logits in a model built with this project's defaults.
    """
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    heads = tuple(h for h in ("head", "head_kd") if f"{h}.weight" in state_dict)
    mapping = original_key_map(heads)
    missing = [k for k in mapping if k not in state_dict]
    unexpected = [k for k in state_dict if k not in mapping]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not have the original Meta-SpikeFormer layout:\n"
            f"  missing ({len(missing)}): {missing[:20]}\n  unexpected ({len(unexpected)}): {unexpected[:20]}")
    out = {}
    for orig, ours in mapping.items():
        value = state_dict[orig]
        if ".mlp.fc" in ours and ours.endswith(".weight") and value.dim() == 3:
            value = value.unsqueeze(-1)
        out[ours] = value
    # the neuron settings the original trained with (MetaSpikeFormer applies them on load)
    out["v_threshold"] = torch.tensor(ORIGINAL_V_THRESHOLD, dtype=torch.float64)
    out["attn_proj_bn_eps"] = torch.tensor(ORIGINAL_PROJ_BN_EPS, dtype=torch.float64)
    out["spike_levels"] = torch.tensor(1, dtype=torch.int64)  # binary LIF neurons
    return out


def infer_widths(state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, int, int, int]:
    """Stage widths ``[C0, C1, C2, C3]`` read off a state dict in *our* layout."""
    try:
        return tuple(int(state_dict[f"{s}.downsample.conv.weight"].shape[0])
                     for s in ("stage1", "stage2", "stage3", "stage4"))  # type: ignore[return-value]
    except KeyError as e:
        raise CheckpointError(f"cannot infer Meta-SpikeFormer widths: key {e} is missing") from e


# --------------------------------------------------------------------------------------------------
# Backbone weight files: what classification/export.py writes and what MODEL.WEIGHTS of the detection
# and segmentation configs (and MetaSpikeFormer itself) load.

BACKBONE_FORMAT = "metaspike_d2.backbone/1"
#: Classifier-only entries of a classification state dict (dropped, and reported, by export).
CLASSIFIER_ONLY_PREFIXES = ("head.", "head_kd.")


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Split a classifier state dict (our layout) into backbone tensors and the dropped head keys."""
    kept, dropped = {}, []
    for key, value in state_dict.items():
        (dropped.append(key) if key.startswith(CLASSIFIER_ONLY_PREFIXES) else kept.__setitem__(key, value))
    return kept, dropped


def save_backbone_weights(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], source: str) -> Path:
    """Write backbone weights (our ``MetaSpikeFormer`` keys, no prefix) atomically, with their widths.

    Classifier heads in ``state_dict`` are dropped and listed in the file. File content:
    ``{"model": state_dict, "format": BACKBONE_FORMAT, "widths": [C0..C3], "source": str, "dropped": [...]}``;
    only tensors and plain values, so it loads with ``weights_only=True``.
    """
    kept, dropped = backbone_state_dict(state_dict)
    kept = {k: v.detach().cpu().contiguous() for k, v in kept.items()}
    return save_atomic({"model": kept, "format": BACKBONE_FORMAT, "widths": list(infer_widths(kept)),
                        "source": source, "dropped": dropped}, path)


def load_backbone_weights(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a backbone weight file; classification checkpoints of ours are accepted too (heads dropped).

    Returns ``(state_dict in MetaSpikeFormer layout, metadata)``; the metadata lists ``dropped`` keys.
    """
    checkpoint = load_checkpoint_file(path)
    state_dict, dropped = backbone_state_dict(extract_state_dict(checkpoint, str(path)))
    if any(k.startswith(("downsample1_1.", "block3.")) for k in state_dict):
        raise CheckpointError(f"{path} has the original BICLab key layout; convert it first with "
                              "`python tools/convert_original.py --input FILE --output OUT.pth`")
    meta = {k: v for k, v in checkpoint.items() if k != "model"} if isinstance(checkpoint, Mapping) else {}
    meta["widths"] = list(infer_widths(state_dict))
    meta["dropped"] = list(meta.get("dropped", [])) + dropped
    return state_dict, meta


def _plain(value: Any) -> Any:
    """A value reduced to what ``weights_only=True`` accepts (containers of str/int/float/bool/None)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def convert_original_checkpoint(input_path: str | os.PathLike, output_path: str | os.PathLike) -> Dict[str, Any]:
    """Convert an original BICLab classification checkpoint file into ours (written atomically).

    Input: ``{"model": state_dict, "args": Namespace, "epoch", "optimizer", "scaler"}`` (or a bare state
    dict). Output: ``{"model": our state_dict, "widths", "num_classes", "kd", "source", "original_args",
    "original_epoch"}``, loadable with ``timm.create_model(name, num_classes=..., kd=..., checkpoint_path=...)``.
    Optimizer and scaler states are not carried over (they belong to the original's training run).
    """
    checkpoint = load_checkpoint_file(input_path)
    state_dict = convert_original_state_dict(extract_state_dict(checkpoint, str(input_path)), str(input_path))
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    info = {
        "widths": list(infer_widths(state_dict)),
        "num_classes": int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0,
        "kd": "head_kd.weight" in state_dict,
        "source": f"converted from original BICLab checkpoint {Path(input_path).name}",
        "original_args": _plain(vars(args)) if isinstance(args, argparse.Namespace) else _plain(args),
        "original_epoch": _plain(checkpoint.get("epoch")) if isinstance(checkpoint, Mapping) else None,
    }
    save_atomic({"model": state_dict, **info}, output_path)
    return {**info, "num_tensors": len(state_dict)}
