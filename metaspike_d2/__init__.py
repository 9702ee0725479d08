"""metaspike-d2: Meta-SpikeFormer (Spike-Driven Transformer V2, Yao et al., ICLR 2024).

The core (this package minus ``metaspike_d2.d2``) needs only torch, spikingjelly and timm. Importing it
registers the classification models with timm (``timm.create_model("metaspikeformer_55m", ...)``).
Detectron2 glue lives in :mod:`metaspike_d2.d2`, which imports the core and never the reverse.
"""
__version__ = "0.1.0"

from .backbone import FEATURE_NAMES, VARIANTS, MetaSpikeFormer  # noqa: E402
from .checkpoint import load_checkpoint_file, load_state_dict_strict  # noqa: E402
from .classifier import MetaSpikeFormerClassifier  # noqa: E402
from .neurons import MultiStepILIF, MultiStepLIF, mean_over_time, repeat_over_time, seq_apply  # noqa: E402
from .reparam import reparameterize  # noqa: E402
from .spike_expansion import expand_spikes  # noqa: E402

__all__ = [
    "__version__",
    "FEATURE_NAMES",
    "VARIANTS",
    "MetaSpikeFormer",
    "MetaSpikeFormerClassifier",
    "MultiStepILIF",
    "MultiStepLIF",
    "load_checkpoint_file",
    "load_state_dict_strict",
    "expand_spikes",
    "mean_over_time",
    "repeat_over_time",
    "reparameterize",
    "seq_apply",
]
