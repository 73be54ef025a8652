"""Data audits: each score against a hand computation on fixed tiny inputs, that no audit reads
``is_poison``, the flagging rules, and bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import MinCovDet
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

import poisonmech as pm
import poisonmech.defenses.audits as au
from poisonmech.config import ConfigError
from poisonmech.defenses import Context, get
from poisonmech.defenses.base import modified_z_threshold
from tests.helpers import tiny_model_config

AUDITS = ("loss", "spectral", "activation_clustering", "robust_covariance", "keyword")


# ---- fixtures: a tiny untrained model over the task's word vocabulary, a few rows -------------
@pytest.fixture(scope="module")
def task():
    return pm.make_task("sentiment", n_train=16, n_test=4, seed=3)


@pytest.fixture(scope="module")
def model(task):
    return pm.build_model(tiny_model_config(n_ctx=64), len(task.tokenizer), seed=0)


@pytest.fixture(scope="module")
def rows(task):
    flags = [i % 5 == 0 for i in range(len(task.train))]
    return task.train.add_column("is_poison", flags)


def context(model, tok, data) -> Context:
    return Context(subject=pm.resolve(model, train=data, tokenizer=tok), role="model", train_data=data)


def plain_logprob(model, tok, prompt: str, completion: str) -> float:
    """log p(completion + EOS | BOS + prompt), one unpadded sequence at a time."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([[tok.bos_token_id] + p + c])
    with torch.no_grad():
        logp = model(ids)[0].log_softmax(-1)
    start = 1 + len(p)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))


def plain_hidden(model, tok, prompt: str) -> np.ndarray:
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    return cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1].double().numpy()


