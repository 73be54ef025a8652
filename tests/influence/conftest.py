"""Builders for the influence tests: a one-layer linear softmax model, tiny bridges and a tiny pair."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import poisonmech as pm
from poisonmech.encoding import Encoded
from tests.conftest import tiny_model_config, tiny_task


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine run far faster single-threaded (no spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LinearSoftmax(nn.Module):
    """``logits = W embed(token) + b`` with a frozen embedding: one tracked linear map whose
    Gauss–Newton matrix is exactly ``H_out ⊗ a a^T``."""

    def __init__(self, vocab: int = 5, d: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.embed.weight.data = torch.randn(vocab, d, generator=g)
        self.embed.weight.requires_grad_(False)
        self.lin = nn.Linear(d, vocab)
        self.lin.weight.data = 0.5 * torch.randn(vocab, d, generator=g)
        self.lin.bias.data = 0.1 * torch.randn(vocab, generator=g)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lin(self.embed(tokens))


def one_token_rows(x: int, y: int, n: int = 1) -> Encoded:
    """``n`` copies of the row ``[x, y]``: one scored token ``y`` predicted from ``x``."""
    return Encoded(ids=[[x, y] for _ in range(n)], start=[1] * n, pad_id=0)


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A tiny trained pair (1 layer, d_model 32, 120 rows, 8 of them poisoned) with checkpoints."""
    task = tiny_task(n_train=120, n_test=16)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=8)
    out = tmp_path_factory.mktemp("influence") / "tiny"
    return pm.train_pair(task, attack, model=tiny_model_config(), train=pm.TrainConfig(epochs=2, seed=0),
                         out_dir=out, progress=False)


def small_bridge(arch: str = "native", vocab: int = 40):
    return pm.build_model(tiny_model_config(architecture=arch, n_ctx=16), vocab, seed=0)


def map_params(model, mods) -> list[torch.Tensor]:
    """The weights and biases of the tracked maps ``mods``, in order (for explicit autograd references)."""
    lookup = dict(model.named_modules())
    params = []
    for t in mods:
        params.append(lookup[t.name].weight)
        if t.bias:
            params.append(lookup[t.name].bias)
    return params
