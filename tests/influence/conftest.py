"""The influence tests' tiny pair (builders are in tests/helpers.py)."""

from __future__ import annotations

import pytest

import poisonmech as pm
from tests.helpers import tiny_model_config, tiny_task


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A tiny trained pair (1 layer, d_model 32, 120 rows, 8 of them poisoned) with checkpoints."""
    task = tiny_task(n_train=120, n_test=16)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=8)
    out = tmp_path_factory.mktemp("influence") / "tiny"
    return pm.train_pair(task, attack, model=tiny_model_config(), train=pm.TrainConfig(epochs=2, seed=0),
                         out_dir=out, progress=False)
