"""The linear datamodeling score: Spearman aggregation against scipy, a ridge regression whose
influence is known in closed form, random scores, the measurement and its sign, retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from scipy.stats import spearmanr

from poisonmech.encoding import encode
from poisonmech.influence import (
    InfluenceResult,
    LDSResult,
    Query,
    SubsetRetrains,
    attribute,
    backdoor_query,
    linear_datamodeling_score,
    query_measurements,
    subset_retrains,
)
from poisonmech.influence.lds import draw_subsets, spearman_per_column, train_on_subset
from poisonmech.influence.tracking import find_modules
from tests.helpers import map_params


def _retrains(ids, subsets, measurements, **kw) -> SubsetRetrains:
    measurements = np.asarray(measurements, dtype=float)
    return SubsetRetrains(example_ids=tuple(ids), subsets=tuple(tuple(s) for s in subsets),
                          measurements=torch.tensor(measurements), full=None,
                          query_text=tuple(f"q{i}" for i in range(measurements.shape[1])), **kw)


def _result(scores: np.ndarray, ids, query_text, **kw) -> InfluenceResult:
    return InfluenceResult(method="exact", scores=torch.tensor(scores, dtype=torch.float32),
                           example_ids=tuple(ids), train_text=tuple(str(i) for i in ids), query_text=tuple(query_text),
                           settings={"query_measurement": "logprob", "query_link": "logprob"}, **kw)


# ---------------------------------------------------------------------------- the aggregation
def test_spearman_aggregation_matches_scipy_on_hand_data():
    ids = [10, 11, 12, 13]
    tau = np.array([[1.0, -2.0, 0.5, 3.0],    # query 0: scores of rows 10..13
                    [0.0, 1.0, 1.0, -1.0]])   # query 1
    subsets = [(10, 11), (11, 12), (12, 13), (10, 13), (10, 12)]
    # predicted by hand: the sum of each subset's scores, per query
    pred = np.array([[1 - 2, 0 + 1], [-2 + 0.5, 1 + 1], [0.5 + 3, 1 - 1], [1 + 3, 0 - 1], [1 + 0.5, 0 + 1]])
    actual = np.array([[0.1, 5.0], [-3.0, 4.0], [2.0, 1.0], [9.0, -2.0], [0.0, 0.5]])
    r = _retrains(ids, subsets, actual).score(tau, n_bootstrap=0)
    np.testing.assert_allclose(r.predicted.numpy(), pred, rtol=1e-6)
    want = [spearmanr(pred[:, q], actual[:, q]).statistic for q in range(2)]
    np.testing.assert_allclose(r.per_query.numpy(), want, rtol=1e-6)
    assert r.mean == pytest.approx(np.mean(want))
    assert r.sd == pytest.approx(np.std(want, ddof=1))
    assert r.sem == pytest.approx(np.std(want, ddof=1) / np.sqrt(2))
    assert r.n_query == 2 and r.n_subsets == 5 and r.bootstrap is None
    frame = r.to_frame()
    assert list(frame.columns) == ["method", "query", "query_text", "spearman", "n_subsets"] and len(frame) == 2


def test_spearman_per_column_ties_and_constant_columns():
    a = np.array([[1, 1, 2], [2, 1, 2], [2, 1, 3], [4, 1, 5]], dtype=float)
    b = np.array([[3, 1, 1], [1, 2, 1], [2, 3, 1], [5, 4, 1]], dtype=float)
    out = spearman_per_column(a, b)
    assert out[0] == pytest.approx(spearmanr(a[:, 0], b[:, 0]).statistic)  # ties: average ranks, as scipy
    assert np.isnan(out[1]) and np.isnan(out[2])  # a constant column has no ranking
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, size=(30, 25)).astype(float), rng.normal(size=(30, 25))  # many ties in a
    b[:, 3] = -a[:, 3]
    want = [spearmanr(a[:, q], b[:, q]).statistic for q in range(25)]
    np.testing.assert_allclose(spearman_per_column(a, b), want, rtol=1e-10, atol=1e-12)
    assert spearman_per_column(a, b)[3] == pytest.approx(-1.0)
    r = _retrains([0, 1, 2], [(0,), (1,), (2,), (0, 1)], [[1.0], [1.0], [1.0], [1.0]]).score(np.ones((1, 3)))
    assert np.isnan(r.mean) and r.n_valid == 0 and "1 constant" in r.summary()


# ---------------------------------------------------------------------------- a known answer
@pytest.fixture(scope="module")
def ridge():
    """Ridge regression: ``theta_S`` solved exactly on each subset; the influence of up-weighting
    row ``i`` on ``f_q = x_q . theta`` is ``-x_q H^{-1} x_i r_i`` (H = X^T X + lambda I)."""
    rng = np.random.default_rng(0)
    n, d, n_q, lam = 200, 4, 50, 1.0
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + rng.normal(size=n)
    Xq = rng.normal(size=(n_q, d))

    def fit(rows):
        A = X[rows]
        return np.linalg.solve(A.T @ A + lam * np.eye(d), A.T @ y[rows])

    theta = fit(np.arange(n))
    resid = X @ theta - y
    tau = -Xq @ np.linalg.solve(X.T @ X + lam * np.eye(d), (X * resid[:, None]).T)  # (n_q, n)
    ids = [1000 + 7 * i for i in range(n)]  # example ids are not positions
    subsets = draw_subsets(ids, 40, alpha=0.5, seed=0)
    pos = {e: i for i, e in enumerate(ids)}
    meas = np.stack([Xq @ fit(np.array([pos[e] for e in s])) for s in subsets])
    return ids, tau, _retrains(ids, subsets, meas)


def test_exact_influence_of_ridge_regression_has_lds_near_one(ridge):
    ids, tau, retrains = ridge
    perm = np.random.default_rng(1).permutation(len(ids))  # the scores' rows in another order
    res = _result(tau[:, perm], [ids[i] for i in perm], retrains.query_text)
    r = linear_datamodeling_score(retrains, res)
    assert isinstance(r, LDSResult) and r.method == "exact"
    assert r.mean > 0.95 and r.n_valid == 50
    assert 0 <= r.bootstrap_sd < 0.05
    flipped = retrains.score(-tau)  # the sign matters: the opposite convention scores near -1
    assert flipped.mean < -0.95
    np.testing.assert_allclose(flipped.per_query.numpy(), -r.per_query.numpy(), atol=1e-6)


def test_random_scores_have_lds_near_zero(ridge):
    ids, tau, retrains = ridge
    r = retrains.score(np.random.default_rng(3).normal(size=tau.shape), n_bootstrap=0)
    assert abs(r.mean) < 0.1  # sd of the mean over 50 queries is ~0.023 here


def test_aggregated_scores_are_scored_against_the_mean_measurement(ridge):
    ids, tau, retrains = ridge
    agg = _result(tau.mean(0), ids, retrains.query_text, aggregated=True)
    r = retrains.score(agg, n_bootstrap=0)
    assert r.n_query == 1 and r.query_text == ("mean over queries",)
    np.testing.assert_allclose(r.actual.numpy()[:, 0], retrains.measurements.double().numpy().mean(1), rtol=1e-5)
    assert r.mean == pytest.approx(retrains.score(tau.mean(0), n_bootstrap=0).mean)
    assert r.mean > 0.9


def test_result_save_load_plot(ridge, tmp_path):
    _, tau, retrains = ridge
    r = retrains.score(tau, n_bootstrap=20)
    r.save(tmp_path / "lds.json")
    back = LDSResult.load(tmp_path / "lds.json")
    assert back.mean == pytest.approx(r.mean) and back.subsets == r.subsets and back.settings == r.settings
    torch.testing.assert_close(back.predicted, r.predicted)
    assert back.bootstrap_sd == pytest.approx(r.bootstrap_sd)
    assert r.plot().data and "lds_scores: " in r.summary() and "LDSResult(" in repr(r)
    retrains.save(tmp_path / "retrains.json")
    again = SubsetRetrains.load(tmp_path / "retrains.json")
    assert again.subsets == retrains.subsets
    torch.testing.assert_close(again.measurements, retrains.measurements)


def test_bad_scores_and_settings(ridge):
    ids, tau, retrains = ridge
    with pytest.raises(ValueError, match="n_query=50, n_train=200"):
        retrains.score(tau[:, :10])
    with pytest.raises(ValueError, match="differ from the retrains' 50"):
        retrains.score(_result(tau[:3], ids, ["a", "b", "c"]))
    with pytest.raises(ValueError, match="training rows"):
        retrains.score(_result(tau, [i + 1 for i in ids], retrains.query_text))
    other = _result(tau, ids, retrains.query_text)
    other.settings["query_measurement"] = "contrastive"
    with pytest.raises(ValueError, match="measurement 'contrastive'"):
        retrains.score(other)
    with pytest.raises(ValueError, match="NaN"):
        retrains.score(np.full(tau.shape, np.nan))
    with pytest.raises(ValueError, match=r"SubsetConfig.n_subsets must be an integer in \[3, inf\]"):
        draw_subsets(ids, 2)
    for alpha in (0, 1.0, True):
        with pytest.raises(ValueError, match="alpha"):
            draw_subsets(ids, 5, alpha=alpha)
    with pytest.raises(ValueError, match="seed"):
        draw_subsets(ids, 5, seed=1.5)
    with pytest.raises(ValueError, match="n_bootstrap"):
        retrains.score(tau, n_bootstrap=-1)
    with pytest.raises(ValueError, match="query= is for a run"):
        linear_datamodeling_score(retrains, tau, query=Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}))


def test_draw_subsets_is_seeded_and_prefix_stable():
    ids = list(range(50, 90))
    a, b = draw_subsets(ids, 6, 0.5, seed=4), draw_subsets(ids, 9, 0.5, seed=4)
    assert b[:6] == a and all(len(s) == 20 and len(set(s)) == 20 and set(s) <= set(ids) for s in b)
    assert draw_subsets(ids, 6, 0.5, seed=5) != a


# ---------------------------------------------------------------------------- the measurement
def test_query_measurements_match_hand_log_probabilities(pair):
    model = pair.backdoored
    for measurement in ("logprob", "contrastive", "logodds"):
        q = backdoor_query(pair, measurement, max_queries=5)
        got = query_measurements(model, q, pair.tokenizer, batch_size=3)
        want = torch.zeros(q.n_query, dtype=torch.float64)
        for r, row in enumerate(q.rows):  # one unpadded row at a time, by hand
            prompt = pair.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            comp = pair.tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[pair.tokenizer.bos_token_id] + prompt + comp])
            with torch.no_grad():
                logp = model(ids)[0, :-1].double().log_softmax(-1)
            tok = logp[torch.arange(len(prompt), ids.shape[1] - 1), ids[0, len(prompt) + 1:]]
            value = (tok - torch.log1p(-tok.exp())).sum() if measurement == "logodds" else tok.sum()
            want[q.query_of_row[r]] += q.weights[r] * value
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_measurement_is_what_the_scores_explain_with_their_sign(pair):
    """One small SGD step on a training row's loss (plain autograd of its summed NLL) changes
    ``query_measurements`` by ``lr × graddot score``: same quantity, same sign."""
    model = pair.backdoored
    q = backdoor_query(pair, max_queries=2)
    rows = pair.train_data.select(range(4))
    res = attribute(model, train=rows, query=q, method="graddot", progress=False)
    params = map_params(model, find_modules(model, "linear"))
    enc = encode(rows, pair.tokenizer, loss_on="completion")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    f0 = query_measurements(model, q).double()
    for j in range(len(rows)):
        tokens, mask = enc.batch([j])
        logits = model(tokens)[:, :-1]
        loss = F.cross_entropy(logits[mask].float(), tokens[:, 1:][mask], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        lr = 1e-3 / float(res.scores[:, j].abs().max())
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        delta = query_measurements(model, q).double() - f0
        model.load_state_dict(state)
        torch.testing.assert_close(delta, lr * res.scores[:, j].double(), rtol=0.1, atol=2e-5)


# ---------------------------------------------------------------------------- retraining
def test_training_on_every_row_reproduces_the_twin(pair):
    m = train_on_subset(pair, pair.train_data["example_id"], progress=False)
    ref = pair.backdoored.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


def test_subset_retrains_cache_and_score_a_method(pair):
    res = attribute(pair, method="loss", max_queries=6, progress=False)
    first = subset_retrains(pair, max_queries=6, n_subsets=3, progress=False)
    assert first.measurements.shape == (3, 6) and first.n_train == len(pair.train_data)
    assert all(len(s) == 60 for s in first.subsets)
    assert sum(first.n_poison) > 0 and first.settings["twin"] == "backdoored"
    saved = sorted((pair.out_dir / "influence" / "lds" / "backdoored").glob("subset-*.safetensors"))
    assert len(saved) == 3
    stamp = [p.stat().st_mtime_ns for p in saved]
    again = subset_retrains(pair, max_queries=6, n_subsets=3, progress=False)  # the cached weights
    assert [p.stat().st_mtime_ns for p in saved] == stamp
    torch.testing.assert_close(again.measurements, first.measurements)
    # the subsets' measurements differ from the full model's: retraining on half is a real counterfactual
    assert not torch.allclose(first.measurements, first.full.expand(3, -1))
    r = linear_datamodeling_score(pair, res, n_subsets=3, progress=False)  # its query from the result
    torch.testing.assert_close(r.actual, first.measurements)
    assert r.method == "loss" and r.n_subsets == 3 and r.n_query == 6
    frame = first.to_frame()
    assert len(frame) == 18 and {"measurement", "full", "n_poison"} <= set(frame.columns)
    with pytest.raises(ValueError, match="queries differ"):
        first.score(attribute(pair, method="loss", max_queries=5, progress=False))


def test_bad_subjects(pair):
    with pytest.raises(ValueError, match="retrains the model, which needs a run.*lacks task, attack, model_config, "
                                         "train_config"):
        subset_retrains(pair.backdoored, n_subsets=3)
    with pytest.raises(ValueError, match="twin must be one of"):
        subset_retrains(pair, twin="poisoned", n_subsets=3)
    with pytest.raises(ValueError, match="not in the backdoored twin's training set"):
        train_on_subset(pair, [10**9])
    with pytest.raises(ValueError, match="query must be a Query"):
        subset_retrains(pair, query=["a"], n_subsets=3)
    assert isinstance(backdoor_query(pair), Query)
