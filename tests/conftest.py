"""Fixtures shared by every test: seeding, one torch thread, one tiny trained pair per session.
Builders live in ``tests/helpers.py``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from poisonmech.runtime import num_threads
from tests.helpers import train_tiny_pair, train_tiny_pipeline


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The one thread-count fixture: tiny models on a small shared machine run far faster on one
    torch thread (thread hand-offs dominate), and one fixed count makes trained weights
    reproducible. Session-scoped so that session fixtures (trained pairs) run under it too;
    the count is restored at the end. Tests that count threads set their own inside a block."""
    with num_threads(1):
        yield


@pytest.fixture(autouse=True)
def _seed_everything():
    """Tests are deterministic; the library itself never seeds globally."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    return train_tiny_pair(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A tiny SFT -> DPO pipeline run: ``tiny_pipeline[0]`` is an SFT stage, ``[1]`` a DPO stage."""
    return train_tiny_pipeline(tmp_path_factory.mktemp("runs") / "pipe")
