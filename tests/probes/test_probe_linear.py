"""LinearProbe against scikit-learn on the same features; estimator rules; bad labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from poisonmech.probes import LinearProbe
from poisonmech.probes.labels import auroc_columns


def features(n: int = 300, d: int = 16, seed: int = 0, spread: float = 5.0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, spread, d) + 3.0
    X[:, 2] += 1.5 * y
    return X, y


def test_logistic_matches_sklearn_raw_features():
    X, y = features()
    # default: L2 on the raw-space weights (solved on centred, rescaled features: the same optimum)
    probe = LinearProbe(C=0.5, tol=1e-10, max_iter=10_000).fit(X, y)
    ref = LogisticRegression(C=0.5, max_iter=10_000, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(probe.coef_, ref.coef_[0], rtol=1e-4, atol=1e-5)
    assert probe.intercept_ == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(probe.decision_function(X), ref.decision_function(X), rtol=1e-4, atol=1e-4)
    assert roc_auc_score(y, probe.decision_function(X)) == pytest.approx(roc_auc_score(y, ref.decision_function(X)))


def test_logistic_standardized_matches_sklearn_pipeline_in_raw_space():
    X, y = features(seed=1)
    probe = LinearProbe(C=1.0, standardize=True).fit(torch.tensor(X), torch.tensor(y))  # torch inputs work too
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, tol=1e-4)).fit(X, y)
    np.testing.assert_allclose(probe.decision_function(X), ref.decision_function(X), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(probe.predict(X), ref.predict(X))
    assert probe.score(X, y) == pytest.approx(ref.score(X, y))
    np.testing.assert_allclose(np.linalg.norm(probe.direction_), 1.0)
    assert probe.direction_ @ (X[y].mean(0) - X[~y].mean(0)) > 0  # points at the positive class


def test_mean_diff_direction_and_threshold():
    X, y = features(seed=2, spread=1.0)
    probe = LinearProbe(method="mean_diff").fit(X, y)
    np.testing.assert_allclose(probe.coef_, X[y].mean(0) - X[~y].mean(0))
    mid = (X[y].mean(0) + X[~y].mean(0)) / 2
    assert probe.decision_function(mid[None])[0] == pytest.approx(0.0, abs=1e-9)
    assert roc_auc_score(y, probe.project(X)) > 0.8


def test_estimator_rules():
    X, y = features(n=80)
    probe = LinearProbe(C=2.0)
    assert probe.fit(X, y) is probe
    learned = {k for k in vars(probe) if k.endswith("_")}
    assert {"coef_", "intercept_", "direction_", "classes_", "n_features_in_"} <= learned
    assert clone(probe).get_params() == probe.get_params()
    assert not hasattr(clone(probe), "coef_")
    with pytest.raises(NotFittedError):
        LinearProbe().predict(X)
    np.testing.assert_allclose(probe.predict_proba(X).sum(1), 1.0)


@pytest.mark.parametrize("y, match", [(np.zeros(10, bool), "two classes"), (np.arange(10) % 3, "two classes")])
def test_bad_labels(y, match):
    with pytest.raises(ValueError, match=match):
        LinearProbe().fit(np.ones((10, 3)), y)


def test_bad_inputs():
    X, y = features(n=20, d=3)
    with pytest.raises(ValueError, match="method"):
        LinearProbe(method="svm").fit(X, y)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LinearProbe().fit(X, y)


def test_auroc_columns_match_sklearn():
    """The many-column AUROC (random-direction baselines) equals roc_auc_score column by column."""
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.standard_normal((200, 3)) + y[:, None], 1)  # ties included
    np.testing.assert_allclose(auroc_columns(s, y), [roc_auc_score(y, s[:, i]) for i in range(3)])
    assert np.isnan(auroc_columns(s, np.zeros(200, bool))).all()  # one class: NaN, as ranking.auroc
