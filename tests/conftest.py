import os
import warnings

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="ArviZ is undergoing a major refactor")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