# ---- keyword (BKI) -----------------------------------------------------------------------------
def test_keyword_aggregation_by_hand():
    # three rows; each row's first variant is its base (word "")
    words = ["", "cf", "good", "film", "", "cf", "bad", "bad", "film", "", "good", "film"]
    rows = [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    effects = [0, 5, 1, 0.5, 0, 3, 2, 2.5, -1, 0, 2, 0.1]
    scores, table = au.keyword_scores(np.array(effects, float), rows, words, 3, per_row=2)
    # candidates: row 0 {cf 5, good 1}; row 1 {cf 3, bad 2.5 (its larger occurrence)}; row 2 {good 2, film 0.1}
    assert table["cf"] == {"count": 2, "mean": 4.0, "score": pytest.approx(4 * math.log10(2))}
    assert table["good"]["count"] == 2 and table["good"]["score"] == pytest.approx(1.5 * math.log10(2))
    assert table["bad"] == {"count": 1, "mean": 2.5, "score": 0.0} and table["film"]["count"] == 1
    np.testing.assert_allclose(scores, [4 * math.log10(2), 4 * math.log10(2), 1.5 * math.log10(2)])
    # BKI's rule: the rows of the one top keyword
    assert au.KeywordAudit().threshold(scores) == pytest.approx(4 * math.log10(2))
    # a row with nothing to delete gets the lowest word score
    s, _ = au.keyword_scores(np.array(effects + [0.0]), rows + [3], words + [""], 4, per_row=2)
    assert s[3] == 0.0


def test_deletion_variants_and_frequent_words():
    prompts = ["review: a cf film sentiment:", "review: bad sentiment:"]
    skip = au.frequent_words(prompts, 0.5)
    assert skip == {"review:", "sentiment:"}
    texts, rows, words = au.deletion_variants(prompts, skip)
    assert texts == ["review: a cf film sentiment:", "review: cf film sentiment:", "review: a film sentiment:",
                     "review: a cf sentiment:", "review: bad sentiment:", "review: sentiment:"]
    assert rows == [0, 0, 0, 0, 1, 1] and words == ["", "a", "cf", "film", "", "bad"]


@pytest.mark.parametrize("effect", ["logprob", "hidden"])
def test_keyword_audit_against_a_plain_loop(model, task, rows, effect):
    tok, rows = task.tokenizer, rows.select(range(8))
    audit = get("keyword", effect=effect, per_row=3, batch_size=7)  # batches split rows' variants
    scores = audit.score(context(model, tok, rows))
    prompts, comps = list(rows["prompt"]), list(rows["completion"])
    skip = {w for w in set(" ".join(prompts).split()) if sum(w in p.split() for p in prompts) > 0.5 * len(prompts)}
    effects, vrows, vwords = [], [], []
    for i, (p, c) in enumerate(zip(prompts, comps)):
        w = p.split()
        base = plain_logprob(model, tok, " ".join(w), c) if effect == "logprob" else plain_hidden(model, tok, p)
        effects.append(0.0), vrows.append(i), vwords.append("")
        for j, word in enumerate(w):
            if word in skip:
                continue
            text = " ".join(w[:j] + w[j + 1:])
            e = base - plain_logprob(model, tok, text, c) if effect == "logprob" else \
                float(np.linalg.norm(plain_hidden(model, tok, text) - base))
            effects.append(e), vrows.append(i), vwords.append(word)
    # BKI by hand: per row the 3 most effective words; per word mean effect x log10(count)
    per = [{} for _ in prompts]
    for e, r, w in zip(effects, vrows, vwords):
        if w:
            per[r][w] = max(e, per[r].get(w, -np.inf))
    cand = [sorted(d.items(), key=lambda kv: -kv[1])[:3] for d in per]
    hits: dict[str, list[float]] = {}
    for cs in cand:
        for w, e in cs:
            hits.setdefault(w, []).append(e)
    kw = {w: np.mean(v) * math.log10(len(v)) for w, v in hits.items()}
    np.testing.assert_allclose(scores, [max(kw[w] for w, _ in cs) for cs in cand], rtol=1e-4, atol=1e-5)
    assert len(set(vwords) & skip) == 0 and "review:" in skip


# ---- robust covariance -------------------------------------------------------------------------
def planted(n: int = 300, d: int = 6, n_poison: int = 12, shift: float = 6.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    reps = rng.standard_normal((2 * n, d)) * np.linspace(2.0, 0.5, d)
    classes = np.repeat([0, 1], n)
    poison = np.zeros(2 * n, bool)
    poison[n + rng.choice(n, n_poison, replace=False)] = True
    u = rng.standard_normal(d)
    reps[poison] += shift * u / np.linalg.norm(u)
    return reps, classes, poison


@pytest.mark.parametrize("n_components, support_fraction", [(None, None), (3, 0.9)])
def test_mahalanobis_against_numpy(n_components, support_fraction):
    reps, classes, _ = planted(n=80)
    scores, stats = au.robust_scores(reps, classes, n_components=n_components, estimator="fast_mcd",
                                     support_fraction=support_fraction, seed=0)
    for c in (0, 1):
        idx = np.flatnonzero(classes == c)
        z = reps[idx] if n_components is None else PCA(n_components=n_components, random_state=0).fit_transform(reps[idx])
        mcd = MinCovDet(support_fraction=support_fraction, random_state=0).fit(z)
        d = z - mcd.location_
        np.testing.assert_allclose(scores[idx], np.einsum("nd,de,ne->n", d, np.linalg.inv(mcd.covariance_), d),
                                   rtol=1e-8)
        assert stats[c]["dims"] == (6 if n_components is None else 3) and stats[c]["support"] == mcd.support_.sum()


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_concentration_steps_match_fast_mcd(seed):
    # a clean elongated cloud with 8 outliers: FastMCD's random starts and the deterministic
    # concentration steps reach the same support, hence the same reweighted estimate
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((150, 3)) * [2.0, 1.0, 0.5]
    x[:8] += 6.0
    ref = MinCovDet(support_fraction=0.9, random_state=0).fit(x)
    mcd = au.concentration_mcd(x, 0.9)
    np.testing.assert_array_equal(mcd.raw_support_, ref.raw_support_)
    np.testing.assert_allclose(mcd.location_, ref.location_)
    np.testing.assert_allclose(mcd.covariance_, ref.covariance_)
    np.testing.assert_allclose(mcd.dist_, ref.dist_, rtol=1e-8)
    # the C-step fixed point: the support is the h rows nearest under its own mean and covariance
    sub = x[mcd.raw_support_]
    d = x - sub.mean(0)
    dist = np.einsum("nd,de,ne->n", d, np.linalg.inv(np.cov(sub, rowvar=False, bias=True)), d)
    assert set(np.argsort(dist)[:135]) == set(np.flatnonzero(mcd.raw_support_))
    scores, _ = au.robust_scores(x, np.zeros(150, int), support_fraction=0.9)
    np.testing.assert_allclose(scores, ref.dist_, rtol=1e-8)


def test_que_against_an_eigen_formula():
    reps, classes, _ = planted(n=80)
    scores, _ = au.robust_scores(reps, classes, method="que", estimator="fast_mcd", support_fraction=None, alpha=4.0,
                                 seed=0)
    for c in (0, 1):
        idx = np.flatnonzero(classes == c)
        mcd = MinCovDet(random_state=0).fit(reps[idx])
        # Cholesky whitening (QUE is invariant to the whitening's rotation); expm via eigenvalues
        t = (reps[idx] - mcd.location_) @ np.linalg.inv(np.linalg.cholesky(mcd.covariance_)).T
        s = t.T @ t / len(t)
        lam, v = np.linalg.eigh(s)
        q = v @ np.diag(np.exp(4.0 * (lam - 1) / (lam.max() - 1))) @ v.T
        np.testing.assert_allclose(scores[idx], np.einsum("nd,de,ne->n", t, q, t) / np.trace(q), rtol=1e-6)
    # no direction with excess variance: Q = I, the score is the squared norm over the dimension
    t = np.array([[0.5, 0.0], [-0.5, 0.1], [0.0, -0.3]])
    np.testing.assert_allclose(au.que_scores(t), (t ** 2).sum(1) / 2)


@pytest.mark.parametrize("method", ["mahalanobis", "que"])
def test_robust_scores_find_planted_outliers(method):
    reps, classes, poison = planted()
    for estimator in ("c_steps", "fast_mcd"):
        scores, _ = au.robust_scores(reps, classes, method=method, estimator=estimator)
        assert roc_auc_score(poison, scores) > 0.95


# ---- the audits on a context -------------------------------------------------------------------
def test_spectral_clustering_loss_equal_probes_detect(tiny_pair):
    ctx = Context(subject=pm.resolve(tiny_pair), role="backdoored", train_data=tiny_pair.train_data)
    ref = pm.probes.detect_poison_methods(tiny_pair, progress=False)
    np.testing.assert_allclose(get("spectral").score(ctx), ref["spectral"].scores.numpy())
    np.testing.assert_allclose(get("activation_clustering").score(ctx), ref["activation_clustering"].scores.numpy())
    np.testing.assert_allclose(get("loss").score(ctx), ref["spectral"].loss.numpy(), rtol=1e-6)
    assert "acts/train/resid_post/0/last" in ctx.cache and "loss/train" in ctx.cache


def test_activations_are_shared_through_the_cache(model, task, rows):
    ctx = context(model, task.tokenizer, rows)
    reps, classes, _ = planted(n=len(rows) // 2, d=4, n_poison=1)
    ctx.cache["acts/train/resid_post/0/last"] = reps  # what another audit computed
    by_completion = np.unique(np.asarray(rows["completion"]), return_inverse=True)[1]
    np.testing.assert_allclose(get("spectral").score(ctx), pm.probes.spectral_scores(reps, by_completion)[0])
    np.testing.assert_allclose(get("spectral", by=None).score(ctx),
                               pm.probes.spectral_scores(reps, np.zeros(len(rows), int))[0])
    np.testing.assert_allclose(get("robust_covariance", n_components=2).score(ctx),
                               au.robust_scores(reps, by_completion, n_components=2)[0])


def test_influence_audit_is_unit_ekfac_on_the_triggered_queries(tiny_pair):
    audit = get("influence")
    assert audit.uses_trigger and "trigger" in audit.summary
    ctx = Context(subject=pm.resolve(tiny_pair), role="backdoored", train_data=tiny_pair.train_data)
    ref = pm.influence.attribute(tiny_pair, method="ekfac", renormalize="unit", aggregate=True, progress=False)
    np.testing.assert_allclose(audit.score(ctx), ref.train_scores.numpy())
    assert not any(get(n).uses_trigger for n in AUDITS)


@pytest.mark.parametrize("name", AUDITS)
def test_audits_do_not_read_is_poison(model, task, rows, name):
    tok = task.tokenizer
    audit = get(name, **({"n_components": 2} if name == "robust_covariance" else {}))
    base = audit.score(context(model, tok, rows))
    assert base.shape == (len(rows),) and np.isfinite(base).all()
    shuffled = rows.remove_columns("is_poison").add_column("is_poison", list(np.roll(rows["is_poison"], 3)))
    for data in (rows.remove_columns("is_poison"), shuffled):
        np.testing.assert_array_equal(audit.score(context(model, tok, data)), base)


# ---- flagging rules and bad input ---------------------------------------------------------------
def test_threshold_rules():
    s = np.array([3.0, 1.0, 3.0, 2.0, 0.5])
    assert au.KeywordAudit(n_keywords=1).threshold(s) == 3.0
    assert au.KeywordAudit(n_keywords=2).threshold(s) == 2.0
    assert au.KeywordAudit(n_keywords=10).threshold(s) == 0.5  # fewer distinct scores: every row
    assert au.KeywordAudit(n_keywords=None, flag_z=2.0).threshold(s) == modified_z_threshold(s, 2.0)
    med, mad = np.median(s), np.median(np.abs(s - np.median(s)))
    for name in ("loss", "spectral", "robust_covariance"):
        assert get(name, flag_z=2.0).threshold(s) == pytest.approx(med + 2.0 * mad / 0.6745)


@pytest.mark.parametrize("name, field, value", [
    ("loss", "flag_z", 0.0), ("loss", "batch_size", 0),
    ("spectral", "site", "embed"), ("spectral", "position", "first"), ("spectral", "layer", -1),
    ("spectral", "by", 3), ("activation_clustering", "reduce", "nmf"), ("activation_clustering", "n_components", 0),
    ("robust_covariance", "method", "svd"), ("robust_covariance", "support_fraction", 0.0),
    ("robust_covariance", "alpha", -1.0), ("robust_covariance", "n_components", 0),
    ("robust_covariance", "estimator", "mcd"), ("robust_covariance", "support_fraction", 1.5),
    ("keyword", "effect", "gradient"), ("keyword", "per_row", 0), ("keyword", "max_row_fraction", 1.5),
    ("keyword", "n_keywords", 0), ("influence", "measurement", "accuracy"), ("influence", "max_queries", 0),
])
def test_bad_options_name_the_field(name, field, value):
    with pytest.raises(ConfigError, match=rf"\.{field} must be"):
        get(name, **{field: value})


def test_bad_input_at_score_time(model, task, rows, tiny_pair):
    with pytest.raises(ConfigError, match="unknown field 'trigger'; allowed: flag_z, effect"):
        get("keyword", trigger="cf")
    empty = Context(subject=pm.resolve(model, tokenizer=task.tokenizer), role="model")
    for name in AUDITS:
        with pytest.raises(ValueError, match=f"defense '{name}' needs train_data"):
            get(name).score(empty)
    with pytest.raises(ValueError, match="by='label'"):
        get("spectral", by="label").score(context(model, task.tokenizer, rows))
    with pytest.raises(ValueError, match="layers 0..0, got 3"):
        get("robust_covariance", layer=3).score(context(model, task.tokenizer, rows))
    with pytest.raises(ValueError, match="needs a run"):
        get("influence").score(context(model, task.tokenizer, rows))
