"""tools/analyze_detections.py: confusion matrix at IoU 0.5 and class-agnostic AP50 on a hand-made case."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("analyze_detections", ROOT / "tools/analyze_detections.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)


def _write_case(tmp_path):
    boxes = {1: [10, 10, 20, 20], 2: [50, 10, 20, 20], 3: [10, 50, 20, 20], 4: [50, 50, 20, 20]}
    cats = {1: 1, 2: 2, 3: 3, 4: 3}  # annotation id -> category
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}],
          "annotations": [{"id": i, "image_id": 1, "category_id": cats[i], "bbox": b, "area": 400, "iscrowd": 0}
                          for i, b in boxes.items()]}
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},  # circle: right
        {"image_id": 1, "category_id": 1, "bbox": [51, 10, 20, 20], "score": 0.8},  # square called circle
        {"image_id": 1, "category_id": 3, "bbox": [20, 60, 20, 20], "score": 0.7},  # IoU 1/7 with a triangle
        {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "score": 0.6},  # triangle: right
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "res.json"


def test_confusion_matrix_counts_best_scoring_overlap_and_misses(tmp_path):
    gt_path, res_path = _write_case(tmp_path)
    from pycocotools.coco import COCO
    gt = COCO(str(gt_path))
    counts = analyze.confusion_matrix(gt, json.loads(res_path.read_text()), "bbox")
    np.testing.assert_array_equal(counts, [[1, 0, 0, 0],
                                           [1, 0, 0, 0],
                                           [0, 0, 1, 1]])


def test_report_shows_what_wrong_labels_cost(tmp_path, capsys):
    gt_path, res_path = _write_case(tmp_path)
    assert analyze.main(["--gt", str(gt_path), "--results", str(res_path)]) == 0
    out = capsys.readouterr().out
    line = out.splitlines()[0]
    ap50, agnostic = (float(x.split()[-1]) for x in line.split(":", 1)[1].split(","))
    # by class: circle 1.0, square 0 (found only as a circle), triangle 0.25 (1 of 2 found, after a false
    # positive); ignoring labels: recall 0.5 at precision 1, then 0.75 at 0.75 (101-point interpolation)
    assert abs(ap50 - 100 * (1 + 0 + 51 * 0.5 / 101) / 3) < 0.05
    assert abs(agnostic - 100 * (51 + 25 * 0.75) / 101) < 0.05
    assert "correct class 2 / 4, wrong class 1, missed 1" in out


def test_unreadable_files_are_named(tmp_path, capsys):
    gt_path, _ = _write_case(tmp_path)
    missing = tmp_path / "nope.json"
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--gt", str(gt_path), "--results", str(missing)])
    assert exit_info.value.code == 2
    assert f"--results {missing}: not a readable COCO results json" in capsys.readouterr().err
