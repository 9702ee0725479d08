"""torch.compile: the backbone compiles as one graph (no graph breaks) and matches eager.

The default backend is ``aot_eager`` (Dynamo graph capture + AOTAutograd functionalization and
decompositions, i.e. everything torch.compile does except generating C++ kernels): on a 2-core CPU
Inductor's C++ code generation of even the tiny backbone takes minutes (measured 419 s for the eval
graph, docs/benchmarks.md), too long for the test suite. Set ``METASPIKE_COMPILE_BACKEND=inductor`` to
run the full compiler (it matched eager exactly when measured).
"""
import os

import pytest
import torch

from metaspike_d2 import FEATURE_NAMES, MetaSpikeFormer, reparameterize

BACKEND = os.environ.get("METASPIKE_COMPILE_BACKEND", "aot_eager")


@pytest.mark.parametrize("form", ["training", "fast"])
def test_compiled_backbone_matches_eager(form):
    torch._dynamo.reset()
    model = MetaSpikeFormer(variant="tiny", time_steps=2, out_features=FEATURE_NAMES).eval()
    if form == "fast":
        model = reparameterize(model, "fast")
    x = torch.randn(1, 3, 32, 32) * 3
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    with torch.no_grad():
        eager, out = model(x), compiled(x)
    assert set(out) == set(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        torch.testing.assert_close(out[name], eager[name], rtol=1e-5, atol=1e-5)
