"""``LinearProbe``: a binary linear probe following scikit-learn's estimator rules.

Two methods share one interface:

- ``"logistic"``: L2-regularised logistic regression (scikit-learn's ``LogisticRegression``
  does the fitting, on the raw activations or, with ``standardize=True``, on standardised
  ones, mapped back), so ``coef_`` always applies to raw activations.
- ``"mean_diff"``: the difference of the class means (positive minus negative) as the
  direction, thresholded half-way between the projected class means. No fitting
  hyper-parameters; ``C`` and ``standardize`` do not apply to it.

``fit`` returns ``self``; learned state ends in ``_`` (``coef_``, ``intercept_``,
``direction_``, ``classes_``, ``n_features_in_``); ``clone``, ``get_params`` and
``set_params`` work, so the probe drops into scikit-learn pipelines and cross-validation.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from poisonmech.probes.config import PROBE_METHODS

#: below this many matrix entries, BLAS / OpenMP run on one thread: for probe-sized problems
#: extra threads cost more in hand-offs than they save (over 10x slower on a busy 2-core machine)
SMALL_PROBLEM = 4_000_000


def few_threads(n_entries: int):
    """A scoped thread limit for small problems (a context manager; nothing global changes)."""
    return threadpool_limits(limits=1 if n_entries < SMALL_PROBLEM else None)


def as_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a tensor or array-like (probes fit in double precision)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def binary_labels(y, name: str = "y") -> np.ndarray:
    """``y`` as a 1-d array with exactly two classes, or a ``ValueError`` naming ``name``."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array of labels, got shape {y.shape}")
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(f"{name}: a probe needs exactly two classes, got {len(classes)} "
                         f"({classes[:5].tolist()}{' ...' if len(classes) > 5 else ''})")
    return y


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A linear probe ``x -> x @ coef_ + intercept_ > 0`` for a binary label.

    Args:
        method: ``"logistic"`` (L2 logistic regression) or ``"mean_diff"`` (difference of
            class means).
        C: inverse L2 strength of the logistic regression (scikit-learn's ``C``).
        standardize: fit the logistic regression on standardised features (the weights are
            mapped back to the raw space, so the L2 penalty is on standardised weights);
            default off: L2 on the raw-space weights. Ignored by ``"mean_diff"``.
        class_weight: passed to ``LogisticRegression`` (``None`` or ``"balanced"``).
        max_iter: iterations of the L-BFGS solver.
        tol: its stopping tolerance.

    Learned state: ``classes_`` (negative, positive), ``coef_`` (``d_model``, raw space),
    ``intercept_`` (float), ``direction_`` (``coef_`` at unit norm: higher projection means
    the positive class), ``n_features_in_``, and for ``"logistic"`` the centring and scaling
    the solver saw (``mean_``, ``scale_``) and its iterations (``n_iter_``).
    """

    def __init__(self, method: Literal["logistic", "mean_diff"] = "logistic", C: float = 1.0,
                 standardize: bool = False, class_weight: str | dict | None = None, max_iter: int = 1000,
                 tol: float = 1e-4) -> None:
        self.method = method
        self.C = C
        self.standardize = standardize
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: Float[np.ndarray, "batch d_model"], y) -> LinearProbe:
        """Fit on activations ``X`` (numpy or torch) and binary labels ``y``; returns ``self``."""
        if self.method not in PROBE_METHODS:
            raise ValueError(f"LinearProbe.method must be one of {PROBE_METHODS}, got {self.method!r}")
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ValueError(f"LinearProbe.C must be a positive number, got {self.C!r}")
        X = as_numpy(X)
        y = binary_labels(y)
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise ValueError(f"LinearProbe.fit: X must be (batch, d_model) with one row per label; "
                             f"got X {X.shape} and y {y.shape}")
        if not np.isfinite(X).all():
            raise ValueError("LinearProbe.fit: X contains NaN or inf")
        self.classes_ = np.unique(y)
        pos = y == self.classes_[1]
        self.n_features_in_ = X.shape[1]
        if self.method == "mean_diff":
            mu1, mu0 = X[pos].mean(0), X[~pos].mean(0)
            coef = mu1 - mu0
            intercept = -float(coef @ (mu1 + mu0)) / 2.0
        else:
            # Centre, then scale: per feature with ``standardize``; otherwise by one number, which
            # with ``C`` scaled by its square is an exact reparametrisation of the raw-space fit
            # (the intercept is not penalised) that the solver converges on far faster.
            self.mean_ = X.mean(0)
            if self.standardize:
                scale = X.std(0)
                self.scale_ = np.where(scale > 0, scale, 1.0)
                C = self.C
            else:
                rms = float(np.sqrt(np.mean((X - self.mean_) ** 2)))
                self.scale_ = np.full(X.shape[1], rms if rms > 0 else 1.0)
                C = self.C * self.scale_[0] ** 2
            Z = (X - self.mean_) / self.scale_
            from sklearn.linear_model import LogisticRegression  # lazily: slow to import

            clf = LogisticRegression(C=C, class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol)
            with few_threads(Z.size):
                clf.fit(Z, pos.astype(int))
            self.n_iter_ = int(np.max(clf.n_iter_))
            w, b = clf.coef_[0], float(clf.intercept_[0])
            coef = w / self.scale_
            intercept = b - float(coef @ self.mean_)
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.intercept_ = float(intercept)
        norm = np.linalg.norm(self.coef_)
        self.direction_ = self.coef_ / norm if norm > 0 else self.coef_.copy()
        return self

    def decision_function(self, X) -> np.ndarray:
        """Signed score ``X @ coef_ + intercept_`` (positive: the positive class)."""
        check_is_fitted(self, "coef_")
        X = as_numpy(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"LinearProbe: X must be (batch, {self.n_features_in_}), got {X.shape}")
        return X @ self.coef_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        """Logistic of the decision function, columns in ``classes_`` order."""
        p = 1.0 / (1.0 + np.exp(-np.clip(self.decision_function(X), -500, 500)))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(int)]

    def project(self, X) -> np.ndarray:
        """Projection of ``X`` on the unit ``direction_`` (no intercept)."""
        check_is_fitted(self, "direction_")
        return as_numpy(X) @ self.direction_
