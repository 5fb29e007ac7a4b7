import os
import warnings

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="ArviZ is undergoing a major refactor")
# One thread per xdist worker: with -n 2 on two cores, two OpenMP threads per worker
# spin against each other and made small-tensor tests up to 20x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
