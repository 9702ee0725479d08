"""Robustness: atomic Detectron2 checkpoints, SIGKILL + --resume, non-finite losses, bad inputs."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
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
    import sys
    sys.path[:0] = [{root!r}, {root!r} + "/tools"]
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from metaspike_d2.data.shapes import SHAPES_CLASSES, ShapesSplit, register_shapes_instances
    import train_net

    # module level: also runs in the processes detectron2's launch spawns
    register_shapes_instances("robust_shapes_train", "train", ShapesSplit(8, (64, 64), seed=0), sys.argv[1])
    # two copies of the first image: batch statistics of 1 image == those of 2 identical images
    DatasetCatalog.register("robust_twins", lambda: [dict(DatasetCatalog.get("robust_shapes_train")[0], image_id=i)
                                                     for i in (0, 1)])
    MetadataCatalog.get("robust_twins").set(thing_classes=list(SHAPES_CLASSES))

    if __name__ == "__main__":
        train_net.launch_from_args(train_net.argument_parser().parse_args(sys.argv[2:]))
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


def kill_when_file_appears(cmd, marker, log_path, **popen_kwargs):
    """Run ``cmd`` and SIGKILL it as soon as ``marker`` exists (it must appear within 240 s)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, **popen_kwargs)
        deadline = time.time() + 240
        try:
            while not marker.exists():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, f"no {marker.name} within 240 s"
                time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


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
    kill_when_file_appears(cmd, out / "last_checkpoint", tmp_path / "first.log", start_new_session=True)
    assert not (out / "model_final.pth").exists(), "the run finished before it was killed"
    # What the kill left behind is complete and readable: last_checkpoint points to a full checkpoint.
    last = (out / "last_checkpoint").read_text().strip()
    saved = load_checkpoint_file(out / last)
    killed_at = saved["iteration"]
    assert killed_at < max_iter - 1 and {"model", "trainer", "iteration"} <= set(saved)
    assert "optimizer" in saved["trainer"]["_trainer"] and any("LRScheduler" in h for h in saved["trainer"]["hooks"])

    resumed = subprocess.run([*head, "--resume", *tiny_train_opts(out, max_iter, 3)], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert f"Starting training from iteration {killed_at + 1}" in text
    final = load_checkpoint_file(out / "model_final.pth")
    assert final["iteration"] == max_iter - 1
    assert _last_iteration(out / "metrics.json") == max_iter - 1
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"


# ------------------------------------------------------------------------------------------------
# 2. Distributed on the CPU (gloo)


def _first_loss(shapes_runner, out, num_procs):
    runner, data_root = shapes_runner
    deterministic = [  # every anchor and proposal is sampled (no per-process randomness), no flip
        "DATASETS.TRAIN", "('robust_twins',)", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "INPUT.RANDOM_FLIP", "none", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "4096",
        "MODEL.RPN.POSITIVE_FRACTION", "1.0", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
        "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0"]
    # one process through --num-gpus, two through the config's CPU_PROCESSES (what the quickstart does)
    procs = (["--num-gpus", "1"], []) if num_procs == 1 else ([], ["CPU_PROCESSES", str(num_procs)])
    cmd = [sys.executable, str(runner), str(data_root), "--config-file", QUICKSTART, *procs[0],
           *tiny_train_opts(out, 1, 1000), *deterministic, *procs[1]]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    assert records[-1]["iteration"] == 0
    return records[-1], proc.stdout + proc.stderr


def test_d2_two_cpu_processes_match_one_process_with_both_images(shapes_runner, tmp_path):
    """CPU_PROCESSES 2 on a CPU-only machine trains with gloo (Detectron2's create_ddp_model passes
    device_ids, which DDP rejects for CPU models); 2 processes x 1 image give the first-iteration losses of
    1 process x 2 images (--num-gpus 1 overriding the config's CPU_PROCESSES 2)."""
    single, _ = _first_loss(shapes_runner, tmp_path / "one", 1)
    double, _ = _first_loss(shapes_runner, tmp_path / "two", 2)
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "World size: 2" in log
    assert "training data-parallel in 2 CPU processes (gloo), images per process and step: 1" in log
    assert (tmp_path / "two" / "log.txt.rank1").exists()
    for key in ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key


def test_amp_and_syncbn_on_cpu_are_refused_clearly():
    from detectron2.config import get_cfg

    from metaspike_d2.backbone import MetaSpikeFormer
    from metaspike_d2.d2 import add_metaspike_config
    from metaspike_d2.d2 import engine

    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED = "cpu", True
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED"):
        engine.build_train_loop(cfg, nn.Linear(2, 2), [], torch.optim.SGD(nn.Linear(2, 2).parameters(), 0.1))
    cfg.SOLVER.AMP.ENABLED = False
    loop = engine.build_train_loop(cfg, nn.Linear(2, 2), [], torch.optim.SGD(nn.Linear(2, 2).parameters(), 0.1))
    assert type(loop) is engine.GuardedSimpleTrainer  # a SimpleTrainer that skips non-finite gradients
    model = nn.Sequential(MetaSpikeFormer(widths=(8, 16, 32, 64), num_heads=1))
    cfg.MODEL.METASPIKE.NORM = "SyncBN"
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    engine.apply_backbone_norm(cfg, model)  # one process: converted (it runs as BN until there is a group)
    assert n_bn > 0 and sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    old = engine.comm.get_world_size
    engine.comm.get_world_size = lambda: 2
    try:
        with pytest.raises(ValueError, match="SyncBN.*GPUs"):
            engine.apply_backbone_norm(cfg, nn.Sequential(MetaSpikeFormer(widths=(8, 16, 32, 64), num_heads=1)))
    finally:
        engine.comm.get_world_size = old
    cfg.MODEL.METASPIKE.NORM = "GN"
    with pytest.raises(ValueError, match="'BN' or 'SyncBN'"):
        engine.apply_backbone_norm(cfg, model)


# ------------------------------------------------------------------------------------------------
# 3. Non-finite losses


def _load_train_net():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_net_robust", ROOT / "tools/train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_cfg(train_net, *opts):
    from detectron2.config import get_cfg
    from metaspike_d2.d2 import add_metaspike_config
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(list(opts))
    return cfg


def test_d2_nan_loss_stops_with_iteration_and_keeps_last_good_checkpoint(shapes_runner, tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import get_event_storage

    from metaspike_d2.data.shapes import ShapesSplit, register_shapes_instances
    if "robust_shapes_train" not in DatasetCatalog.list():
        register_shapes_instances("robust_shapes_train", "train", ShapesSplit(8, (64, 64), seed=0), shapes_runner[1])
    train_net = _load_train_net()
    cfg = _tiny_cfg(train_net, *tiny_train_opts(tmp_path, 10, 2))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer._trainer.model
    forward = model.forward

    def poisoned(*args, **kwargs):  # a non-finite loss at iteration 5
        losses = forward(*args, **kwargs)
        if get_event_storage().iter == 5:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    model.forward = poisoned
    with pytest.raises(FloatingPointError, match="iteration=5"):
        trainer.train()
    assert not (tmp_path / "model_final.pth").exists()
    last = (tmp_path / "last_checkpoint").read_text().strip()
    assert last == "model_0000003.pth"  # iterations 1 and 3 were checkpointed (period 2); 5 never stepped
    saved = load_checkpoint_file(tmp_path / last)
    assert saved["iteration"] == 3 and all(torch.isfinite(v).all() for v in saved["model"].values()
                                           if v.is_floating_point())


def test_classification_nan_loss_stops_with_epoch_and_step():
    from classification.engine import train_one_epoch

    model = nn.Linear(4, 3)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(4)]
    calls = []

    def criterion(images, outputs, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * float("inf") if len(calls) == 3 else loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    import contextlib
    with pytest.raises(FloatingPointError, match="epoch 7 step 2"):
        train_one_epoch(model, criterion, loader, optimizer, None, scaler, torch.device("cpu"), 7,
                        autocast_ctx=contextlib.nullcontext)
    assert len(calls) == 3  # stopped at once, before the non-finite step updated anything


# ------------------------------------------------------------------------------------------------
# 4. Bad inputs


def _write_images(folder):
    """name -> (path, expected RGB value of pixel (0, 0)) for the modes users meet."""
    from PIL import Image
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    Image.fromarray(np.full((6, 8), 100, np.uint8), "L").save(folder / "gray.png")
    out["gray"] = (folder / "gray.png", (100, 100, 100))
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    out["rgba"] = (folder / "rgba.png", (200, 0, 0))
    pal = Image.fromarray(np.ones((6, 8), np.uint8), "P")
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(folder / "palette.png")
    out["palette"] = (folder / "palette.png", (10, 20, 30))
    Image.fromarray(np.full((6, 8), 65535, np.uint16)).save(folder / "deep16.png")  # 16-bit white
    out["deep16"] = (folder / "deep16.png", (255, 255, 255))
    Image.fromarray(np.full((6, 8), 32768, np.uint16)).save(folder / "mid16.png")
    out["mid16"] = (folder / "mid16.png", (128, 128, 128))
    return out


def test_read_image_converts_modes_to_3_channel_uint8(tmp_path):
    from detectron2.data.detection_utils import read_image as d2_read_image

    from metaspike_d2.data.image_io import read_image
    for name, (path, rgb) in _write_images(tmp_path).items():
        bgr = read_image(str(path), "BGR")
        assert bgr.shape == (6, 8, 3) and bgr.dtype == np.uint8, name
        assert tuple(int(v) for v in bgr[0, 0, ::-1]) == rgb, name
        assert tuple(int(v) for v in read_image(str(path), "RGB")[0, 0]) == rgb, name
    # Detectron2's own reader saturates a 16-bit image instead of scaling it
    assert tuple(d2_read_image(str(tmp_path / "mid16.png"), "RGB")[0, 0]) != (128, 128, 128)


def test_read_image_names_corrupt_truncated_and_missing_files(tmp_path):
    from metaspike_d2.data.image_io import ImageReadError, read_image
    path, _ = _write_images(tmp_path)["gray"]
    big = tmp_path / "big.png"
    from PIL import Image
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(big)
    (tmp_path / "truncated.png").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    for name in ("truncated.png", "garbage.jpg", "missing.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(str(tmp_path / name))


def _mapper_cfg(*opts):
    from detectron2.config import get_cfg
    from metaspike_d2.d2 import add_metaspike_config
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", 32, "INPUT.MIN_SIZE_TEST", 32,
                         "INPUT.MAX_SIZE_TEST", 32, *opts])
    return cfg


def test_mapper_skips_bad_training_images_only_when_configured(tmp_path, caplog):
    from detectron2.data import build_detection_train_loader

    from metaspike_d2.data.image_io import ImageReadError, RobustDatasetMapper
    images = _write_images(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    record = lambda p: {"file_name": str(p), "height": 6, "width": 8, "image_id": str(p), "annotations": []}  # noqa
    bad, good = record(tmp_path / "bad.png"), record(images["gray"][0])
    with pytest.raises(ImageReadError, match="bad.png"):
        RobustDatasetMapper(_mapper_cfg(), is_train=True)(bad)
    skipping = RobustDatasetMapper(_mapper_cfg("DATALOADER.SKIP_BAD_IMAGES", True), is_train=True)
    before = RobustDatasetMapper.num_skipped
    with caplog.at_level("WARNING"):
        assert skipping(bad) is None
    assert RobustDatasetMapper.num_skipped == before + 1 and "bad.png" in caplog.text
    assert skipping(good)["image"].shape[0] == 3
    with pytest.raises(ImageReadError, match="bad.png"):  # evaluation never skips
        RobustDatasetMapper(_mapper_cfg("DATALOADER.SKIP_BAD_IMAGES", True), is_train=False)(bad)
    # through Detectron2's loader: the bad record is replaced by another one
    cfg = _mapper_cfg("DATALOADER.SKIP_BAD_IMAGES", True, "SOLVER.IMS_PER_BATCH", 2,
                      "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False)
    loader = build_detection_train_loader(cfg, dataset=[bad, good], mapper=skipping, total_batch_size=2,
                                          num_workers=0, aspect_ratio_grouping=False)
    batch = next(iter(loader))
    assert [d["file_name"] for d in batch] == [good["file_name"]] * 2


def test_images_without_annotations_train(shapes_runner, tmp_path):
    """FILTER_EMPTY_ANNOTATIONS False keeps images without objects; they train (all proposals background)."""
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from metaspike_d2.data.image_io import RobustDatasetMapper
    from metaspike_d2.data.shapes import ShapesSplit, register_shapes_instances
    if "robust_shapes_train" not in DatasetCatalog.list():
        register_shapes_instances("robust_shapes_train", "train", ShapesSplit(8, (64, 64), seed=0), shapes_runner[1])
    record = dict(DatasetCatalog.get("robust_shapes_train")[0], annotations=[])
    cfg = _mapper_cfg("MODEL.RPN.POST_NMS_TOPK_TRAIN", 20, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
                      "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", 64)
    from detectron2.data.build import filter_images_with_only_crowd_annotations
    assert filter_images_with_only_crowd_annotations([record]) == []  # what the default (True) would do
    inputs = [RobustDatasetMapper(cfg, is_train=True)(record)]
    assert len(inputs[0]["instances"]) == 0
    from detectron2.utils.events import EventStorage
    model = build_model(cfg).train()
    with EventStorage(0):
        losses = model(inputs)
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0
    total.backward()


def test_unknown_config_key_names_the_key(tmp_path):
    train_net = _load_train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", QUICKSTART, "MODEL.METASPIKE.TIME_STEPS", "4", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises((KeyError, AssertionError), match="Non-existent key: MODEL.METASPIKE.TIME_STEPS"):
        train_net.setup(args)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {QUICKSTART}\nSOLVER:\n  MAX_ITERS: 5\n")
    args = train_net.default_argument_parser().parse_args(["--config-file", str(bad_yaml)])
    with pytest.raises(KeyError, match="SOLVER.MAX_ITERS"):
        train_net.setup(args)


def test_wrong_variant_checkpoint_lists_the_mismatched_keys(tmp_path):
    from detectron2.modeling import build_model

    from metaspike_d2.checkpoint import CheckpointError
    from metaspike_d2.backbone import MetaSpikeFormer
    from metaspike_d2.checkpoint import save_backbone_weights
    cfg = _mapper_cfg()
    model = build_model(cfg)
    other = MetaSpikeFormer(widths=(16, 32, 64, 128), num_heads=1)  # not the "tiny" widths
    path = tmp_path / "other_backbone.pth"
    save_backbone_weights(path, other.state_dict(), source="test")
    with pytest.raises(CheckpointError) as e:
        MetaSpikeCheckpointer(model).load(str(path))
    assert re.search(r"shape mismatches \(\d+\): \S+ checkpoint \(\d+, \d+, .*\) vs model \(", str(e.value))
    # a full detector checkpoint of another variant: Detectron2 would skip mismatched shapes with a warning
    full = tmp_path / "other_detector.pth"
    big = build_model(_mapper_cfg("MODEL.METASPIKE.VARIANT", "15m"))
    torch.save({"model": big.state_dict()}, full)
    with pytest.raises(CheckpointError) as e:
        MetaSpikeCheckpointer(model).load(str(full))
    assert str(full) in str(e.value) and "ALLOW_PARTIAL_WEIGHTS" in str(e.value)
    assert "shape mismatches" in str(e.value) and "backbone.bottom_up.stage" in str(e.value)
    partial = MetaSpikeCheckpointer(model, allow_partial=True)  # the explicit flag: Detectron2's skip-and-warn
    partial.load(str(full))


def test_time_steps_below_one_is_a_clear_error():
    from detectron2.modeling import build_model
    with pytest.raises(ValueError, match="T|time_steps"):
        build_model(_mapper_cfg("MODEL.METASPIKE.T", 0))


def test_image_sizes_not_divisible_by_32_are_padded():
    from detectron2.modeling import build_model
    cfg = _mapper_cfg()
    model = build_model(cfg).eval()
    assert model.backbone.size_divisibility == 32
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 70, 50), dtype=torch.uint8).float(), "height": 70,
                      "width": 50}])
    inst = out[0]["instances"]
    assert inst.image_size == (70, 50)
    if len(inst):
        assert inst.pred_masks.shape[-2:] == (70, 50)
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 2] <= 50).all() and (boxes[:, 3] <= 70).all()


