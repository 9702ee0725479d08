#!/usr/bin/env python
"""Convert an original BICLab Meta-SpikeFormer classification checkpoint into metaspike-d2's layout.

    python tools/convert_original.py --input checkpoint-199.pth --output metaspikeformer_55m.pth

The input is read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowlisted for its
``args`` entry), every key is mapped explicitly (``head_kd`` included when present) and any missing or
unexpected key is an error. The output loads with
``timm.create_model("metaspikeformer_55m", kd=..., checkpoint_path=OUT)`` or, for detection and
segmentation, through ``MODEL.WEIGHTS`` (``classification/export.py`` writes backbone-only files).
"""
import argparse
import sys

from metaspike_d2.backbone import VARIANTS
from metaspike_d2.checkpoint import CheckpointError, convert_original_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="original checkpoint ({'model': ..., 'args': ...})")
    parser.add_argument("--output", required=True, help="where to write the converted checkpoint (.pth)")
    args = parser.parse_args(argv)
    try:
        info = convert_original_checkpoint(args.input, args.output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    variant = next((f"metaspikeformer_{k}" for k, v in VARIANTS.items() if list(v.widths) == info["widths"]),
                   "a custom width")
    print(f"converted {info['num_tensors']} tensors: widths {info['widths']} ({variant}), "
          f"{info['num_classes']} classes, kd head: {info['kd']}")
    print(f"wrote {args.output}")
    if variant.startswith("metaspikeformer_"):
        print(f"load with: timm.create_model('{variant}', num_classes={info['num_classes']}, "
              f"kd={info['kd']}, checkpoint_path='{args.output}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
