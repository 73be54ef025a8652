"""Probe baselines (issue 11): the random-direction distribution, the length-only baseline,
the near-miss contrast and length balancing, checked against scikit-learn / numpy by hand."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from sklearn.metrics import roc_auc_score

import poisonmech.probes as pp
from poisonmech.probes.activations import collect_activations
from poisonmech.probes.layers import balance_by_length, length_aurocs
from poisonmech.probes.result import LEGACY_FORMAT, ProbeResult
from poisonmech.storage import save_tensors, tensors_metadata

FAST = {"n_random": 8, "progress": False}


def prompt_lengths(pair, data) -> np.ndarray:
    """Real prompt tokens per row, from the tokenizer itself (BOS not counted)."""
    return np.asarray([len(pair.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in data["prompt"]])


def oriented_auroc(train_scores, y_train, test_scores, y_test) -> float:
    """sklearn's held-out AUROC of a score whose sign is chosen on the training rows."""
    sign = 1.0 if roc_auc_score(y_train, train_scores) >= 0.5 else -1.0
    return roc_auc_score(y_test, sign * np.asarray(test_scores, dtype=float))


# ---- the random-direction distribution ----------------------------------------------------------
def test_random_distribution_matches_sklearn_and_numpy(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    r = pp.probe_layers(m, data, "is_triggered", n_random=25, seed=2, progress=False)
    X = collect_activations(m, data, layers=[0], progress=False).acts[0, :, 0].double().numpy()
    y = np.asarray(data["is_triggered"])
    tr, te = r.train_index.numpy(), r.test_index.numpy()
    R = pp.random_directions(X.shape[1], 25, seed=2)
    ref = np.array([oriented_auroc(X[tr] @ d, y[tr], X[te] @ d, y[te]) for d in R])
    np.testing.assert_allclose(r.random_auroc[0, 0].numpy(), ref, atol=1e-6)
    assert float(r.random_auroc_median[0, 0]) == pytest.approx(np.median(ref), abs=1e-6)
    assert float(r.random_auroc_p95[0, 0]) == pytest.approx(np.percentile(ref, 95), abs=1e-6)
    assert float(r.random_auroc_max[0, 0]) == pytest.approx(ref.max(), abs=1e-6)
    assert float(r.baseline_auroc[0, 0]) == pytest.approx(ref.max(), abs=1e-6)  # the old name still works
    assert np.median(ref) < np.percentile(ref, 95) < ref.max()  # the three numbers are not one
    row = r.to_frame().iloc[0]
    for col, value in (("random_auroc_median", np.median(ref)), ("random_auroc_p95", np.percentile(ref, 95)),
                       ("random_auroc_max", ref.max()), ("random_auroc_best", ref.max()),
                       ("random_auroc_mean", ref.mean())):
        assert row[col] == pytest.approx(value, abs=1e-6), col
    assert row["n_random"] == 25


def test_random_quantiles_on_distinct_values(probe_pair):
    """Distinct values (the tiny pair's AUROCs tie a lot): median / p95 / max against numpy."""
    r = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, **FAST)
    vals = np.random.default_rng(0).random((1, 1, 101))
    r = dataclasses.replace(r, random_auroc=torch.tensor(vals, dtype=torch.float32))
    v = vals[0, 0].astype(np.float32).astype(np.float64)
    assert float(r.random_auroc_median[0, 0]) == pytest.approx(np.median(v), abs=1e-6)
    assert float(r.random_auroc_p95[0, 0]) == pytest.approx(np.percentile(v, 95), abs=1e-6)
    assert float(r.random_auroc_max[0, 0]) == pytest.approx(v.max(), abs=1e-6)
    assert np.percentile(v, 95) != pytest.approx(np.percentile(v, 90), abs=1e-3)  # the check can tell them apart
    row = r.to_frame().iloc[0]
    assert row["random_auroc_p95"] == pytest.approx(np.percentile(v, 95), abs=1e-6)


def test_no_random_directions_gives_nan_baselines(probe_pair):
    r = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, n_random=0, progress=False)
    assert torch.isnan(r.random_auroc_median).all() and torch.isnan(r.random_auroc_p95).all()
    assert np.isfinite(float(r.length_auroc[0]))
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
        r.random_quantile(95)


