"""Gradient norm per backbone stage at initialization and after N training steps, from scratch.

    python benchmarks/grad_norms.py --output benchmarks/results/grad_norms.json \
        [--variants tiny 15m] [--sizes 32 64 224] [--steps 100] [--batch-size 16] [--threads 2]

For each variant and input size, two models with the same initial weights are trained side by side:

``original``  the original's neuron settings: SDSA output-projection BatchNorms at eps 1e-5, LIF threshold 1.0
              (what a converted BICLab checkpoint selects);
``default``   this project's model as ``timm.create_model`` builds it (eps 0.1, threshold 0.5, see
              :data:`metaspike_d2.backbone.NEURON_SETTINGS`).

Data: the built-in synthetic 10-class shapes (classification/data.py), drawn at the input size, no
augmentation. Optimizer: AdamW at 1e-3, weight decay 0.05 (the small-data recipe's optimizer). Reported per
stage (stem, stage1..4, head): the L2 norm of the gradient at step 0 and at step N (a non-finite norm is
printed as inf/nan: that step could not train), the attention neurons' mean firing rate, the training
loss at step N, and the eval-mode accuracy on a held-out batch at step N (the train/eval gap that a
near-zero running variance opens). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

import metaspike_d2  # noqa: E402,F401
from classification.data import SYNTHETIC_CLASSES, _draw_sample  # noqa: E402
from metaspike_d2.backbone import ORIGINAL_V_THRESHOLD, MetaSpikeFormer  # noqa: E402
from metaspike_d2.blocks import ORIGINAL_PROJ_BN_EPS, SpikeDrivenSelfAttention  # noqa: E402

STAGES = ("stem", "stage1", "stage2", "stage3", "stage4", "head")


def synthetic_batch(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SYNTHETIC_CLASSES), size=n)
    mean, std = np.array(IMAGENET_DEFAULT_MEAN), np.array(IMAGENET_DEFAULT_STD)
    imgs = [(np.asarray(_draw_sample(int(y), rng, size), dtype=np.float32) / 255 - mean) / std for y in labels]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float(), torch.from_numpy(labels)


def set_original_settings(model: torch.nn.Module) -> None:
    """The original's neuron settings, through the buffers a converted checkpoint sets."""
    for m in model.modules():
        if isinstance(m, MetaSpikeFormer):
            m.attn_proj_bn_eps.fill_(ORIGINAL_PROJ_BN_EPS)
            m.v_threshold.fill_(ORIGINAL_V_THRESHOLD)
            m.apply_neuron_settings()


def stage_norms(model) -> dict:
    out = {}
    for stage in STAGES:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(stage) and p.grad is not None]
        out[stage] = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    return out


def attention_rate(model, x) -> float:
    rates = []
    hooks = [m.attn_lif.register_forward_hook(lambda _m, _i, o: rates.append(o.float().mean().item()))
             for m in model.modules() if isinstance(m, SpikeDrivenSelfAttention)]
    with torch.no_grad():
        model.train()(x)
    for h in hooks:
        h.remove()
    return float(np.mean(rates))


def run_case(variant: str, size: int, args) -> list:
    torch.manual_seed(args.seed)
    base = timm.create_model(f"metaspikeformer_{variant}", num_classes=len(SYNTHETIC_CLASSES))
    models = {"original": copy.deepcopy(base), "default": base}
    set_original_settings(models["original"])
    x_val, y_val = synthetic_batch(64, size, seed=10_000)
    rows = []
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        start, norms0, loss = time.time(), None, float("nan")
        for step in range(args.steps + 1):
            x, y = synthetic_batch(args.batch_size, size, seed=step)
            model.train()
            loss_t = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            norms = stage_norms(model)
            if step == 0:
                norms0 = norms
            loss = loss_t.item()
            if step < args.steps:
                total = math.sqrt(sum(v * v for v in norms.values()))
                if math.isfinite(total):  # a non-finite step is skipped, as the training scripts do
                    opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_val).argmax(1) == y_val).float().mean().item() * 100
        rows.append({"variant": variant, "size": size, "model": name, "grad_norm_init": norms0,
                     f"grad_norm_step{args.steps}": norms, "loss": loss, "eval_acc": acc,
                     "attn_rate": attention_rate(model, x_val[:16]), "seconds": time.time() - start})
        print(_format(rows[-1], args.steps), flush=True)
    return rows


def _format(r: dict, steps: int) -> str:
    fmt = lambda d: " ".join(f"{k}={v:.2g}" for k, v in d.items())  # noqa: E731
    return (f"{r['variant']:>5} {r['size']:>3}px {r['model']:>8} | init: {fmt(r['grad_norm_init'])}\n"
            f"{'':19}| step {steps}: {fmt(r[f'grad_norm_step{steps}'])} | loss {r['loss']:.3f} "
            f"eval acc {r['eval_acc']:.1f}% attn rate {r['attn_rate']:.3f} ({r['seconds']:.0f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["tiny", "15m"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 224])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmarks/results/grad_norms.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        for size in args.sizes:
            rows += run_case(variant, size, args)
            # after every case, so that an interrupted run keeps what it measured
            Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
