#!/usr/bin/env bash
# Set up and run benchmarks/gpu.py on the device machine (one H200, no network, its own python3 with torch,
# torchvision, triton, cupy-cuda13x, numpy, opencv, matplotlib, tensorboard, ... already installed).
#
#   bash benchmarks/gpu_setup.sh download   # HERE, where PyPI is reachable: the missing packages as wheels in .whl/
#   bash benchmarks/gpu_setup.sh run [ARGS] # THERE, as the device command: install .whl/, run gpu.py ARGS
#   bash benchmarks/gpu_setup.sh install    # THERE: install only (then: export PYTHONPATH=/tmp/site:$PWD)
#
# The device command (the run tool), with the whole check inside its 10-minute limit:
#   command "bash benchmarks/gpu_setup.sh run", carry [".whl"], timeout_s 600
# It leaves $OUT/gpu.json (every figure) and $OUT/gpu.log (the output, with the table at the end).
#
# .whl/ is ignored by git (.gitignore: /.whl/) and only travels because the run names it in carry (about 12 MB of
# the 64 MiB the working tree may have). Wheels in .whl/ itself are installed with pip into /tmp/site; .whl/d2
# holds the detectron2 republish (tagged for CPython 3.10, unpacked without its compiled _C, as tools/install.sh
# does); .whl/timm a timm used only if the machine's is older than 1.0.11; .whl/legacy the original's
# spikingjelly 0.0.0.0.14, which gpu.py's part e unpacks and puts first on the path of its own subprocess.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SITE=${METASPIKE_GPU_SITE:-/tmp/site}
say() { printf '[gpu_setup] %s\n' "$*"; }

download() {
    local py=${PYTHON:-python3}
    # the device runs CPython 3.12 on x86-64 (/work/.library/device/README.md: pip matches manylinux_2_N exactly)
    local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    mkdir -p .whl/d2 .whl/timm .whl/legacy
    # what detectron2, metaspike_d2 and spikingjelly import and the device lacks (one version of each)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d .whl spikingjelly==2.0.0 loguru==0.7.3 iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 pycocotools==2.0.11 \
        omegaconf==2.3.1
    # published as source only: built here into pure-Python wheels
    "$py" -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d .whl/d2 sal-detectron2==0.7.2
    "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl/timm timm==1.0.31
    "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl/legacy spikingjelly==0.0.0.0.14
    grep -qxF '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
    say "wheels in .whl/ ($(du -sh .whl | cut -f1)):"
    find .whl -type f -name '*.whl' | sort
}

install() {
    [ -d .whl ] || { say "error: no .whl/ here: run 'bash benchmarks/gpu_setup.sh download' where PyPI is reachable and carry .whl"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    python3 - "$SITE" .whl/d2/*.whl <<'PYEOF'
import glob, os, sys, zipfile
site, wheel = sys.argv[1], sys.argv[2]
zipfile.ZipFile(wheel).extractall(site)  # a py3.10-tagged pure-Python republish: pip refuses the tag on 3.12
for so in glob.glob(os.path.join(site, "detectron2", "_C*.so")):
    os.remove(so)  # built for CPython 3.10; torchvision's ops and pycocotools are used instead
PYEOF
    if ! python3 -c 'import sys, timm; v = tuple(int(x) for x in timm.__version__.split(".")[:3]); sys.exit(v < (1, 0, 11))' 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/timm/*.whl
    fi
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    python3 - <<'PYEOF'
import torch, torchvision, triton, timm, detectron2, spikingjelly, pycocotools, fvcore, cv2
import metaspike_d2, metaspike_d2.d2
from importlib.metadata import version
print("[gpu_setup] ok: python", __import__("platform").python_version(), "| torch", torch.__version__,
      "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "| torchvision", torchvision.__version__, "| triton", triton.__version__, "| timm", timm.__version__,
      "| detectron2", detectron2.__version__, "| spikingjelly", version("spikingjelly"), spikingjelly.__file__)
try:
    import cupy
    print("[gpu_setup] cupy", cupy.__version__)
except Exception as e:
    print("[gpu_setup] cupy not importable:", e)
PYEOF
}

run() {
    install  # (exports PYTHONPATH=/tmp/site:$ROOT)
    export PYTHONUNBUFFERED=1
    local out=${OUT:-$ROOT/benchmarks/results}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
    set +e
    python3 benchmarks/gpu.py --output "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
    local rc=${PIPESTATUS[0]}
    set -e
    say "gpu.py exited $rc; $out/gpu.json, $out/gpu.log"
    return "$rc"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    download) download ;;
    install) install ;;
    run) run "$@" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
