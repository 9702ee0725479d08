#!/usr/bin/env python
"""Export classification weights as backbone weights for Detectron2 (``MODEL.WEIGHTS``).

    python classification/export.py --input output/55m_t1/checkpoint-best.pth --output weights/55m_backbone.pth

Accepts our training checkpoints (``{"model": ..., "optimizer": ...}``, or ``--ema`` for the EMA weights),
our backbone files, and the original BICLab checkpoints (converted key by key with
``metaspike_d2.checkpoint.convert_original_state_dict``). Classifier heads (``head``, ``head_kd``) are dropped
and listed. The result is checked before writing: it must load into a ``MetaSpikeFormer`` of the inferred (or
given, ``--variant``) widths with no missing and no unexpected key; then it is written with
``save_backbone_weights``, the format the detection and segmentation configs read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaspike_d2.backbone import VARIANTS, MetaSpikeFormer
from metaspike_d2.checkpoint import (CheckpointError, backbone_state_dict, convert_original_state_dict,
                                     extract_state_dict, infer_widths, load_checkpoint_file, load_state_dict_strict,
                                     save_backbone_weights)

__all__ = ["export_backbone", "main"]

ORIGINAL_MARKER = "downsample1_1.encode_conv.weight"


def export_backbone(input_path: str, output_path: str, variant: str | None = None, ema: bool = False) -> dict:
    """Convert ``input_path`` to a backbone weight file at ``output_path``; returns a small report."""
    checkpoint = load_checkpoint_file(input_path)
    if ema:
        if not isinstance(checkpoint, dict) or "model_ema" not in checkpoint:
            raise CheckpointError(f"{input_path}: --ema given but the checkpoint has no 'model_ema' entry")
        checkpoint = {"model": checkpoint["model_ema"]}
    state_dict = extract_state_dict(checkpoint, input_path)
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    layout = "ours"
    if ORIGINAL_MARKER in state_dict:
        layout = "original BICLab"
        state_dict = convert_original_state_dict(state_dict, source=input_path)
    backbone, dropped = backbone_state_dict(state_dict)
    widths = infer_widths(backbone)
    if variant is not None:
        if variant not in VARIANTS:
            raise SystemExit(f"--variant {variant!r}: not one of {sorted(VARIANTS)}")
        expected = VARIANTS[variant].widths
        if tuple(widths) != tuple(expected):
            raise CheckpointError(f"{input_path}: widths {list(widths)} do not match --variant {variant} "
                                  f"({list(expected)}); wrong checkpoint or wrong variant")
    # the check the Detectron2 side relies on: every backbone tensor present, nothing extra
    # (stage4_stride does not change any weight shape, so the default model stands for both; the neurons'
    # spike levels D are the weights' own)
    levels = int(backbone["spike_levels"]) if "spike_levels" in backbone else 1
    load_state_dict_strict(MetaSpikeFormer(widths, spike_levels=levels), backbone, source=f"{input_path} (backbone)")
    variant_name = next((k for k, v in VARIANTS.items() if tuple(v.widths) == tuple(widths)), None)
    source = f"{Path(input_path).name} ({layout} layout{', EMA' if ema else ''})"
    save_backbone_weights(output_path, backbone, source=source)
    return {"input": str(input_path), "output": str(output_path), "layout": layout, "widths": list(widths),
            "variant": variant_name, "spike_levels": levels, "tensors": len(backbone), "dropped": dropped}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="classification checkpoint (ours or the original's)")
    p.add_argument("--output", required=True, help="backbone weight file to write (for MODEL.WEIGHTS)")
    p.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                   help="fail unless the weights have this variant's widths")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    args = p.parse_args(argv)
    try:
        report = export_backbone(args.input, args.output, variant=args.variant, ema=args.ema)
    except CheckpointError as e:
        raise SystemExit(f"export failed: {e}") from None
    print(f"wrote {report['output']}: {report['tensors']} backbone tensors, widths {report['widths']} "
          f"(variant {report['variant'] or 'custom'}, spike levels D={report['spike_levels']}: set "
          f"MODEL.METASPIKE.SPIKE_LEVELS {report['spike_levels']}), from the {report['layout']} layout")
    print(f"dropped (classifier only): {', '.join(report['dropped']) or 'none'}")
    print(json.dumps({k: v for k, v in report.items() if k != "dropped"}))
    return report


if __name__ == "__main__":
    main()
