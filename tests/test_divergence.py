"""Divergence is loud: steps with non-finite gradients are skipped, and most steps skipped stop training with
TrainingDivergedError (classification/engine.py, classification/train.py, metaspike_d2/d2/engine.py)."""
import contextlib
import logging
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from classification.engine import LossTrendMonitor, train_one_epoch  # noqa: E402
from metaspike_d2.divergence import TROUBLESHOOTING, TrainingDivergedError, describe_bad_gradients  # noqa: E402

INF = float("inf")


def tiny_model():
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 3)))


def poison_grad(param, bad_calls):
    """Replace ``param``'s gradient by inf on the backward passes whose index (from 0) is in ``bad_calls``
    (``None``: every one). The loss stays finite."""
    calls = []

    def hook(grad):
        calls.append(1)
        return torch.full_like(grad, INF) if bad_calls is None or len(calls) - 1 in bad_calls else grad

    param.register_hook(hook)
    return calls


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class RecordingScheduler:
    """timm-style ``step_update``; keeps the weights after every (done or skipped) update."""

    def __init__(self, model):
        self.model, self.updates, self.weights = model, [], []

    def step_update(self, num_updates):
        self.updates.append(num_updates)
        self.weights.append(snapshot(self.model))


def classify(model, n_steps, epoch=0, scheduler=None, **kwargs):
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(n_steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = lambda images, outputs, targets: nn.functional.cross_entropy(outputs, targets)  # noqa: E731
    return train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, torch.device("cpu"), epoch,
                           autocast_ctx=contextlib.nullcontext, **kwargs)


# ------------------------------------------------------------------------------------------------
# (a) classification/engine.py


def test_classification_all_steps_nonfinite_raises_naming_parameter_and_count(caplog):
    model = tiny_model()
    poison_grad(model.fc2.weight, None)
    before = snapshot(model)
    scheduler = RecordingScheduler(model)
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingDivergedError) as err:
        classify(model, 4, epoch=3, scheduler=scheduler)
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert "4 of 4 optimizer steps in epoch 3 were skipped" in msg
    assert "'fc2.weight'" in msg and "fc1" not in msg  # the first parameter (fc1's gradient is finite)
    for remedy in ("learning rate", "--clip-grad", "input normalization", TROUBLESHOOTING):
        assert remedy in msg, remedy
    assert (err.value.skipped, err.value.total, err.value.first_param) == (4, 4, "fc2.weight")
    assert same(before, snapshot(model)), "a skipped step updated the weights"
    assert scheduler.updates == [13, 14, 15, 16]  # epoch 3 x 4 updates: stepped on every skipped update too
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fc2.weight" in warnings[0] and "skipped" in warnings[0]


