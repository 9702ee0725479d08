#!/usr/bin/env bash
# Set up everything metaspike-d2 needs, from PyPI alone, in the active Python environment.
#
#   python3 -m venv .venv && . .venv/bin/activate && bash tools/install.sh
#
# Idempotent: a second run only checks and finishes quickly.
# Options (environment variables):
#   METASPIKE_D2_SOURCE=1   build detectron2 from its GitHub sources instead of the PyPI route
#                           (needs GitHub access and a compiler; gives the compiled detectron2._C ops).
set -euo pipefail

PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '[install] %s\n' "$*"; }

"$PY" - <<'PYEOF' || exit 1
import sys
if sys.version_info < (3, 11):
    sys.exit(f"[install] error: Python >= 3.11 is required (spikingjelly 2.x needs it); "
             f"this is {sys.version.split()[0]} at {sys.executable}")
if sys.prefix == sys.base_prefix and not __import__("os").environ.get("METASPIKE_D2_ALLOW_SYSTEM"):
    sys.exit("[install] error: no virtual environment is active. Create and activate one first:\n"
             "    python3 -m venv .venv && . .venv/bin/activate && bash tools/install.sh\n"
             "(set METASPIKE_D2_ALLOW_SYSTEM=1 to install into this interpreter anyway)")
PYEOF

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
say "site-packages: $SITE"

pip_install() { say "pip install $*"; "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# 1. torch / torchvision: a pinned pair known to work together (see docs/install.md).
pip_install "torch==2.14.1" "torchvision==0.29.1"

# 2. Detectron2's own dependencies (the wheel below is installed without them).
pip_install "setuptools<81" Pillow matplotlib pycocotools termcolor yacs tabulate cloudpickle tqdm \
    tensorboard "omegaconf>=2.1,<2.4" hydra-core packaging "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10"

# 3. detectron2 itself.
if "$PY" -c 'import detectron2, sys; sys.exit(0 if detectron2.__file__ else 1)' 2>/dev/null; then
    say "detectron2 already importable ($("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')): skipping"
elif [ "${METASPIKE_D2_SOURCE:-0}" = "1" ]; then
    say "building detectron2 from GitHub sources (METASPIKE_D2_SOURCE=1)"
    "$PY" -m pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
else
    # No official detectron2 exists on PyPI. sal-detectron2 0.7.2 carries detectron2's mid-2024 main-branch
    # Python sources plus a _C extension built for CPython 3.10, which we drop: everything this project uses
    # (RoIAlign, NMS) comes from torchvision, and COCO evaluation falls back to pycocotools.
    say "installing detectron2 (pure Python) from the PyPI republish sal-detectron2==0.7.2"
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.10 \
        --target "$SITE" --upgrade sal-detectron2==0.7.2
    rm -f "$SITE"/detectron2/_C*.so
    say "removed detectron2/_C*.so (built for CPython 3.10; pure-Python fallbacks are used)"
fi

# 4. The spiking and vision stack.
pip_install "spikingjelly==2.0.0" "timm>=1.0.11" opencv-python-headless
# scikit-learn: its bundled load_digits is the real small classification set of benchmarks/real_data.py
pip_install scikit-learn

# 5. This project, editable, with its test extras and the deploy extras (ONNX export, ONNX Runtime, OpenVINO;
#    pinned in setup.py).
pip_install --no-build-isolation -e "$ROOT[test,deploy]"

"$PY" - <<'PYEOF'
import torch, torchvision, spikingjelly, timm, detectron2, cv2, pycocotools, fvcore
import onnx, onnxruntime, openvino
import metaspike_d2
print("[install] ok: torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| timm", timm.__version__, "| detectron2", detectron2.__version__, "| opencv", cv2.__version__,
      "| onnxruntime", onnxruntime.__version__, "| openvino", openvino.__version__,
      "| metaspike_d2", metaspike_d2.__version__)
PYEOF
