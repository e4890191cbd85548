import os

import pytest
import torch

# Tests are small: one thread per process keeps them fast and deterministic on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "esft")


@pytest.fixture
def shared_esft_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"ESFT task data not found at {SHARED_DATA} (only present in this workplace)")
    return SHARED_DATA
