"""metaspike-d2: Meta-SpikeFormer (Spike-Driven Transformer V2) for Detectron2, timm and plain PyTorch.

Install everything (torch, detectron2 from PyPI alone, spikingjelly, ...) with ``bash tools/install.sh``;
this file only describes the package itself.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("metaspike_d2/__init__.py").read_text()).group(1)

setup(
    name="metaspike-d2",
    version=version,
    description="Spike-Driven Transformer V2 (Meta-SpikeFormer) for detection and segmentation in Detectron2",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["metaspike_d2", "metaspike_d2.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "spikingjelly==2.0.0",
        "timm>=1.0.11",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
        "numpy",
        "tqdm",
    ],
    # detectron2 is not on PyPI; tools/install.sh installs it (docs/install.md explains the route).
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        # ONNX export and the graph runtimes (tools/export_model.py, --backend onnxruntime|openvino)
        "deploy": ["onnx==1.23.2", "onnxruntime==1.32.0", "openvino==2026.4.1"],
    },
)
