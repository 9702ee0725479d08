"""Run an exported graph (:mod:`metaspike_d2.export`) on ONNX Runtime or OpenVINO, on the CPU.

:class:`GraphSession` is the one interface: ``session(*arrays) -> list of arrays``, the graph's
``metaspike.*`` metadata in :attr:`GraphSession.metadata`. OpenVINO is asked for float32 inference
(``INFERENCE_PRECISION_HINT f32``) and for ONNX's tie order in ``TopK``, so that spikes fire and proposals
are kept where PyTorch's are; both runtimes take a thread count.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np

from .export import METADATA_PREFIX

__all__ = ["BACKENDS", "GraphSession", "read_metadata"]

#: Graph runtimes, with the package that provides each (tools/install.sh installs both).
BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def read_metadata(path: str | os.PathLike) -> Dict[str, str]:
    """The ``metaspike.*`` metadata of an exported graph (prefix removed)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return {p.key[len(METADATA_PREFIX):]: p.value for p in graph.metadata_props if p.key.startswith(METADATA_PREFIX)}


class GraphSession:
    """An exported graph loaded on the CPU by ``backend`` (``"onnxruntime"`` or ``"openvino"``).

    ``threads`` 0 keeps the runtime's default (one per core). Inputs are NumPy arrays in the graph's
    input order; outputs come back as NumPy arrays in its output order.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "onnxruntime", threads: int = 0):
        path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"graph backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if path.suffix != ".onnx" or not path.is_file():
            raise FileNotFoundError(f"{path}: expected an exported .onnx graph (write one with tools/export_model.py)")
        try:
            __import__(BACKENDS[backend])
        except ImportError as e:
            raise ImportError(f"backend {backend!r} needs the {BACKENDS[backend]!r} package: run bash tools/install.sh "
                              f"(or pip install {BACKENDS[backend]})") from e
        self.path, self.backend = path, backend
        self.metadata = read_metadata(path)
        if backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads > 0:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self._session.get_inputs()]
            self.output_names = [o.name for o in self._session.get_outputs()]
        else:
            import openvino as ov

            config = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads > 0:
                config["INFERENCE_NUM_THREADS"] = threads
            core = ov.Core()
            graph = core.read_model(str(path))
            for op in graph.get_ordered_ops():
                # ONNX's TopK orders ties by index; OpenVINO's ONNX reader drops that ("stable": False), and
                # spiking heads produce exact ties, so without it proposals would differ from PyTorch's
                if op.get_type_name() == "TopK" and "stable" in op.get_attributes():
                    op.set_attribute("stable", True)
            self._compiled = core.compile_model(graph, "CPU", config)
            self._request = self._compiled.create_infer_request()
            self.input_names = [i.get_any_name() for i in self._compiled.inputs]
            self.output_names = [o.get_any_name() for o in self._compiled.outputs]

    def __call__(self, *arrays: np.ndarray) -> List[np.ndarray]:
        if len(arrays) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} input(s) {self.input_names}, "
                             f"got {len(arrays)}")
        arrays = [np.ascontiguousarray(a) for a in arrays]
        if self.backend == "onnxruntime":
            return self._session.run(None, dict(zip(self.input_names, arrays)))
        results = self._request.infer(arrays)
        return [np.asarray(results[output]) for output in self._compiled.outputs]

    def __repr__(self) -> str:
        return f"GraphSession({str(self.path)!r}, backend={self.backend!r})"
