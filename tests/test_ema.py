"""MODEL_EMA: the weight average's recurrence, its checkpointing and the final swap (metaspike_d2/d2/ema.py)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from metaspike_d2.checkpoint import load_checkpoint_file
from metaspike_d2.d2.ema import ModelEMAHook
from tests.test_robustness import _load_train_net, _tiny_cfg, shapes_runner, tiny_train_opts  # noqa: F401


def test_ema_follows_the_documented_recurrence_and_replaces_the_weights_at_the_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    hook = ModelEMAHook(model, decay=0.6)
    hook.trainer = SimpleNamespace(iter=0, max_iter=5)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    history = []
    for i in range(5):
        with torch.no_grad():  # a "training step": new weights and BN statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(1)  # an integer buffer: copied, not averaged
        current = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        history.append(current)
        decay = min(0.6, 1 - (1 + i) ** -0.75)  # MODEL_EMA.DECAY's documented schedule (0 at the first step)
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}
        hook.trainer.iter = i
        hook.after_step()
        if i < 4:  # the training weights are untouched until the last step
            assert all(torch.equal(model.state_dict()[k], current[k]) for k in current)
        for k in expected:
            torch.testing.assert_close(hook.ema.module.state_dict()[k], expected[k])
        assert hook.ema.module[1].num_batches_tracked.item() == i + 1
    assert decay == 0.6  # the cap was reached
    # after the last step the model holds the average, not its last weights
    for k in expected:
        torch.testing.assert_close(model.state_dict()[k], expected[k])
    assert not torch.allclose(model[0].weight, history[-1]["0.weight"])


def test_ema_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        ModelEMAHook(nn.Linear(2, 2), decay=1.0)


def test_trainer_checkpoints_the_ema_resumes_it_and_saves_it_as_the_final_model(shapes_runner, tmp_path):
    from detectron2.data import DatasetCatalog

    from metaspike_d2.data.shapes import ShapesSplit, register_shapes_instances
    if "robust_shapes_train" not in DatasetCatalog.list():
        register_shapes_instances("robust_shapes_train", "train", ShapesSplit(8, (64, 64), seed=0), shapes_runner[1])
    train_net = _load_train_net()
    opts = [*tiny_train_opts(tmp_path, 4, 2), "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9"]
    trainer = train_net.Trainer(_tiny_cfg(train_net, *opts))
    trainer.resume_or_load(resume=False)
    trainer.train()

    mid = load_checkpoint_file(tmp_path / "model_0000001.pth")  # after iterations 0 and 1
    assert mid["model"].keys() == mid["model_ema"].keys()
    assert any(not torch.equal(mid["model"][k], mid["model_ema"][k]) for k in mid["model"]
               if mid["model"][k].is_floating_point())
    final = load_checkpoint_file(tmp_path / "model_final.pth")
    assert all(torch.equal(final["model"][k], final["model_ema"][k]) for k in final["model"])

    # --resume from the middle checkpoint restores the average as well as the training weights
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    resumed = train_net.Trainer(_tiny_cfg(train_net, *opts))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    ema = [h for h in resumed._hooks if type(h).__name__ == "ModelEMAHook"][0].ema.module.state_dict()
    assert all(torch.equal(ema[k], mid["model_ema"][k]) for k in ema)


def test_ema_is_off_by_default_and_when_disabled(shapes_runner, tmp_path):
    from detectron2.config import get_cfg

    from metaspike_d2.d2 import add_metaspike_config
    cfg = get_cfg()
    add_metaspike_config(cfg)
    assert cfg.MODEL_EMA.ENABLED is False
    train_net = _load_train_net()  # the quickstart enables it; switched off here
    trainer = train_net.Trainer(_tiny_cfg(train_net, *tiny_train_opts(tmp_path, 1, 100), "MODEL_EMA.ENABLED", "False"))
    assert not any(type(h).__name__ == "ModelEMAHook" for h in trainer._hooks)
    assert "model_ema" not in trainer.checkpointer.checkpointables
