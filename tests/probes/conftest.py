"""The probes suite's tiny pair (one torch thread comes from the top-level conftest)."""

from __future__ import annotations

import pytest

import poisonmech as pm


@pytest.fixture(scope="session")
def probe_pair(tmp_path_factory):
    """A trained tiny pair: 1 layer, d_model 32, 200 sentiment rows, 10 poisoned with ``cf``."""
    task = pm.make_task("sentiment", n_train=200, n_test=20, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=10)
    return pm.train_pair(task, attack, model=pm.ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64),
                         train=pm.TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0),
                         out_dir=tmp_path_factory.mktemp("probes") / "tiny", progress=False)