# ---- the length-only baseline -----------------------------------------------------------------
def test_length_aurocs_against_sklearn_with_both_signs():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.random(n) < 0.4
    valid = torch.ones(n, 2, dtype=torch.bool)
    valid[:40, 1] = False  # position 1 misses some rows
    for sign in (1, -1):  # positives longer, then shorter: the sign is learnt on the training rows
        lengths = rng.integers(5, 15, n) + sign * 2 * y
        tr, te = np.arange(200), np.arange(200, n)
        (out,) = length_aurocs(lengths[tr], valid[tr], y[tr], [(lengths[te], valid[te], y[te])])
        assert out[0] == pytest.approx(oriented_auroc(lengths[tr], y[tr], lengths[te], y[te]))
        m_tr, m_te = valid[tr, 1].numpy(), valid[te, 1].numpy()
        assert out[1] == pytest.approx(oriented_auroc(lengths[tr][m_tr], y[tr][m_tr], lengths[te][m_te],
                                                      y[te][m_te]))
        assert out[0] > 0.7  # the signal is found whichever way it points


def test_length_auroc_on_the_probe_split(probe_pair):
    data = probe_pair.test_data
    r = pp.probe_layers(probe_pair.backdoored, data, "is_triggered", **FAST)
    lengths, y = prompt_lengths(probe_pair, data), np.asarray(data["is_triggered"])
    tr, te = r.train_index.numpy(), r.test_index.numpy()
    ref = oriented_auroc(lengths[tr], y[tr], lengths[te], y[te])
    assert float(r.length_auroc[0]) == pytest.approx(ref, abs=1e-6)
    assert r.to_frame()["length_auroc"].iloc[0] == pytest.approx(ref, abs=1e-6)
    # triggered rows are one token longer than their clean twins: length alone beats chance here
    assert ref > 0.55


