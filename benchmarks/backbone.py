"""Backbone inference latency and peak memory per Meta-SpikeFormer variant (CPU). Not a test.

    python benchmarks/backbone.py OUT.json [--variants tiny 15m 55m] [--time-steps 1 4] [--size 224]
                                  [--reps 5] [--threads 2]

For every variant and T: the forward of ``MetaSpikeFormer`` (classification layout, stage-4 stride 16)
on one ``size x size`` image, batch 1, eval mode under ``torch.inference_mode``. Each configuration is
warmed up once, then run ``--reps`` times; reported are the median wall time, the median process CPU
time (all threads; less disturbed by other processes on a shared machine than wall time) and the peak
resident-memory increase during one forward (``VmHWM`` after a reset through ``/proc/self/clear_refs``,
minus the resident size before; Linux only, else ``null``). Repetitions of the configurations being
compared are interleaved (round-robin), so a change in machine load hits all of them alike.

The helpers here (``measure_interleaved``, ``machine_info``) are shared with ``benchmarks/run.py``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

# Run from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fix_malloc() -> None:
    """Make glibc hand large blocks back to the OS at once, so that peak RSS measures each forward's own
    peak instead of memory the allocator kept from an earlier forward (M_MMAP_THRESHOLD = -3, fixed
    thresholds also switch off glibc's dynamic threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


_fix_malloc()


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_increase_mib(fn: Callable[[], object]) -> Optional[float]:
    """Run ``fn`` once; return the peak resident-memory increase above the level before it (MiB)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError:
        fn()
        return None
    before = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return round((peak - before) / 1024.0, 1)


def measure_interleaved(cases: Dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1,
                        memory: bool = True) -> Dict[str, Dict[str, object]]:
    """Time several callables round-robin. Returns per case: median/min wall seconds, median process CPU
    seconds, all wall times and the peak RSS increase of one extra call (MiB)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    wall: Dict[str, List[float]] = {k: [] for k in cases}
    cpu: Dict[str, List[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for key, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[key].append(t1 - t0)
            cpu[key].append(c1 - c0)
    out = {}
    for key, fn in cases.items():
        out[key] = {
            "median_s": statistics.median(wall[key]),
            "min_s": min(wall[key]),
            "median_cpu_s": statistics.median(cpu[key]),
            "wall_s": [round(t, 4) for t in wall[key]],
            "peak_mem_mib": peak_rss_increase_mib(fn) if memory else None,
        }
    return out


def machine_info() -> Dict[str, object]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    uptime = None
    try:
        import subprocess

        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "uptime": uptime,
        "loadavg": load,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def forward_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--variants", nargs="+", default=["tiny", "15m", "31m", "55m", "123m"])
    parser.add_argument("--time-steps", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from metaspike_d2 import VARIANTS, MetaSpikeFormer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info()
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    for variant in args.variants:
        model = MetaSpikeFormer(variant=variant).eval()
        params = sum(p.numel() for p in model.parameters())
        cases = {}
        for t in args.time_steps:
            m = MetaSpikeFormer(variant=variant, time_steps=t).eval()
            m.load_state_dict(model.state_dict())
            cases[f"T={t}"] = forward_fn(m, x)
        res = measure_interleaved(cases, reps=args.reps)
        for t in args.time_steps:
            r = res[f"T={t}"]
            rows.append({"variant": variant, "widths": list(VARIANTS[variant].widths), "params": params,
                         "T": t, **r})
        del model, cases
        gc.collect()
    print(f"# backbone forward, batch 1, {args.size}x{args.size}, CPU, {args.threads} threads; {info['uptime']}")
    print(f"{'variant':>8} {'params':>8} {'T':>2} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['variant']:>8} {r['params'] / 1e6:7.1f}M {r['T']:>2} {r['median_s'] * 1e3:10.1f} "
              f"{r['min_s'] * 1e3:8.1f} {r['median_cpu_s'] * 1e3:8.1f} {r['peak_mem_mib'] if r['peak_mem_mib'] is not None else '-':>9}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": info, "size": args.size, "batch": 1, "reps": args.reps, "rows": rows,
                   "machine_after": machine_info()}, f, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
