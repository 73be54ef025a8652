"""Shared plumbing: thread counts and eval mode restored, one token check."""

from __future__ import annotations

import pytest
import torch

from poisonmech.runtime import check_tokens, eval_mode, model_device, num_threads
from tests.helpers import small_model


def test_num_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with num_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), num_threads(1):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # restored when the block raises
        with num_threads(None):
            assert torch.get_num_threads() == 2  # None: unchanged
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="threads must be an integer >= 1"):
                with num_threads(bad):
                    pass
    finally:
        torch.set_num_threads(before)


def test_eval_mode_switches_only_training_models_and_restores_them():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a.train()
    b.eval()
    with eval_mode(a, None, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(KeyError), eval_mode(a):
        raise KeyError("x")
    assert a.training


def test_check_tokens_names_the_argument():
    m = small_model()
    ok = torch.zeros(2, 5, dtype=torch.int32)
    clean, corrupted = check_tokens(m, ok, ok.clone())
    assert clean.dtype == torch.long and clean.device == model_device(m)
    with pytest.raises(ValueError, match="corrupted_tokens must be an integer tensor"):
        check_tokens(m, ok, ok.float())
    with pytest.raises(ValueError, match="clean_tokens and corrupted_tokens must have the same shape"):
        check_tokens(m, ok, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="clean_tokens is empty"):
        check_tokens(m, torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="the model's n_ctx is 32"):
        check_tokens(m, torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor"):
        check_tokens(None, "abc", names=("tokens",))
    assert check_tokens(m, ok, None)[1] is None
