"""Circuit tests run many tiny forwards: one intra-op thread is much faster than two on a
busy machine (thread hand-offs dominate). Scoped to this folder, restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