def test_classification_sigkill_after_first_checkpoint_then_resume(tmp_path):
    """classification/train.py: SIGKILL once checkpoint-last.pth exists, then --resume auto ends at the same
    last epoch (its checkpoints go through save_atomic)."""
    from classification.data import make_synthetic_imagefolder
    synth, out, epochs = tmp_path / "synth", tmp_path / "out", 3
    make_synthetic_imagefolder(str(synth), train_per_class=2, val_per_class=1)
    cmd = [sys.executable, str(ROOT / "classification/train.py"), "--model", "metaspikeformer_tiny", "--data-path",
           "synthetic", "--synthetic-dir", str(synth), "--synthetic-per-class", "2", "1", "--input-size", "32",
           "--batch-size", "10", "--num-workers", "0", "--warmup-epochs", "0", "--blr", "1e-2", "--no-amp",
           "--epochs", str(epochs), "--output-dir", str(out)]
    kill_when_file_appears(cmd, out / "checkpoint-last.pth", tmp_path / "first.log", cwd=str(ROOT))
    killed_at = load_checkpoint_file(out / "checkpoint-last.pth")["epoch"]
    assert killed_at < epochs - 1
    resumed = subprocess.run([*cmd, "--resume", "auto"], env=_env(), capture_output=True, text=True, timeout=300,
                             cwd=str(ROOT))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"continuing at epoch {killed_at + 1}" in resumed.stdout + resumed.stderr
    assert load_checkpoint_file(out / "checkpoint-last.pth")["epoch"] == epochs - 1
    epochs_logged = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    # (the killed run may die between writing its checkpoint and its log line)
    assert epochs_logged[-1] == epochs - 1 and set(range(killed_at + 1, epochs)) <= set(epochs_logged)


