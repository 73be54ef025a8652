import pytest
import torch


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 50, (3,), generator=g)
    return clean, corrupted
