"""Robustness (issue 7): atomic Detectron2 checkpoints, SIGKILL + --resume, non-finite losses, bad inputs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from metaspike_d2.checkpoint import load_checkpoint_file
from metaspike_d2.d2 import MetaSpikeCheckpointer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml")

# Runs tools/train_net.py on a registered 8-image, 64 px shapes split ("robust_shapes_train"):
#   python runner.py DATA_ROOT [train_net arguments...]
RUNNER = textwrap.dedent("""
    import importlib.util, sys
    sys.path.insert(0, {root!r})
    from metaspike_d2.data.shapes import ShapesSplit, register_shapes_instances
    register_shapes_instances("robust_shapes_train", "train", ShapesSplit(8, (64, 64), seed=0), sys.argv[1])
    spec = importlib.util.spec_from_file_location("train_net", {root!r} + "/tools/train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    args = train_net.default_argument_parser().parse_args(sys.argv[2:])
    train_net.launch(train_net.main, args.num_gpus, dist_url=args.dist_url, args=(args,))
""")


def tiny_train_opts(out_dir, max_iter, period):
    return ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('robust_shapes_train',)", "DATASETS.TEST", "()",
            "TEST.EVAL_PERIOD", "0", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", str(max_iter),
            "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", str(period), "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "OUTPUT_DIR", str(out_dir)]


@pytest.fixture(scope="module")
def shapes_runner(tmp_path_factory):
    """(runner script, data root) with the tiny split already written."""
    base = tmp_path_factory.mktemp("robust_shapes")
    from metaspike_d2.data.shapes import ShapesSplit, ensure_shapes_split
    ensure_shapes_split("train", ShapesSplit(8, (64, 64), seed=0), base)
    runner = base / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    return runner, base


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------
# 1. Atomic checkpoints, kill and resume


def test_d2_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the previous checkpoint and last_checkpoint intact, and no
    partial file (fvcore's save writes into the final path)."""
    model = nn.Linear(3, 2)
    ckpt = MetaSpikeCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "model_0000002.pth").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert MetaSpikeCheckpointer(nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 1


def _last_iteration(metrics_file):
    iters = [json.loads(line)["iteration"] for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return iters[-1]


def test_d2_sigkill_after_first_checkpoint_then_resume(shapes_runner, tmp_path):
    runner, data_root = shapes_runner
    out, max_iter = tmp_path / "out", 12
    head = [sys.executable, str(runner), str(data_root), "--config-file", QUICKSTART, "--num-gpus", "1"]
    cmd = [*head, *tiny_train_opts(out, max_iter, 3)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not (out / "last_checkpoint").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (out / "model_final.pth").exists(), "the run finished before it was killed"
    # What the kill left behind is complete and readable: last_checkpoint points to a full checkpoint.
    last = (out / "last_checkpoint").read_text().strip()
    saved = load_checkpoint_file(out / last)
    killed_at = saved["iteration"]
    assert killed_at < max_iter - 1 and {"model", "trainer", "iteration"} <= set(saved)
    assert "optimizer" in saved["trainer"]["_trainer"] and any("LRScheduler" in h for h in saved["trainer"]["hooks"])

    resumed = subprocess.run([*head, "--resume", *tiny_train_opts(out, max_iter, 3)], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert f"Starting training from iteration {killed_at + 1}" in text
    final = load_checkpoint_file(out / "model_final.pth")
    assert final["iteration"] == max_iter - 1
    assert _last_iteration(out / "metrics.json") == max_iter - 1
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