def test_d2_resume_continues_the_sample_stream(shapes_runner, tmp_path):
    """After --resume the loader yields the samples an uninterrupted run would see next (not a restart)."""
    import itertools

    import numpy as np
    from detectron2.data import DatasetCatalog

    from metaspike_d2.data.shapes import ShapesSplit, register_shapes_instances
    if "robust_shapes_train" not in DatasetCatalog.list():
        register_shapes_instances("robust_shapes_train", "train", ShapesSplit(8, (64, 64), seed=0), shapes_runner[1])
    train_net = _load_train_net()
    cfg = _tiny_cfg(train_net, *tiny_train_opts(tmp_path, 10, 2), "SOLVER.IMS_PER_BATCH", "2",
                    "DATALOADER.NUM_WORKERS", "0", "INPUT.RANDOM_FLIP", "none")
    np.random.seed(0)  # Detectron2 seeds its TrainingSampler from numpy's global RNG
    first = train_net.Trainer(cfg)
    first.resume_or_load(resume=False)
    assert first.train_sampler.skip == 0
    first.iter = 4  # as if iterations 0..4 had run (the periodic checkpointer saves the trainer's state)
    first.checkpointer.save("model_0000004")

    resumed = train_net.Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5 and resumed.train_sampler.skip == 10  # 5 iterations x 2 images
    stream = list(itertools.islice(iter(resumed.train_sampler.sampler), 12))
    assert stream[10:12] != stream[:2], "pick another seed: positions 10-11 equal a restart's 0-1"
    names = [d["file_name"] for d in DatasetCatalog.get("robust_shapes_train")]
    batch = next(iter(resumed.data_loader))
    assert [d["file_name"] for d in batch] == [names[i] for i in stream[10:12]]
