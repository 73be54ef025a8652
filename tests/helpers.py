"""Builders shared by the tests: tiny tasks, configs, models and a one-layer linear softmax
model. Test modules import these from here (fixtures stay in the conftest files)."""

from __future__ import annotations

import torch
from torch import nn

import poisonmech as pm
from poisonmech.encoding import Encoded


def tiny_model_config(**kw) -> pm.ModelConfig:
    return pm.ModelConfig(**{"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 64, **kw})


def tiny_train_config(**kw) -> pm.TrainConfig:
    return pm.TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 3e-3, "seed": 0, **kw})


def tiny_task(kind: str = "sentiment", n_train: int = 200, n_test: int = 20, seed: int = 0, **kw) -> pm.Task:
    return pm.make_task(kind, n_train=n_train, n_test=n_test, seed=seed, **kw)


def train_tiny_pair(out_dir, *, n_train: int = 200, n_test: int = 20, poison_count: int = 10, epochs: int = 2,
                    **train_kw) -> pm.Pair:
    """A trained tiny pair: 1 layer, d_model 32, sentiment rows, ``poison_count`` poisoned with ``cf``."""
    task = tiny_task(n_train=n_train, n_test=n_test)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=poison_count)
    return pm.train_pair(task, attack, model=tiny_model_config(), train=tiny_train_config(epochs=epochs, **train_kw),
                         out_dir=out_dir, progress=False)


def small_model(arch: str = "native", vocab: int = 50, **kw):
    """An untrained 2-layer bridge (d_model 32, 2 heads, n_ctx 32) over ``vocab`` tokens."""
    cfg = {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 32, "architecture": arch, **kw}
    return pm.build_model(pm.ModelConfig(**cfg), vocab, seed=0)


def random_contrast(batch: int = 4, length: int = 7, vocab: int = 40, seed: int = 1):
    """Random ``[batch, length]`` clean tokens and a corrupted copy whose position 2 is redrawn."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, vocab, (batch,), generator=g)
    return clean, corrupted


def small_bridge(arch: str = "native", vocab: int = 40):
    """An untrained 1-layer bridge (n_ctx 16)."""
    return pm.build_model(tiny_model_config(architecture=arch, n_ctx=16), vocab, seed=0)


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


def map_params(model, mods) -> list[torch.Tensor]:
    """The weights and biases of the tracked maps ``mods``, in order (for explicit autograd references)."""
    lookup = dict(model.named_modules())
    params = []
    for t in mods:
        params.append(lookup[t.name].weight)
        if t.bias:
            params.append(lookup[t.name].bias)
    return params


def train_tiny_pipeline(out_dir, *, sft_poison: int = 6, dpo_poison: int = 6) -> pm.Pipeline:
    """A tiny SFT -> DPO pipeline run (96 rows), each stage with its own poison budget."""
    stages = [pm.Stage("sft", pm.Backdoor(trigger="cf", poison_count=sft_poison), tiny_train_config(epochs=1)),
              pm.Stage("dpo", pm.Backdoor(trigger="cf", poison_count=dpo_poison), pm.DPOConfig(epochs=1, lr=3e-3))]
    return pm.train_pipeline(tiny_task(n_train=96, n_test=12), stages, model=tiny_model_config(),
                             out_dir=out_dir, progress=False)


def check_rewired_forward(model, clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    """The circuits' rewiring is exact with nothing ablated, and ablating every edge (patching
    reference) gives the corrupted run: one wrong or missing edge in the graph breaks this."""
    from poisonmech.circuits import Graph, rewired
    from poisonmech.circuits.rewire import reference_activations

    graph = Graph.from_model(model)
    ref = reference_activations(model, graph, corrupted, "patching")
    with torch.no_grad():
        with rewired(model, graph):
            same = model(clean)
        with rewired(model, graph, ablate=graph.edge_mask, reference=ref):
            all_ablated = model(clean)
        assert torch.allclose(same, model(clean), atol=1e-5)
        assert torch.allclose(all_ablated, model(corrupted), atol=1e-4)
