"""benchmarks/gpu.py (the prepared GPU check): its CPU dry run of the cheap parts, and its refusal without CUDA."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_cpu_parts_a_and_b(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--dry-run-cpu", "--quick", "--parts", "a,b", "--output", str(out))
    # 1 = some check failed: the script still finishes, writes the JSON and prints the table
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== summary" in proc.stdout and "-- part a" in proc.stdout and "-- part b" in proc.stdout
    report = json.loads(out.read_text())
    assert {"meta", "parts", "wall_s", "output"} <= set(report)
    meta = report["meta"]
    assert meta["dry_run_cpu"] is True and meta["quick"] is True and meta["device"] == "cpu"
    assert {"torch", "spikingjelly", "python"} <= set(meta)
    assert set(report["parts"]) == {"a", "b"}
    for part in report["parts"].values():
        assert part["status"] in ("passed", "failed"), part.get("traceback")  # not "error": nothing raised
        assert part["checks"] and {"name", "passed", "value"} <= set(part["checks"][0])
        assert part["wall_s"] > 0

    a = report["parts"]["a"]
    names = [c["name"] for c in a["checks"]]
    for expected in ("classifier tiny T=1 fp32 forward+backward", "classifier tiny T=4 bf16 forward+backward",
                     "classifier tiny T=4 eval: T=1 features == step 0 of T=4", "classifier 15m T=1 fp32 forward+backward",
                     "mask_rcnn_metaspike_tiny_shapes train", "mask_rcnn_metaspike_tiny_shapes eval",
                     "semfpn_metaspike_tiny_shapes train", "semfpn_metaspike_tiny_shapes eval",
                     "SOLVER.AMP.ENABLED: refused on the CPU"):
        assert any(n.startswith(expected) or expected in n for n in names), (expected, names)
    assert all(c["passed"] is not False for c in a["checks"]), [c for c in a["checks"] if c["passed"] is False]

    b = report["parts"]["b"]
    env = b["sj_lif_env"]
    assert env["env_var"] == "SJ_LIF_CUDA_IMPLEMENTATION" and env["exists"] is True
    assert set(env["choices"]) == {"auto", "cuda", "triton", "torch"}
    assert b["workers"], "no SJ_LIF_CUDA_IMPLEMENTATION worker process ran"
    rows = b["this_process"]["rows"] + [r for w in b["workers"].values() for r in w.get("rows", [])]
    keys = {"T", "v_threshold", "dtype", "inference_vs_lif_inference_cpu", "inference_vs_LIFSurrogateCPU",
            "train_spikes_vs_LIFSurrogateCPU", "grad_rel_diff", "passed"}
    assert rows and all(keys <= set(r) for r in rows)
    assert {(r["T"], r["dtype"]) for r in rows} == {(1, "float32"), (4, "float32"), (1, "bfloat16"), (4, "bfloat16")}
    # fp32: the CPU kernels give spikingjelly's exact spikes and its gradients to rounding
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["passed"] for r in fp32), [r for r in fp32 if not r["passed"]]


def test_without_cuda_it_exits_2_with_the_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no CUDA device, also on a GPU machine
    out = tmp_path / "gpu.json"
    proc = _run("--quick", "--parts", "a", "--output", str(out), env=env, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device: this script checks the GPU path; run it on a GPU machine" in proc.stderr
    assert not out.exists()
