"""Per-example gradients: the hook path against torch.func; grad-dot against explicit autograd."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.influence import Query, attribute
from poisonmech.influence.grads import forward_backward, func_per_example_grads, per_example
from poisonmech.influence.tracking import find_modules, weight_gradient
from poisonmech.train.loop import masked_loss
from tests.helpers import map_params, tiny_model_config, tiny_task


def _model_and_rows(arch: str):
    task = tiny_task(n_train=12, n_test=4)
    model = pm.build_model(tiny_model_config(architecture=arch), len(task.tokenizer), seed=0,
                           tokenizer=task.tokenizer)
    return model, task


@pytest.mark.parametrize("arch", ["native", "gpt2"])
def test_hook_gradients_equal_torch_func(arch):
    model, task = _model_and_rows(arch)
    enc = encode(task.train, task.tokenizer, loss_on="completion")
    tokens, mask = enc.batch(list(range(5)))
    mods = find_modules(model, "linear")
    bg = forward_backward(model, mods, tokens, mask)
    ref = func_per_example_grads(model, tokens, mask)
    names = {id(p): n for n, p in model.named_parameters()}
    lookup = dict(model.named_modules())
    for t in mods:
        if t.role == "unembed" and arch == "gpt2":
            continue  # tied to the embedding: torch.func sums both uses
        for k, g in weight_gradient(t, per_example(t, bg.a[t.name], bg.g[t.name]), model).items():
            torch.testing.assert_close(g, ref[names[id(getattr(lookup[t.name], k))]], rtol=1e-4, atol=1e-6)


def _explicit_grad(model, mods, tokens, mask) -> torch.Tensor:
    """Plain autograd, one row at a time: d(summed NLL)/d(weights and biases of the maps)."""
    params = map_params(model, mods)
    n = int(mask.sum())
    loss = masked_loss(model, tokens, mask) * n
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("arch", ["native", "gpt2"])
def test_graddot_equals_explicit_autograd_dot(arch):
    """``graddot``'s score is ``∇L_q · ∇L_z`` with ``L_q = -log p(completion | prompt)``
    (GPT-2's unembedding is tied to its embedding, whose use autograd would add: left out)."""
    model, task = _model_and_rows(arch)
    train = task.train.select(range(6))
    query = Dataset.from_dict({"prompt": list(task.test["prompt"][:3]), "completion": ["negative"] * 3})
    modules = "linear" if arch == "native" else ["L*"]
    res = attribute(model, train=train, query=query, method="graddot", tokenizer=task.tokenizer, modules=modules,
                    progress=False)
    mods = find_modules(model, modules)
    tenc = encode(train, task.tokenizer, loss_on="completion")
    qenc = Query.from_rows(query).encode(task.tokenizer)
    expected = torch.zeros(3, 6)
    for i in range(3):
        gq = _explicit_grad(model, mods, *qenc.batch([i]))
        for j in range(6):
            expected[i, j] = gq @ _explicit_grad(model, mods, *tenc.batch([j]))
    torch.testing.assert_close(res.scores, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_loss_baseline_is_the_per_example_loss():
    model, task = _model_and_rows("native")
    train = task.train.select(range(8))
    res = attribute(model, train=train, query=task.train.select(range(2)), method="loss",
                    tokenizer=task.tokenizer, progress=False, aggregate=True)
    enc = encode(train, task.tokenizer, loss_on="completion")
    with torch.no_grad():
        expected = torch.stack([masked_loss(model, *enc.batch([i])) for i in range(8)])
    torch.testing.assert_close(res.train_scores, expected, rtol=1e-5, atol=1e-6)
