"""Train and evaluate from scratch on real datasets, with the commands the README shows, one line per run.

    python benchmarks/real_data.py --raccoon ../shared/data/raccoon --camvid ../shared/data/camvid --digits \
        [--parts raccoon camvid digits] [--seeds 0 1] [--spike-levels 4] [--work-dir /tmp/metaspike_real]
        [--output FILE.json] [--extra KEY VALUE ...]

Parts (each runs its command as a subprocess, on the CPU, and times it end to end):

``raccoon``  Pascal VOC boxes (``raccoon/images``, ``raccoon/annotations``; 160 photos, 1 class). Held-out split:
             the XMLs sorted by their number, every 5th to ``val`` (32), the rest to ``train`` (128), as two
             folders of links. ``tools/train_net.py`` with ``--register-voc`` and the detection
             quickstart config (boxes only). Reported: bbox AP / AP50 on ``val``.
``camvid``   semantic segmentation PNGs (``camvid/{train,trainannot,val,valannot}``, ``classes.txt``, label 11 =
             void): ``tools/train_net.py`` with ``--register-sem-seg`` and
             ``configs/quickstart/semfpn_metaspike_tiny_real.yaml`` (240x320). Reported: mIoU, pixel accuracy, per-class IoU on the 101 ``val`` images.
``digits``   scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes) written as a 32x32 RGB
             ImageFolder (stratified 80/20 split, ``random_state=0``: 1,437 train / 360 val), then
             ``classification/train.py`` with no flag but the data, the size and the schedule. Reported: the
             best and last val top-1.

``--extra KEY VALUE ...`` appends overrides to every Detectron2 command (e.g. ``SOLVER.MAX_ITER 500``).
Not a test: nothing is asserted. The lines are printed and written as JSON to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def raccoon_command(raccoon: Path, work: Path, seed: int, out: Path) -> list:
    """The README's raccoon command (train on 128 photos, evaluate on 32), with the split folders made here."""
    xmls = sorted((raccoon / "annotations").glob("*.xml"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not xmls:
        raise SystemExit(f"{raccoon}/annotations: no *.xml files (expected raccoon/images/*.jpg + annotations/*.xml)")
    for split in ("train_xml", "val_xml"):
        folder = work / "raccoon" / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for i, xml in enumerate(xmls):
        (work / "raccoon" / ("val_xml" if i % 5 == 4 else "train_xml") / xml.name).symlink_to(xml.resolve())
    return [
        "tools/train_net.py", "--config-file", "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml",
        "--register-voc", "raccoon_train", str(raccoon / "images"), str(work / "raccoon" / "train_xml"),
        "--register-voc", "raccoon_val", str(raccoon / "images"), str(work / "raccoon" / "val_xml"),
        "DATASETS.TRAIN", "('raccoon_train',)", "DATASETS.TEST", "('raccoon_val',)", "MODEL.MASK_ON", "False",
        *RACCOON_OVERRIDES, "SEED", str(seed), "OUTPUT_DIR", str(out),
    ]


#: Settings of the raccoon command beyond the quickstart config (README, "Train on your own data").
RACCOON_OVERRIDES = ["INPUT.MIN_SIZE_TRAIN", "(128, 160, 192)", "INPUT.MAX_SIZE_TRAIN", "224",
                     "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224", "SOLVER.MAX_ITER", "1500"]


def camvid_command(camvid: Path, seed: int, out: Path) -> list:
    return [
        "tools/train_net.py", "--config-file", "configs/quickstart/semfpn_metaspike_tiny_real.yaml",
        "--register-sem-seg", "camvid_train", str(camvid / "train"), str(camvid / "trainannot"),
        str(camvid / "classes.txt"),
        "--register-sem-seg", "camvid_val", str(camvid / "val"), str(camvid / "valannot"), str(camvid / "classes.txt"),
        "--ignore-label", "11",
        "DATASETS.TRAIN", "('camvid_train',)", "DATASETS.TEST", "('camvid_val',)",
        *CAMVID_OVERRIDES, "SEED", str(seed), "OUTPUT_DIR", str(out),
    ]


#: Settings of the CamVid command beyond its config (README, "Train on your own data"): none.
CAMVID_OVERRIDES: list = []


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as a 32x32 RGB ImageFolder (once)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (root / "done").is_file():
        return root
    digits = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(digits.images, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    for split, xs, ys in (("train", x_tr, y_tr), ("val", x_va, y_va)):
        for i, (img, label) in enumerate(zip(xs, ys)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (img / 16.0 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")
    (root / "done").write_text("ok\n")
    return root


def digits_command(work: Path, seed: int, out: Path) -> list:
    data = write_digits(work / "digits")
    return ["classification/train.py", "--model", "metaspikeformer_tiny", "--data-path", str(data),
            "--input-size", "32", "--epochs", "30", "--warmup-epochs", "2", "--batch-size", "64", "--device", "cpu",
            "--seed", str(seed), "--no-tensorboard", "--output-dir", str(out)]


def run(cmd: list, log: Path) -> tuple:
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return proc.returncode, time.time() - start, log.read_text(errors="replace")


def copypaste(text: str) -> dict:
    """``{task: {metric: value}}`` from Detectron2's final ``copypaste:`` lines."""
    out, lines = {}, [ln.split("copypaste: ", 1)[1].strip() for ln in text.splitlines() if "copypaste: " in ln]
    for i, line in enumerate(lines):
        if line.startswith("Task: ") and i + 2 < len(lines):
            out[line[len("Task: "):]] = dict(zip(lines[i + 1].split(","), map(float, lines[i + 2].split(","))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raccoon", type=Path, help="raccoon folder (images/, annotations/)")
    p.add_argument("--camvid", type=Path, help="CamVid folder (train/, trainannot/, val/, valannot/, classes.txt)")
    p.add_argument("--digits", action="store_true", help="run the scikit-learn digits classification part")
    p.add_argument("--parts", nargs="+", default=None, help="default: every part whose data is given")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/metaspike_real_data"))
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/real_data.json")
    p.add_argument("--spike-levels", type=int, default=1,
                   help="D of every neuron (1: binary LIF; 4: integer I-LIF), for every part")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for Detectron2 runs")
    args = p.parse_args(argv)
    parts = args.parts or [n for n, given in (("raccoon", args.raccoon), ("camvid", args.camvid),
                                              ("digits", args.digits)) if given]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for part in parts:
        for seed in args.seeds:
            levels = [] if args.spike_levels == 1 else ["MODEL.METASPIKE.SPIKE_LEVELS", str(args.spike_levels)]
            tag = f"{part}_seed{seed}" + ("" if args.spike_levels == 1 else f"_d{args.spike_levels}")
            out = args.work_dir / tag
            if part == "raccoon":
                cmd = raccoon_command(args.raccoon.resolve(), args.work_dir, seed, out) + levels + args.extra
            elif part == "camvid":
                cmd = camvid_command(args.camvid.resolve(), seed, out) + levels + args.extra
            elif part == "digits":
                cmd = digits_command(args.work_dir, seed, out) + ["--spike-levels", str(args.spike_levels)]
            else:
                raise SystemExit(f"unknown part {part!r}: raccoon, camvid or digits")
            rc, seconds, text = run(cmd, args.work_dir / f"{tag}.log")
            row = {"part": part, "seed": seed, "spike_levels": args.spike_levels, "exit": rc,
                   "seconds": round(seconds, 1), "command": cmd}
            if part == "digits":
                tops = [float(m) for m in re.findall(r"val top-1 ([0-9.]+)%", text)]
                row.update(epochs=len(tops), top1_last=tops[-1] if tops else None, top1_best=max(tops, default=None))
                summary = f"val top-1 last {row['top1_last']} best {row['top1_best']} ({len(tops)} epochs)"
            else:
                row["metrics"] = copypaste(text)
                if part == "camvid":  # per-class IoU from SemSegEvaluator's logged result dict
                    row["per_class_iou"] = {k: round(float(v), 1) for k, v in
                                            re.findall(r"'IoU-([\w-]+)': (?:np\.float64\()?([0-9.]+)", text)}
                    m = row["metrics"].get("sem_seg", {})
                    zero = [k for k, v in row.get("per_class_iou", {}).items() if v == 0]
                    summary = f"mIoU {m.get('mIoU', float('nan')):.1f} pACC {m.get('pACC', float('nan')):.1f} " \
                              f"classes at 0 IoU: {zero or 'none'}"
                else:
                    m = row["metrics"].get("bbox", {})
                    summary = f"bbox AP50 {m.get('AP50', float('nan')):.1f} AP {m.get('AP', float('nan')):.1f}"
            rows.append(row)
            print(f"{part} seed {seed} D={args.spike_levels}: {summary} | exit {rc} | {seconds / 60:.1f} min | "
                  f"log {args.work_dir / f'{tag}.log'}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
