#!/usr/bin/env python
"""Where a detector's AP goes: classification vs. localization, from a COCO results file.

    python tools/analyze_detections.py \\
        --gt datasets/metaspike_shapes_v1/annotations/instances_val.json \\
        --results output/quickstart_mask_rcnn_metaspike_tiny_shapes/inference/coco_instances_results.json

Prints, for boxes (and masks with ``--iou-type segm``):

* AP50 as COCO computes it, and class-agnostic AP50 (pycocotools with ``useCats=0``): the difference is
  what wrong class labels cost;
* a confusion matrix at IoU >= 0.5: for every ground-truth object, the class of the highest-scoring
  detection overlapping it by at least 0.5 (any class), or "missed" when there is none.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections import defaultdict
from typing import Dict, List

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def ap50(gt: COCO, dt: COCO, iou_type: str, use_cats: bool) -> float:
    """COCO AP at IoU 0.5 (percent); ``use_cats=False`` ignores class labels."""
    evaluator = COCOeval(gt, dt, iou_type)
    evaluator.params.useCats = int(use_cats)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100.0 * float(evaluator.stats[1])


def confusion_matrix(gt: COCO, results: List[dict], iou_type: str) -> np.ndarray:
    """``(K, K + 1)`` counts: row = ground-truth class, column = class of the best-scoring detection with
    IoU >= 0.5 (column K: missed). Classes are in ``gt.getCatIds()`` order; crowd objects are skipped."""
    cat_ids = gt.getCatIds()
    index = {c: i for i, c in enumerate(cat_ids)}
    by_image: Dict[int, List[dict]] = defaultdict(list)
    for det in results:
        by_image[det["image_id"]].append(det)
    key = "bbox" if iou_type == "bbox" else "segmentation"
    counts = np.zeros((len(cat_ids), len(cat_ids) + 1), dtype=np.int64)
    for ann in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        dets = by_image.get(ann["image_id"], [])
        best = None
        if dets:
            target = ann["bbox"] if iou_type == "bbox" else gt.annToRLE(ann)
            ious = mask_util.iou([d[key] for d in dets], [target], [0])[:, 0]
            hits = [d for d, iou in zip(dets, ious) if iou >= 0.5]
            if hits:
                best = max(hits, key=lambda d: d["score"])
        counts[index[ann["category_id"]], index[best["category_id"]] if best else len(cat_ids)] += 1
    return counts


def format_report(gt: COCO, results: List[dict], iou_type: str) -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress prints
        dt = gt.loadRes(results)
    names = [c["name"] for c in gt.loadCats(gt.getCatIds())]
    counts = confusion_matrix(gt, results, iou_type)
    width = max(len(n) for n in names + ["missed"]) + 2
    lines = [f"{iou_type}: AP50 {ap50(gt, dt, iou_type, True):.1f}, class-agnostic AP50 "
             f"{ap50(gt, dt, iou_type, False):.1f}",
             "confusion at IoU >= 0.5 (rows: ground truth, columns: best-scoring detection's class)",
             " " * width + "".join(n.rjust(width) for n in names + ["missed"])]
    for name, row in zip(names, counts):
        lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    correct = int(np.trace(counts[:, :-1]))
    lines.append(f"correct class {correct} / {int(counts.sum())}, wrong class {int(counts[:, :-1].sum()) - correct}, "
                 f"missed {int(counts[:, -1].sum())}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="COCO annotation json of the evaluated split")
    parser.add_argument("--results", required=True, help="coco_instances_results.json written by COCOEvaluator")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(args.gt)
    except (OSError, ValueError) as e:
        parser.error(f"--gt {args.gt}: not a readable COCO annotation json ({e})")
    try:
        with open(args.results) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"--results {args.results}: not a readable COCO results json ({e})")
    if not results:
        print(f"{args.results}: no detections", file=sys.stderr)
        return 1
    print(format_report(gt, results, args.iou_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
