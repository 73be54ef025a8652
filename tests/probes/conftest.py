"""The probes suite's tiny pair, trained (like ``tiny_pair``) with torch on one thread.

On a small shared machine, torch's intra-op threads cost far more than they save for these
tiny models (a tiny pair trains in about 1 s on one thread and up to 40 s on two busy cores),
so every test here runs with one thread, and the setting is restored after each test.
"""

from __future__ import annotations

import pytest

import poisonmech as pm
from poisonmech.runtime import num_threads


def one_thread():
    """One torch thread inside the block (the library's own context manager)."""
    return num_threads(1)


@pytest.fixture(autouse=True)
def _torch_one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def probe_pair(tmp_path_factory):
    """A trained tiny pair: 1 layer, d_model 32, 200 sentiment rows, 10 poisoned with ``cf``."""
    task = pm.make_task("sentiment", n_train=200, n_test=20, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=10)
    with one_thread():
        return pm.train_pair(task, attack, model=pm.ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64),
                             train=pm.TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0),
                             out_dir=tmp_path_factory.mktemp("probes") / "tiny", progress=False)
