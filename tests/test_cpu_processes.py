"""Data-parallel CPU training: CPU_PROCESSES, and one model for every process to checkpoint and evaluate."""
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import get_cfg
from torch import nn

from metaspike_d2.d2 import add_metaspike_config
from metaspike_d2.d2 import engine

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/quickstart/mask_rcnn_metaspike_tiny_shapes.yaml"


def _cfg(*opts):
    cfg = get_cfg()
    add_metaspike_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def test_num_processes_come_from_num_gpus_or_cpu_processes():
    assert engine.resolve_num_processes(_cfg("MODEL.DEVICE", "cpu"), None) == 1  # the default
    assert engine.resolve_num_processes(_cfg("MODEL.DEVICE", "cpu", "CPU_PROCESSES", 2), None) == 2
    assert engine.resolve_num_processes(_cfg("MODEL.DEVICE", "cpu", "CPU_PROCESSES", 2), 1) == 1  # --num-gpus wins
    assert engine.resolve_num_processes(_cfg("MODEL.DEVICE", "cuda", "CPU_PROCESSES", 2), None) == 1
    assert engine.resolve_num_processes(_cfg("MODEL.DEVICE", "cuda"), 8) == 8
    with pytest.raises(ValueError, match="CPU_PROCESSES must be >= 1, got 0"):
        engine.resolve_num_processes(_cfg("MODEL.DEVICE", "cpu", "CPU_PROCESSES", 0), None)
    with pytest.raises(ValueError, match="--num-gpus must be >= 1"):
        engine.resolve_num_processes(_cfg(), 0)


def test_quickstart_launches_two_processes_of_two_images():
    cfg = _cfg()
    cfg.merge_from_file(str(QUICKSTART))
    assert engine.resolve_num_processes(cfg, None) == 2
    assert cfg.SOLVER.IMS_PER_BATCH == 4 and cfg.CPU_THREADS == 1


def _bn_model(rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4))
    with torch.no_grad():
        for i, bn in enumerate((model[1], model[3])):
            bn.running_mean.fill_(rank + i)
            bn.running_var.fill_(1.0 + 3 * rank)
            bn.num_batches_tracked.fill_(5)
    return model


class _FakeTrainer:
    def __init__(self, max_iter, model=None):
        self.max_iter, self.model, self.iter = max_iter, model, 0


def _average_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _bn_model(rank)
        params = [p.detach().clone() for p in model.parameters()]
        hook = engine.AverageBuffersHook(0)
        hook.trainer = _FakeTrainer(3, nn.parallel.DistributedDataParallel(model, broadcast_buffers=False))
        hook.trainer.iter = 1  # not the last iteration, no eval period: nothing happens
        hook.after_step()
        before_last = {k: v.clone() for k, v in model.state_dict().items()}
        hook.trainer.iter = 2  # the last one
        hook.after_step()
        torch.save({"before_last": before_last, "state": model.state_dict(),
                    "params_same": all(torch.equal(a, b) for a, b in zip(params, model.parameters()))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_hook_makes_every_process_hold_the_mean_statistics_after_the_last_iteration(tmp_path):
    mp.start_processes(_average_worker, args=(2, tmp_path / "pg", str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert res["params_same"]
        for i, key in enumerate(("1", "3")):
            assert torch.equal(res["before_last"][f"{key}.running_mean"], torch.full((4,), float(rank + i)))
            assert torch.equal(res["state"][f"{key}.running_mean"], torch.full((4,), 0.5 + i))
            assert torch.equal(res["state"][f"{key}.running_var"], torch.full((4,), 2.5))
            assert res["state"][f"{key}.num_batches_tracked"].item() == 5
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key


def test_multi_process_cpu_run_is_logged_and_oversubscription_warned(monkeypatch):
    records = []  # a handler on the module's logger: tools/train_net.py's setup stops propagation above it
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    engine.logger.addHandler(handler)
    monkeypatch.setattr(engine.logger, "level", logging.INFO)
    messages = lambda: [r.getMessage() for r in records]  # noqa: E731
    cfg = _cfg("MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", 4)
    monkeypatch.setattr(engine.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine.torch, "get_num_threads", lambda: 1)
    try:
        monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0, 1})
        engine.log_cpu_processes(cfg)
        assert messages() == ["training data-parallel in 2 CPU processes (gloo), images per process and step: 2"]
        monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0})
        engine.log_cpu_processes(cfg)
        assert messages()[2].startswith("2 processes x 1 threads on 1 cores: the processes share cores")
        assert records[2].levelno == logging.WARNING
        monkeypatch.setattr(engine.comm, "get_world_size", lambda: 1)
        engine.log_cpu_processes(cfg)
        assert len(records) == 3  # one process: nothing to say
    finally:
        engine.logger.removeHandler(handler)


def test_train_net_leaves_the_process_count_to_the_config_and_picks_a_free_port():
    sys.path.insert(0, str(ROOT / "tools"))
    import train_net

    args = train_net.argument_parser().parse_args(["--config-file", str(QUICKSTART)])
    assert args.num_gpus is None and args.dist_url == "auto"
    args = train_net.argument_parser().parse_args(["--config-file", str(QUICKSTART), "--num-gpus", "1"])
    assert engine.resolve_num_processes(train_net.load_config(args), args.num_gpus) == 1


@pytest.mark.parametrize("period, expected", [(0, [9]), (4, [3, 7, 9]), (5, [4, 9])])
def test_average_buffers_hook_runs_before_each_evaluation_and_at_the_end(monkeypatch, period, expected):
    calls = []
    monkeypatch.setattr(engine, "distribute_bn", lambda model, world, reduce: calls.append(trainer.iter))
    hook = engine.AverageBuffersHook(period)
    trainer = hook.trainer = _FakeTrainer(10)
    for trainer.iter in range(10):
        hook.after_step()
    assert calls == expected


def test_trainer_places_the_hook_before_checkpointer_and_evaluation(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import train_net
    from detectron2.engine import hooks

    cfg = _cfg()
    cfg.merge_from_file(str(QUICKSTART))
    cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path)])
    trainer = train_net.Trainer.__new__(train_net.Trainer)
    trainer.cfg = cfg
    checkpointer = hooks.PeriodicCheckpointer.__new__(hooks.PeriodicCheckpointer)  # a placeholder of its type
    base = [hooks.IterationTimer(), hooks.LRScheduler(), checkpointer,
            hooks.EvalHook(0, lambda: None), hooks.PeriodicWriter([])]
    monkeypatch.setattr(train_net.DefaultTrainer, "build_hooks", lambda self: list(base))
    monkeypatch.setattr(train_net, "build_model_ema_hook", lambda cfg, trainer: hooks.CallbackHook())
    monkeypatch.setattr(train_net.comm, "get_world_size", lambda: 2)
    names = [type(h).__name__ for h in trainer.build_hooks()]
    assert names == ["IterationTimer", "LRScheduler", "CallbackHook", "AverageBuffersHook", "PeriodicCheckpointer",
                     "EvalHook", "PeriodicWriter"]
    base.pop(2)  # processes other than the main one have no checkpointer
    names = [type(h).__name__ for h in trainer.build_hooks()]
    assert names[2:5] == ["CallbackHook", "AverageBuffersHook", "EvalHook"]
    monkeypatch.setattr(train_net.comm, "get_world_size", lambda: 1)
    assert "AverageBuffersHook" not in [type(h).__name__ for h in trainer.build_hooks()]
