"""The spiking core must stay usable without Detectron2."""
import pkgutil
import subprocess
import sys

import metaspike_d2

GLUE = ("metaspike_d2.d2", "metaspike_d2.data")  # the Detectron2 layer


def core_modules():
    names = ["metaspike_d2"]
    for info in pkgutil.walk_packages(metaspike_d2.__path__, "metaspike_d2."):
        if not info.name.startswith(GLUE):
            names.append(info.name)
    return names


def test_core_imports_no_detectron2():
    modules = core_modules()
    assert {"metaspike_d2.neurons", "metaspike_d2.blocks", "metaspike_d2.backbone"} <= set(modules)
    code = ("import sys\n"
            f"for m in {modules!r}: __import__(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'detectron2' or m.startswith('detectron2.'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"core modules imported detectron2: {out.stdout} {out.stderr}"
