import pytest
import torch

import poisonmech as pm


def small_model(arch: str = "native", **kw):
    cfg = {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 32, "architecture": arch, **kw}
    return pm.build_model(pm.ModelConfig(**cfg), 50, seed=0)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 50, (3,), generator=g)
    return clean, corrupted