def test_classification_minority_of_bad_steps_trains_on_and_reports_the_count(caplog):
    model = tiny_model()
    poison_grad(model.fc2.weight, {1})
    before = snapshot(model)
    scheduler = RecordingScheduler(model)
    with caplog.at_level(logging.WARNING):
        stats = classify(model, 4, scheduler=scheduler)
    assert stats["nonfinite_grad_steps"] == 1 and stats["optimizer_steps"] == 4
    assert scheduler.updates == [1, 2, 3, 4]
    w = scheduler.weights
    assert not same(before, w[0])  # step 0 trained
    assert same(w[0], w[1])  # step 1 (inf gradient) did not update anything
    assert not same(w[1], w[2]) and not same(w[2], w[3])
    assert all(torch.isfinite(v).all() for v in snapshot(model).values())
    assert any("fc2.weight" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_classification_exactly_half_does_not_stop_more_than_half_does():
    model = tiny_model()
    poison_grad(model.fc2.weight, {0, 2})
    assert classify(model, 4)["nonfinite_grad_steps"] == 2  # 2 of 4: not more than half
    model = tiny_model()
    poison_grad(model.fc1.bias, {0, 2, 3})
    with pytest.raises(TrainingDivergedError, match=r"3 of 4 optimizer steps .*'fc1\.bias'"):
        classify(model, 4)


def test_overflowing_norm_of_finite_gradients_names_the_largest():
    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.fc1.weight.grad[0, 0] = 3e38
    model.fc2.bias.grad[0] = 2e38
    first, desc = describe_bad_gradients(model)
    assert first is None and "overflowed" in desc and "'fc1.weight'" in desc


def test_loss_trend_monitor_warns_once_after_three_epochs():
    mon = LossTrendMonitor()
    assert mon.update(2.30) is None and mon.update(2.31) is None  # fewer than 3 epochs: never
    msg = mon.update(2.27)  # -1.3%: not 2% below
    assert msg and "has not fallen in 3 epochs (2.3000 -> 2.2700)" in msg and "classification/README.md" in msg
    assert mon.update(2.40) is None  # once only
    falling = LossTrendMonitor()
    assert [falling.update(v) for v in (2.3, 2.4, 2.25, 1.0)] == [None] * 4  # 2.25 <= 0.98 x 2.3


# ------------------------------------------------------------------------------------------------
# (b) a real classification/train.py run


def test_classification_script_exits_nonzero_and_leaves_no_checkpoint(tmp_path):
    from classification.data import make_synthetic_imagefolder
    synth, out = tmp_path / "synth", tmp_path / "out"
    make_synthetic_imagefolder(str(synth), train_per_class=2, val_per_class=1)
    # lr 1e30: step 0 is healthy, its update makes the weights ~1e30 and every later gradient inf
    # (the loss stays finite: the spiking activations are bounded); 20 images / batch 4 = 5 steps
    cmd = [sys.executable, str(ROOT / "classification/train.py"), "--model", "metaspikeformer_tiny", "--data-path",
           "synthetic", "--synthetic-dir", str(synth), "--synthetic-per-class", "2", "1", "--input-size", "32",
           "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0", "--no-tensorboard",
           "--no-amp", "--device", "cpu", "--opt", "sgd", "--lr", "1e30", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert "TrainingDivergedError: training diverged: " in err, err[-3000:]
    assert "of 5 optimizer steps in epoch 0 were skipped" in err
    assert "the first parameter with a non-finite gradient was '" in err or "overflowed" in err
    for remedy in ("learning rate", "--clip-grad", "input normalization", TROUBLESHOOTING):
        assert remedy in err, remedy
    # it stopped before the epoch's checkpoint: no checkpoint (and no half-written temporary) is left
    assert not [p.name for p in out.iterdir() if p.name.endswith((".pth", ".tmp")) or ".pth." in p.name]
    assert not (out / "log.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# (c) the Detectron2 training loop


class TinyDetector(nn.Module):
    """What SimpleTrainer needs: model(data) -> dict of losses."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, data):
        x, y = data
        return {"loss_a": ((self.fc2(torch.relu(self.fc1(x))) - y) ** 2).mean(), "loss_b": self.fc1.bias.sum() * 0}


def d2_loop(model, n, **kwargs):
    from detectron2.config import get_cfg

    from metaspike_d2.d2.engine import build_train_loop
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)) for _ in range(n)]
    cfg = get_cfg()
    assert not cfg.SOLVER.AMP.ENABLED
    return build_train_loop(cfg, model, data, torch.optim.SGD(model.parameters(), lr=0.05), **kwargs)


def weights_after_each_step(trainer):
    from detectron2.engine import HookBase

    class Record(HookBase):
        def __init__(self):
            self.weights = []

        def after_step(self):
            self.weights.append(snapshot(self.trainer.model))

    hook = Record()
    trainer.register_hooks([hook])
    return hook.weights


def test_d2_loop_raises_after_20_consecutive_skipped_iterations():
    from detectron2.engine import SimpleTrainer
    model = TinyDetector()
    calls = poison_grad(model.fc2.weight, None)
    before = snapshot(model)
    trainer = d2_loop(model, 100)
    assert isinstance(trainer, SimpleTrainer) and trainer.max_consecutive_skips == 20
    # the logger the trainer's step really uses (tools/train_net.py's setup_logger stops propagation to the root)
    engine_logger = type(trainer).run_step.__globals__["logger"]
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    engine_logger.addHandler(handler)
    try:
        with pytest.raises(TrainingDivergedError) as err:
            trainer.train(0, 100)
    finally:
        engine_logger.removeHandler(handler)
    assert len(calls) == 20 and trainer.iter == 19  # exactly 20 iterations, then it stopped
    msg = str(err.value)
    assert "non-finite (inf/NaN) in 20 iterations in a row (iterations 0-19; 20 skipped iterations in total)" in msg
    assert "'fc2.weight'" in msg and err.value.first_param == "fc2.weight"
    for remedy in ("SOLVER.BASE_LR", "SOLVER.CLIP_GRADIENTS", "MODEL.PIXEL_MEAN", TROUBLESHOOTING):
        assert remedy in msg, remedy
    assert same(before, snapshot(model)), "a skipped iteration updated the weights"
    assert trainer.storage.history("skipped_steps").latest() == 20
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "iteration 0" in warnings[0] and "fc2.weight" in warnings[0]


def test_d2_loop_one_bad_iteration_trains_on_and_records_skipped_steps():
    model = TinyDetector()
    poison_grad(model.fc1.weight, {3})
    before = snapshot(model)
    trainer = d2_loop(model, 8)
    weights = weights_after_each_step(trainer)
    trainer.train(0, 8)
    assert trainer.iter == 8 and trainer.skipped_steps == 1
    assert same(weights[2], weights[3])  # iteration 3 skipped the optimizer step
    assert not same(before, weights[0]) and not same(weights[3], weights[4])
    history = trainer.storage.history("skipped_steps").values()
    assert [v for v, _ in history] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in snapshot(model).values())


def test_d2_loop_counts_consecutive_skips_only_and_takes_the_limit_as_argument():
    model = TinyDetector()
    poison_grad(model.fc2.bias, set(range(0, 30)) - {10, 20})  # runs of 10, 9, 9 bad iterations
    trainer = d2_loop(model, 30, max_consecutive_skips=10)
    assert trainer.max_consecutive_skips == 10
    with pytest.raises(TrainingDivergedError, match=r"10 iterations in a row \(iterations 0-9; 10 skipped"):
        trainer.train(0, 30)
    model = TinyDetector()
    poison_grad(model.fc2.bias, set(range(0, 30)) - {10, 20})
    trainer = d2_loop(model, 30, max_consecutive_skips=11)
    trainer.train(0, 30)  # never 11 in a row
    assert trainer.skipped_steps == 28


def test_d2_loop_nonfinite_loss_is_still_detectron2s_floating_point_error():
    model = TinyDetector()
    forward = model.forward
    model.forward = lambda data: {k: v * float("nan") for k, v in forward(data).items()}
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="iteration=0"):
        d2_loop(model, 3).train(0, 3)
    assert same(before, snapshot(model))


def test_d2_amp_trainer_logic_on_cpu_with_a_cpu_grad_scaler(monkeypatch):
    """GuardedAMPTrainer's counting without a GPU: a CPU GradScaler, and CUDA pretended (AMPTrainer asserts it;
    autocast("cuda") leaves CPU tensors alone)."""
    from metaspike_d2.d2.engine import GuardedAMPTrainer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def loop(model, n):
        data = [(torch.randn(3, 4), torch.randn(3, 2)) for _ in range(n)]
        return GuardedAMPTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.05),
                                 grad_scaler=torch.amp.GradScaler("cpu"))

    model = TinyDetector()
    poison_grad(model.fc2.weight, {2})
    trainer = loop(model, 6)
    trainer.train(0, 6)
    assert trainer.skipped_steps == 1 and trainer.grad_scaler.get_scale() == 2.0 ** 15  # backed off once
    assert [v for v, _ in trainer.storage.history("skipped_steps").values()] == [0, 0, 1, 1, 1, 1]

    model = TinyDetector()
    poison_grad(model.fc2.weight, None)
    before = snapshot(model)
    trainer = loop(model, 50)
    with pytest.raises(TrainingDivergedError, match=r"20 iterations in a row.*GradScaler.*'fc2\.weight'"):
        trainer.train(0, 50)
    assert trainer.iter == 19 and same(before, snapshot(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMPTrainer needs CUDA")
def test_d2_amp_loop_counts_grad_scaler_skips_and_stops():
    from detectron2.config import get_cfg

    from metaspike_d2.d2.engine import GuardedAMPTrainer, build_train_loop
    cfg = get_cfg()
    cfg.SOLVER.AMP.ENABLED = True

    def loop(model, n):
        data = [(torch.randn(3, 4, device="cuda"), torch.randn(3, 2, device="cuda")) for _ in range(n)]
        return build_train_loop(cfg, model, data, torch.optim.SGD(model.parameters(), lr=0.05))

    model = TinyDetector().cuda()
    poison_grad(model.fc2.weight, {2})
    trainer = loop(model, 6)
    assert isinstance(trainer, GuardedAMPTrainer)
    trainer.train(0, 6)
    assert trainer.skipped_steps == 1 and trainer.storage.history("skipped_steps").latest() == 1

    model = TinyDetector().cuda()
    poison_grad(model.fc2.weight, None)
    before = snapshot(model)
    trainer = loop(model, 50)
    with pytest.raises(TrainingDivergedError, match=r"20 iterations in a row.*'fc2\.weight'") as err:
        trainer.train(0, 50)
    assert trainer.iter == 19 and "GradScaler" in str(err.value)
    assert same(before, snapshot(model))