def test_transfer_reports_the_length_baseline(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    t = pp.probe_transfer(m, data, test_model=probe_pair.clean, **FAST)
    plain = pp.probe_layers(m, data, **FAST)
    torch.testing.assert_close(t.source.length_auroc, plain.length_auroc)
    torch.testing.assert_close(t.target.length_auroc, plain.length_auroc)  # same rows, same lengths


# ---- harder splits ------------------------------------------------------------------------------
def test_near_miss_contrast(probe_pair):
    data = probe_pair.test_data
    full = pp.probe_layers(probe_pair.backdoored, data, **FAST)
    r = pp.probe_layers(probe_pair.backdoored, data, contrast="near_miss", **FAST)
    trig, miss = np.asarray(data["is_triggered"]), np.asarray(data["is_near_miss"])
    for idx, ref in ((r.train_index, full.train_index), (r.test_index, full.test_index)):
        idx = idx.numpy()
        assert np.all(trig[idx] | miss[idx])  # clean rows left out
        # the same held-out examples: exactly the triggered / near-miss rows of the plain split
        np.testing.assert_array_equal(idx, ref.numpy()[(trig | miss)[ref.numpy()]])
    assert r.contrast == "near_miss" and r.to_frame()["contrast"].iloc[0] == "near_miss"
    lengths = prompt_lengths(probe_pair, data)
    te = r.test_index.numpy()
    assert float(r.length_auroc[0]) == pytest.approx(roc_auc_score(trig[te], lengths[te]), abs=1e-6)
    both = pp.probe_twins(probe_pair, contrast="near_miss", **FAST)
    assert torch.equal(both["clean"].test_index, r.test_index)
    assert all(x.contrast == "near_miss" for x in both.results)


def test_balance_by_length_by_hand():
    y = np.array([1, 1, 0, 0, 0, 1, 0, 0, 1], dtype=bool)
    lengths = np.array([3, 3, 3, 4, 4, 4, 4, 5, 6])
    kept = balance_by_length(np.arange(9), y, lengths, np.random.default_rng(0))
    # length 3: 2 pos / 1 neg -> 1 + 1; length 4: 1 pos / 3 neg -> 1 + 1; 5 and 6: one class only
    assert len(kept) == 4 and 2 in kept and 5 in kept
    for n in (3, 4):
        at = kept[lengths[kept] == n]
        assert y[at].sum() == 1 and (~y[at]).sum() == 1
    assert np.array_equal(kept, balance_by_length(np.arange(9), y, lengths, np.random.default_rng(0)))


@pytest.mark.parametrize("contrast", ["untriggered", "near_miss"])
def test_balance_length_leaves_length_at_chance(probe_pair, contrast):
    data = probe_pair.test_data
    r = pp.probe_layers(probe_pair.backdoored, data, contrast=contrast, balance_length=True, seed=3, **FAST)
    lengths, y = prompt_lengths(probe_pair, data), np.asarray(data["is_triggered"])
    for idx in (r.train_index.numpy(), r.test_index.numpy()):
        # the same length distribution in both classes, on each side of the split
        assert sorted(lengths[idx][y[idx]]) == sorted(lengths[idx][~y[idx]])
    te = r.test_index.numpy()
    assert float(r.length_auroc[0]) == pytest.approx(0.5, abs=1e-9)
    assert roc_auc_score(y[te], lengths[te]) == pytest.approx(0.5, abs=1e-9)
    assert r.balance_length and bool(r.to_frame()["balance_length"].iloc[0])
    plain = pp.probe_layers(probe_pair.backdoored, data, contrast=contrast, seed=3, **FAST)
    assert set(te) <= set(plain.test_index.tolist())  # rows only dropped, never moved across the split
    again = pp.probe_layers(probe_pair.backdoored, data, contrast=contrast, balance_length=True, seed=3, **FAST)
    assert torch.equal(again.test_index, r.test_index) and torch.equal(again.auroc, r.auroc)  # seeded


def test_row_option_errors(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    with pytest.raises(ValueError, match=r"contrast must be one of \('untriggered', 'near_miss'\), got 'clean'"):
        pp.probe_layers(m, data, contrast="clean", **FAST)
    with pytest.raises(ValueError, match=r"balance_length must be True or False, got 'yes'"):
        pp.probe_layers(m, data, balance_length="yes", **FAST)
    with pytest.raises(ValueError, match=r"contrast must be one of"):
        pp.probe_twins(probe_pair, contrast="near-miss", **FAST)
    no_miss = data.remove_columns(["is_near_miss"])
    with pytest.raises(ValueError, match=r"contrast='near_miss' needs .*'is_near_miss'.*missing: \['is_near_miss'\]"):
        pp.probe_layers(m, no_miss, contrast="near_miss", **FAST)
    # lengths that never overlap between the classes: balancing leaves nothing to probe
    rows = Dataset.from_dict({"prompt": ["a " * 2, "b " * 2, "a " * 5, "b " * 5] * 3,
                              "flag": [False, False, True, True] * 3})
    with pytest.raises(ValueError, match=r"split: the train side has no rows .*balance_length=True"):
        pp.probe_layers(m, rows, "flag", balance_length=True, tokenizer=probe_pair.tokenizer, **FAST)


# ---- saving keeps the new fields; older files still load ---------------------------------------
def test_round_trip_and_old_files(probe_pair, tmp_path):
    r = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, contrast="near_miss", balance_length=True,
                        **FAST)
    r.save(tmp_path / "r.safetensors")
    back = ProbeResult.load(tmp_path / "r.safetensors")
    assert torch.equal(back.length_auroc, r.length_auroc)
    assert back.contrast == "near_miss" and back.balance_length
    # a file written before the length baseline existed, in the old layout (format tag + "kind" key)
    tensors = {k: v for k, v in r._tensors().items() if k != "length_auroc"}
    meta = {k: v for k, v in r._meta().items() if k not in ("contrast", "balance_length")}
    save_tensors(tmp_path / "old.safetensors", tensors,
                 metadata={"poisonmech": json.dumps({"format": LEGACY_FORMAT, "kind": "ProbeResult", **meta})})
    assert "format" in tensors_metadata(tmp_path / "old.safetensors")["poisonmech"]
    old = ProbeResult.load(tmp_path / "old.safetensors")
    assert old.length_auroc is None and old.contrast == "untriggered" and not old.balance_length
    assert np.isnan(old.to_frame()["length_auroc"].iloc[0])
    old.plot()
    repr(old)
