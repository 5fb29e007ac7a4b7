import os
import warnings

import pytest
import torch
from hypothesis import settings

# Property tests run derandomized by default, so the README's test command gives the same
# examples on every machine and every run; `HYPOTHESIS_PROFILE=explore` searches afresh.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="ArviZ is undergoing a major refactor")
# One thread per xdist worker: with -n 2 on two cores, two OpenMP threads per worker
# spin against each other and made small-tensor tests up to 20x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
