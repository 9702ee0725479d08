import os

# One intra-op thread: the test models are tiny, and on a small shared CPU several spinning OpenMP
# threads per process make convolutions 10-50x slower. Subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
