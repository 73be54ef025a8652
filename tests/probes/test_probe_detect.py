"""Poison detectors: synthetic activations with planted outliers, then the tiny pair's training set."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import poisonmech.probes as pp
from poisonmech.probes.detect import DetectionResult


def planted(n: int = 600, d: int = 24, n_poison: int = 20, shift: float = 6.0, seed: int = 0):
    """Two classes of Gaussian 'activations'; a few rows of class 1 shifted along one direction."""
    rng = np.random.default_rng(seed)
    reps = rng.standard_normal((n, d)) * np.linspace(2.0, 0.5, d)  # anisotropic clean spread
    classes = (np.arange(n) % 2).astype(np.int64)
    reps[classes == 1] += 3.0
    poison = np.zeros(n, bool)
    poison[rng.choice(np.flatnonzero(classes == 1), n_poison, replace=False)] = True
    u = rng.standard_normal(d)
    reps[poison] += shift * u / np.linalg.norm(u)
    return reps, classes, poison


def test_spectral_finds_planted_outliers():
    reps, classes, poison = planted(shift=10.0)  # poison mass 20 * 10^2 above the clean top variance
    scores, stats = pp.spectral_scores(reps, classes)
    assert roc_auc_score(poison, scores) > 0.95
    assert [s["n"] for s in stats] == [300, 300]
    # squared projection on the top singular vector of the centred class, scaled by its class mean
    idx = np.flatnonzero(classes == 1)
    c = reps[idx] - reps[idx].mean(0)
    v = np.linalg.svd(c, full_matrices=False)[2][0]
    np.testing.assert_allclose(scores[idx], (c @ v) ** 2 / ((c @ v) ** 2).mean())


@pytest.mark.parametrize("reduce", ["ica", "pca"])
def test_activation_clustering_finds_planted_cluster(reduce):
    reps, classes, poison = planted(shift=12.0)
    scores, stats = pp.clustering_scores(reps, classes, n_components=3, reduce=reduce, seed=0)
    assert roc_auc_score(poison, scores) > 0.95
    poisoned_class = stats[1]
    assert poisoned_class["small_fraction"] == pytest.approx(20 / 300, abs=0.02)
    assert poisoned_class["silhouette"] > stats[0]["silhouette"]


def test_detectors_are_seeded():
    reps, classes, _ = planted(n=200, n_poison=8)
    a, _ = pp.clustering_scores(reps, classes, n_components=3, seed=5)
    b, _ = pp.clustering_scores(reps, classes, n_components=3, seed=5)
    np.testing.assert_array_equal(a, b)


def test_result_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = np.zeros(100, bool)
    y[:10] = True
    s = rng.standard_normal(100) + 2 * y
    res = DetectionResult(scores=torch.tensor(s), loss=torch.tensor(-s), is_poison=torch.tensor(y),
                          class_index=torch.zeros(100, dtype=torch.long), classes=("all",), class_stats=(),
                          method="spectral", site="resid_post", layer=0, position="last", k=10)
    assert res.poison_auroc() == pytest.approx(roc_auc_score(y, s))
    assert res.poison_auroc("loss") == pytest.approx(1 - roc_auc_score(y, s))
    assert res.average_precision() == pytest.approx(average_precision_score(y, s))
    assert res.precision_at() == pytest.approx(y[np.argsort(-s)[:10]].mean())
    frame = res.to_frame()
    assert set(frame["score"]) == {"spectral", "loss baseline"} and len(frame) == 6
    with pytest.raises(ValueError, match="scores must be one of"):
        res.poison_auroc("gradient")
    unlabeled = DetectionResult(**{**res.__dict__, "is_poison": None, "k": None})
    with pytest.raises(ValueError, match="is_poison"):
        unlabeled.poison_auroc()
    assert isinstance(unlabeled.plot(), go.Figure)


@pytest.mark.parametrize("method", ["spectral", "activation_clustering"])
def test_detect_poison_on_probe_pair(probe_pair, method, tmp_path):
    data = probe_pair.train_data
    res = pp.detect_poison(probe_pair.backdoored, data, method, n_components=3, progress=False)
    assert res.scores.shape == (len(data),) and torch.isfinite(res.scores).all()
    assert res.loss.shape == (len(data),) and (res.loss >= 0).all()
    assert res.k == int(np.sum(data["is_poison"])) == 10
    assert set(res.classes) == set(data["completion"])
    for which in ("detector", "loss"):
        assert 0.0 <= res.poison_auroc(which) <= 1.0
        assert 0.0 <= res.precision_at(scores=which) <= 1.0
    per = res.to_frame(per_example=True)
    assert len(per) == len(data) and per["is_poison"].sum() == 10
    assert isinstance(res.plot(), go.Figure) and isinstance(res.plot("hist"), go.Figure)
    res.save(tmp_path / "det.safetensors")
    back = DetectionResult.load(tmp_path / "det.safetensors")
    assert torch.equal(back.scores, res.scores) and torch.equal(back.is_poison, res.is_poison)
    assert back.class_stats == res.class_stats and back.k == res.k


def test_detect_poison_bad_input(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.train_data
    with pytest.raises(ValueError, match=r"method must be one of \('spectral', 'activation_clustering'\)"):
        pp.detect_poison(m, data, "svd", progress=False)
    with pytest.raises(ValueError, match="layers 0..0, got 5"):
        pp.detect_poison(m, data, layer=5, progress=False)
    with pytest.raises(ValueError, match="by='label'"):
        pp.detect_poison(m, data, by="label", progress=False)


def test_detect_poison_methods_equals_one_call_per_method(probe_pair):
    both = pp.detect_poison_methods(probe_pair.backdoored, probe_pair.train_data, tokenizer=probe_pair.tokenizer,
                                    progress=False)
    assert set(both) == set(pp.DETECTORS)
    for method, shared in both.items():
        alone = pp.detect_poison(probe_pair.backdoored, probe_pair.train_data, method=method,
                                 tokenizer=probe_pair.tokenizer, progress=False)
        assert torch.equal(shared.scores, alone.scores) and torch.equal(shared.loss, alone.loss)
    with pytest.raises(ValueError, match="methods must be"):
        pp.detect_poison_methods(probe_pair.backdoored, probe_pair.train_data, ["spectral", "strip"])
