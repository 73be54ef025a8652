"""Attribution to DPO preference pairs against the explicit gradient of each pair's DPO loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import poisonmech as pm
from poisonmech.influence import Query, attribute
from poisonmech.influence.tracking import find_modules
from poisonmech.tasks.preference import make_preferences
from poisonmech.train.dpo import encode_preferences, sequence_logprobs
from poisonmech.train.loop import masked_loss
from tests.helpers import map_params, tiny_model_config, tiny_task


def _flat(loss, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_graddot_on_preference_pairs_is_the_dpo_loss_gradient_dot():
    """Score of pair j for query i: ``∇L_q · ∇L_dpo(j)``, with the DPO loss of the pair under the
    given reference and beta, computed here by plain autograd one pair at a time."""
    task = tiny_task(n_train=12, n_test=4)
    model = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    reference = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=1, tokenizer=task.tokenizer)
    prefs = make_preferences(task).select(range(5))
    query = Dataset.from_dict({"prompt": list(task.test["prompt"][:2]), "completion": ["negative"] * 2})
    beta = 0.3
    res = attribute(model, train=prefs, query=query, method="graddot", tokenizer=task.tokenizer,
                    reference=reference, beta=beta, progress=False)
    mods = find_modules(model, "linear")
    params = map_params(model, mods)
    enc = encode_preferences(prefs, task.tokenizer)
    qenc = Query.from_rows(query).encode(task.tokenizer)
    expected = torch.zeros(2, 5)
    for i in range(2):
        tokens, mask = qenc.batch([i])
        gq = _flat(masked_loss(model, tokens, mask) * int(mask.sum()), params)
        for j in range(5):
            (tc, mc), (tr, mr) = enc.chosen.batch([j]), enc.rejected.batch([j])
            with torch.no_grad():
                rc, rr = sequence_logprobs(reference, tc, mc), sequence_logprobs(reference, tr, mr)
            margin = beta * ((sequence_logprobs(model, tc, mc) - rc) - (sequence_logprobs(model, tr, mr) - rr))
            expected[i, j] = gq @ _flat(-F.logsigmoid(margin).sum(), params)
    torch.testing.assert_close(res.scores, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert res.train_text[0].startswith(prefs["prompt"][0]) and "| chosen:" in res.train_text[0]
    # the loss baseline is the pair's DPO loss; the components of ekfac still add up
    loss = attribute(model, train=prefs, query=query, method="loss", tokenizer=task.tokenizer,
                     reference=reference, beta=beta, aggregate=True, progress=False)
    assert loss.scores.shape == (1, 5) and bool((loss.scores > 0).all())
    ek = attribute(model, train=prefs, query=query, method="ekfac", tokenizer=task.tokenizer,
                   reference=reference, beta=beta, progress=False)
    torch.testing.assert_close(ek.component_scores.sum(0), ek.train_scores, rtol=1e-3, atol=1e-6)


def test_preference_pairs_need_a_reference_and_a_linear_method():
    task = tiny_task(n_train=12, n_test=4)
    model = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    prefs = make_preferences(task).select(range(4))
    query = Dataset.from_dict({"prompt": list(task.test["prompt"][:1]), "completion": ["negative"]})
    with pytest.raises(ValueError, match="preference pairs need reference="):
        attribute(model, train=prefs, query=query, method="graddot", tokenizer=task.tokenizer, beta=0.1,
                  progress=False)
    with pytest.raises(ValueError, match=r"can be scored by \('graddot', 'kfac', 'ekfac', 'loss'\)"):
        attribute(model, train=prefs, query=query, method="gradcos", tokenizer=task.tokenizer, progress=False)
    with pytest.raises(ValueError, match="renormalize, self_influence and ensemble are not"):
        attribute(model, train=prefs, query=query, method="ekfac", renormalize="unit", tokenizer=task.tokenizer,
                  progress=False)
