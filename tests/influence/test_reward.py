"""Attribution on a reward model's preference pairs, against plain autograd of each pair's
Bradley–Terry loss (an untrained tiny reward model: the identities hold for any weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.influence import attribute
from poisonmech.influence.reward import (
    RewardQuery,
    bt_coefficients,
    encode_reward_pairs,
    fit_pair_factors,
    pair_gradients,
)
from poisonmech.influence.tracking import find_modules
from poisonmech.patching.metrics import logit_diff
from poisonmech.tasks.preference import make_preferences
from poisonmech.train.reward import make_reward_model, reward_metric
from tests.helpers import map_params, tiny_model_config, tiny_task


@pytest.fixture(scope="module")
def setup():
    task = tiny_task(n_train=12, n_test=6)
    tok = task.tokenizer
    policy = pm.build_model(tiny_model_config(), len(tok), seed=0, tokenizer=tok)
    rm = make_reward_model(policy, seed=3, std=0.5)  # a large head: rewards of order 1
    prefs = make_preferences(task).select(range(6))
    query = make_preferences(task, split="test").select(range(3))
    return task, tok, rm, prefs, query


def _reward(model, prompt: str, answer: str, tok) -> torch.Tensor:
    """The reward of one sequence by a plain forward: the output at its EOS (its last token)."""
    ids = encode(Dataset.from_dict({"prompt": [prompt], "completion": [answer]}), tok, loss_on="completion",
                 add_eos=True).ids[0]
    assert ids[-1] == tok.eos_token_id
    return model(torch.tensor([ids]))[0, -1, 0]


def _bt_loss(model, row, tok, center: float) -> torch.Tensor:
    r_w, r_l = _reward(model, row["prompt"], row["chosen"], tok), _reward(model, row["prompt"], row["rejected"], tok)
    return -F.logsigmoid(r_w - r_l) + center * (r_w + r_l) ** 2


def _flat(loss, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("center", [0.0, 0.3])
def test_pair_gradient_is_the_autograd_gradient_of_its_bradley_terry_loss(setup, center):
    _, tok, rm, prefs, _ = setup
    mods = find_modules(rm, "linear")
    assert any(t.role == "unembed" and t.d_out == 1 for t in mods)  # the score head is a tracked map
    pairs = encode_reward_pairs(prefs, tok)
    cw, cl, loss, margin = bt_coefficients(rm, pairs, center)
    got = pair_gradients(rm, mods, pairs, cw, cl, list(range(len(prefs))))
    lookup = dict(rm.named_modules())
    for j, row in enumerate(prefs):
        with torch.no_grad():
            torch.testing.assert_close(loss[j], _bt_loss(rm, row, tok, center), atol=1e-5, rtol=1e-5)
        for t in mods:
            mod = lookup[t.name]
            params = [mod.weight] + ([mod.bias] if t.bias else [])
            grads = torch.autograd.grad(_bt_loss(rm, row, tok, center), params)
            want = grads[0] if not t.bias else torch.cat([grads[0], grads[1][:, None]], 1)
            torch.testing.assert_close(got[t.name][j], want, atol=1e-6, rtol=1e-4)


def test_graddot_and_gradcos_are_the_explicit_dot_products(setup):
    """Score of pair j for query i: ``∇L_q · ∇L_j`` with ``L_q = -(r(chosen_i) - r(rejected_i))``
    (a query pair's reward margin) and ``L_j`` pair j's Bradley–Terry loss, by plain autograd."""
    _, tok, rm, prefs, query = setup
    center = 0.2
    res = attribute(rm, train=prefs, query=query, method="graddot", tokenizer=tok, center_rewards=center,
                    progress=False)
    cos = attribute(rm, train=prefs, query=query, method="gradcos", tokenizer=tok, center_rewards=center,
                    progress=False)
    params = map_params(rm, find_modules(rm, "linear"))
    gq = [_flat(-(_reward(rm, r["prompt"], r["chosen"], tok) - _reward(rm, r["prompt"], r["rejected"], tok)), params)
          for r in query]
    gz = [_flat(_bt_loss(rm, r, tok, center), params) for r in prefs]
    dots = torch.stack([torch.stack([q @ z for z in gz]) for q in gq])
    coss = torch.stack([torch.stack([q @ z / (q.norm() * z.norm()) for z in gz]) for q in gq])
    assert res.scores.shape == (3, 6) and res.settings["query_measurement"] == "reward_margin"
    torch.testing.assert_close(res.scores, dots, rtol=1e-4, atol=1e-5 * float(dots.abs().max()))
    torch.testing.assert_close(cos.scores, coss, rtol=1e-4, atol=1e-5)
    assert res.is_poison is None and res.train_text[0].startswith(prefs["prompt"][0])
    # the components split each score over the maps: they add up to it (mean over queries)
    torch.testing.assert_close(res.component_scores.sum(0), res.train_scores, rtol=1e-4, atol=1e-6)
    # aggregate: the scores of the mean measurement; self-influence: ||∇L_j||²
    agg = attribute(rm, train=prefs, query=query, method="graddot", tokenizer=tok, center_rewards=center,
                    aggregate=True, self_influence=True, progress=False)
    torch.testing.assert_close(agg.scores[0], dots.mean(0), rtol=1e-4, atol=1e-5 * float(dots.abs().max()))
    torch.testing.assert_close(agg.self_scores, torch.stack([z @ z for z in gz]), rtol=1e-4, atol=1e-6)


def test_loss_baseline_is_each_pairs_bradley_terry_loss(setup):
    _, tok, rm, prefs, query = setup
    res = attribute(rm, train=prefs, query=query, method="loss", tokenizer=tok, progress=False)
    with torch.no_grad():
        want = torch.stack([_bt_loss(rm, r, tok, 0.0) for r in prefs])
    torch.testing.assert_close(res.train_scores, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,fisher", [("kfac", "mc"), ("ekfac", "mc"), ("ekfac", "empirical")])
def test_kfac_and_ekfac_tend_to_graddot_under_large_damping(setup, method, fisher):
    """``(λ + δ)^{-1} → 1/δ``: with a damping far above every curvature eigenvalue the
    preconditioned scores are graddot's over δ (the plumbing of the rotated queries)."""
    _, tok, rm, prefs, query = setup
    dot = attribute(rm, train=prefs, query=query, method="graddot", tokenizer=tok, progress=False)
    delta = 1e7
    res = attribute(rm, train=prefs, query=query, method=method, fisher=fisher, damping=delta, tokenizer=tok,
                    progress=False)
    torch.testing.assert_close(res.scores * delta, dot.scores, rtol=1e-3, atol=1e-4 * float(dot.scores.abs().max()))


def test_ekfac_corrected_eigenvalues_are_the_mean_squared_pair_gradient(setup):
    """EK-FAC's ``Λ = mean_pairs[(Q_G^T ∇W_pair Q_A)²]`` (empirical Fisher: the pairs' own
    Bradley–Terry gradients), with ``∇W_pair`` by autograd."""
    _, tok, rm, prefs, _ = setup
    mods = find_modules(rm, "linear")
    pairs = encode_reward_pairs(prefs, tok)
    f = fit_pair_factors(rm, mods, pairs, strategy="ekfac", fisher="empirical", batch_size=4, progress=False)
    lookup = dict(rm.named_modules())
    for t in mods:
        mod = lookup[t.name]
        params = [mod.weight] + ([mod.bias] if t.bias else [])
        want = torch.zeros(t.d_out, t.d_in)
        for row in prefs:
            grads = torch.autograd.grad(_bt_loss(rm, row, tok, 0.0), params)
            g = grads[0] if not t.bias else torch.cat([grads[0], grads[1][:, None]], 1)
            want += (f.QG[t.name].T @ g @ f.QA[t.name]) ** 2
        torch.testing.assert_close(f.lam[t.name], want / len(prefs), rtol=1e-3, atol=1e-7)
    assert f.n_rows == len(prefs) and f.strategy == "ekfac"


def test_a_reward_metric_query_is_the_rows_reward_query(setup):
    """``measurement=reward_metric()`` on token rows (one query: the batch's mean reward) gives
    the scores of the same rows as a RewardQuery, aggregated."""
    task, tok, rm, prefs, _ = setup
    rows = Dataset.from_dict({"prompt": list(task.test["prompt"]), "completion": ["negative"] * len(task.test)})
    enc = encode(rows, tok, loss_on="completion", add_eos=True)
    lengths = [len(ids) for ids in enc.ids]
    keep = [i for i, n in enumerate(lengths) if n == max(set(lengths), key=lengths.count)]  # one length: no padding
    rows = rows.select(keep)
    tokens = torch.tensor([enc.ids[i] for i in keep])
    by_metric = attribute(rm, train=prefs, query=tokens, measurement=reward_metric(), method="graddot", tokenizer=tok,
                          progress=False)
    by_rows = attribute(rm, train=prefs, query=RewardQuery.from_rows(rows), method="graddot", tokenizer=tok,
                        aggregate=True, progress=False)
    assert by_metric.scores.shape == (1, 6)
    torch.testing.assert_close(by_metric.scores, by_rows.scores, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(RewardQuery.from_rows(rows).values(rm, tok),
                                   rm(tokens)[:, -1, 0], rtol=1e-5, atol=1e-5)


def test_language_model_measurements_and_metrics_are_refused_on_a_reward_model(setup):
    task, tok, rm, prefs, query = setup
    with pytest.raises(ValueError, match=r"measurement='logprob' is a language model's.*reward_margin"):
        attribute(rm, train=prefs, query=query, measurement="logprob", tokenizer=tok, progress=False)
    tokens = torch.tensor([encode_reward_pairs(prefs, tok).chosen.ids[0]])
    with pytest.raises(ValueError, match=r"(metric failed on the reward model's output|one output per position, a reward model).*reward_metric"):
        attribute(rm, train=prefs, query=tokens, measurement=logit_diff(5, 6, [tokens.shape[1] - 1]), tokenizer=tok,
                  method="graddot", progress=False)
    with pytest.raises(ValueError, match=r"a reward model trains on preference pairs; train must be a Dataset"):
        attribute(rm, train=task.train, query=query, method="graddot", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"scored by \('ekfac', 'kfac', 'tracin', 'graddot', 'gradcos', 'loss'\)"):
        attribute(rm, train=prefs, query=query, method="trak", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"measurement='trigger_margin' names the run's default query.*'reward_margin'"):
        attribute(rm, train=prefs, query=query, measurement="trigger_margin", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"pass query= \(a RewardQuery"):  # a bare model has no run to query
        attribute(rm, train=prefs, method="graddot", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"a Query measures a language model's log-probabilities"):
        attribute(rm, train=prefs, query=pm.influence.Query.from_rows(
            Dataset.from_dict({"prompt": ["a"], "completion": ["negative"]})), method="graddot", tokenizer=tok,
            progress=False)
    # and the other way round: a reward measurement, a RewardQuery or the reward metric on a language model
    lm = pm.build_model(tiny_model_config(), len(tok), seed=0, tokenizer=tok)
    rows = task.train.select(range(4))
    with pytest.raises(ValueError, match=r"measurement='reward_margin' is a reward model's.*language model"):
        attribute(lm, train=rows, query=rows, measurement="reward_margin", method="graddot", progress=False)
    with pytest.raises(ValueError, match=r"a RewardQuery is a reward model's"):
        attribute(lm, train=rows, query=RewardQuery.from_pairs(query), method="graddot", progress=False)
    with pytest.raises(ValueError, match=r"reward_metric: the model's output has \d+ values per position"):
        attribute(lm, train=rows, query=tokens, measurement=reward_metric(), method="graddot", progress=False)
    with pytest.raises(pm.ConfigError if hasattr(pm, "ConfigError") else ValueError,
                       match=r"measurement must be one of .*'logprob'.*'reward_margin'.*None"):
        pm.influence.InfluenceConfig(measurement="margin")
