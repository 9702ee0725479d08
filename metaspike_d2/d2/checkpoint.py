"""``MetaSpikeCheckpointer``: Detectron2's checkpointer with safe loading and backbone-weight files.

* Every file is read with ``torch.load(weights_only=True)`` (through
  :func:`metaspike_d2.checkpoint.load_checkpoint_file`); pickle-based ``.pkl`` / ``.pyth`` files are refused.
* Full-model checkpoints written by Detectron2 (``model_final.pth``, ``last_checkpoint``) load as usual
  (``--eval-only``, ``--resume``).
* A Meta-SpikeFormer *backbone* file (what classification export writes, or one of our classification
  checkpoints) given as ``MODEL.WEIGHTS`` initializes only the bottom-up backbone: every backbone key must
  be present (otherwise :class:`~metaspike_d2.checkpoint.CheckpointError`), classifier keys are dropped and
  reported, the neck and heads keep their initialization.
* Saves are atomic (:func:`metaspike_d2.checkpoint.save_atomic`: temporary file, fsync, rename), and so is
  the ``last_checkpoint`` tag, so a kill at any moment leaves the previous complete checkpoint readable.
"""
from __future__ import annotations

import os
import tempfile

from detectron2.checkpoint import DetectionCheckpointer

from ..backbone import MetaSpikeFormer
from ..checkpoint import (CheckpointError, LoadReport, load_backbone_weights, load_checkpoint_file,
                          load_state_dict_strict, save_atomic)

__all__ = ["MetaSpikeCheckpointer"]

_BACKBONE_KEY = "__metaspike_backbone__"


def _is_backbone_state_dict(state_dict) -> bool:
    """Keys in the bare ``MetaSpikeFormer`` layout (ours, or the original BICLab one)."""
    return any(k.startswith(("stem.", "stage1.", "downsample1_1.", "block3.")) for k in state_dict)


class MetaSpikeCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads with ``weights_only=True`` and accepts backbone files."""

    def __init__(self, model, save_dir: str = "", *, save_to_disk=None, allow_partial: bool = False,
                 **checkpointables):
        """``allow_partial=False`` (default): a full-model checkpoint whose keys or shapes differ from the
        model (another variant, another task, another number of classes) raises
        :class:`~metaspike_d2.checkpoint.CheckpointError` listing every missing, unexpected and mismatched key
        (Detectron2 would skip them with a warning). ``True`` (``MODEL.METASPIKE.ALLOW_PARTIAL_WEIGHTS``):
        Detectron2's behaviour, the differences logged as warnings."""
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_partial = allow_partial

    def _log_incompatible_keys(self, incompatible) -> None:
        if incompatible is None:
            return
        from fvcore.common.checkpoint import _filter_reused_missing_keys

        missing = _filter_reused_missing_keys(self.model, incompatible.missing_keys) if incompatible.missing_keys \
            else []
        if self.allow_partial or not (missing or incompatible.unexpected_keys or incompatible.incorrect_shapes):
            return super()._log_incompatible_keys(incompatible)
        report = LoadReport(getattr(self, "_current_file", "checkpoint"), missing=sorted(missing),
                            unexpected=list(incompatible.unexpected_keys),
                            mismatched=list(incompatible.incorrect_shapes))
        bad = set(missing) | {k for k, _, _ in report.mismatched}
        report.loaded = [k for k in self.model.state_dict() if k not in bad]
        raise CheckpointError(
            report.describe() + " (model built from the config)\nRefusing a partial "
            "load: check MODEL.METASPIKE.VARIANT / WIDTHS, the task and NUM_CLASSES against the file, or set "
            "MODEL.METASPIKE.ALLOW_PARTIAL_WEIGHTS True to load only the matching tensors (e.g. fine-tuning "
            "with another number of classes).")

    def _load_file(self, filename: str):
        self._current_file = filename
        if filename.endswith((".pkl", ".pyth")):
            raise CheckpointError(
                f"{filename}: pickle-based checkpoints can run arbitrary code and are not loaded. Re-save the "
                "state dict with torch.save({'model': state_dict}, 'file.pth') on a machine where you trust it.")
        loaded = super()._load_file(filename)  # -> self._torch_load for everything else
        if _is_backbone_state_dict(loaded["model"]):
            state_dict, meta = load_backbone_weights(filename)
            meta["path"] = filename
            return {"model": state_dict, _BACKBONE_KEY: meta}
        return loaded

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``Checkpointer.save`` (same content), written with :func:`save_atomic` instead of
        ``torch.save`` into the final path (a kill mid-write would leave a truncated ``model_XXXX.pth``
        that ``last_checkpoint`` may already point to)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        save_atomic(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Write ``last_checkpoint`` atomically (temporary file, then rename)."""
        os.makedirs(self.save_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.save_dir, prefix=".last_checkpoint.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(last_filename_basename)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.save_dir, "last_checkpoint"))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _torch_load(self, f: str):
        return load_checkpoint_file(f)

    def _load_model(self, checkpoint):
        if _BACKBONE_KEY not in checkpoint:
            return super()._load_model(checkpoint)
        meta = checkpoint.pop(_BACKBONE_KEY)
        backbones = [m for m in self.model.modules() if isinstance(m, MetaSpikeFormer)]
        if len(backbones) != 1:
            raise CheckpointError(f"{meta['path']} holds Meta-SpikeFormer backbone weights, but the model has "
                                  f"{len(backbones)} Meta-SpikeFormer backbones")
        report = load_state_dict_strict(backbones[0], checkpoint.pop("model"), source=meta["path"])
        self.logger.info(
            f"Initialized the Meta-SpikeFormer backbone from {meta['path']} ({len(report.loaded)} tensors, "
            f"widths {meta['widths']}); dropped classifier keys: {meta['dropped'] or 'none'}; "
            "neck and heads keep their initialization.")
        return None
