"""classification/train.py under torchrun: 2 CPU processes (gloo), one short epoch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classification.data import make_synthetic_imagefolder  # noqa: E402
from metaspike_d2.checkpoint import load_checkpoint_file  # noqa: E402


def test_two_process_gloo_epoch(tmp_path):
    synth = tmp_path / "synth"
    # 3 train / 1 val image per class: 30 train images = 15 per rank (1 step of 8, last partial batch dropped),
    # 10 val images sharded 5 + 5 without padding
    make_synthetic_imagefolder(str(synth), train_per_class=3, val_per_class=1)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "classification" / "train.py"), "--model", "metaspikeformer_tiny", "--data-path", "synthetic",
           "--synthetic-dir", str(synth), "--synthetic-per-class", "3", "1", "--input-size", "32",
           "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0", "--device", "cpu",
           "--no-amp", "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # metrics are reduced over both processes: 2 ranks x 1 step x 8 images, all 10 val images exactly once
    assert record["train_images"] == 16
    assert record["val_images"] == 10
    assert record["epoch"] == 0 and 0 <= record["val_top1"] <= 100
    args = json.loads((out / "args.json").read_text())
    assert args["world_size"] == 2 and args["distributed"]
    assert args["lr"] == 0.04 * 8 * 2 / 256  # the small-data recipe's blr, scaled by the effective batch of both processes
    ckpt = load_checkpoint_file(out / "checkpoint-last.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved without the DDP wrapper
    assert torch.isfinite(torch.tensor(record["train_loss"]))
