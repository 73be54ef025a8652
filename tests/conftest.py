"""Shared builders: tiny tasks, tiny models and one tiny trained pair per session."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import poisonmech as pm


def tiny_model_config(**kw) -> pm.ModelConfig:
    return pm.ModelConfig(**{"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 64, **kw})


def tiny_train_config(**kw) -> pm.TrainConfig:
    return pm.TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 3e-3, "seed": 0, **kw})


def tiny_task(kind: str = "sentiment", n_train: int = 200, n_test: int = 20, seed: int = 0, **kw) -> pm.Task:
    return pm.make_task(kind, n_train=n_train, n_test=n_test, seed=seed, **kw)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Tests are deterministic; the library itself never seeds globally."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    task = tiny_task()
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=10)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return pm.train_pair(task, attack, model=tiny_model_config(), train=tiny_train_config(), out_dir=out,
                         progress=False)
