"""Ranking metrics, in one place and with one behaviour (scikit-learn underneath).

Every detector, influence method and defense ranks training rows by a suspicion score; these
functions score that ranking against the ground truth (``is_poison``). One behaviour for all:

- labels with a single class give ``nan`` for AUROC (and AP without positives), never an error;
- ``k`` must be an integer >= 1; ``k`` larger than the number of rows uses every row;
- ties in ``*_at_k`` are broken by row order (a stable sort), so results are reproducible;
- ``threshold`` metrics flag rows whose score is >= the threshold.
"""

from __future__ import annotations

import numpy as np


def _arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have one entry per row, got {s.shape[0]} scores and "
                         f"{y.shape[0]} labels")
    return s, y


def auroc(scores, labels) -> float:
    """Area under the ROC curve (scikit-learn); ``nan`` when only one class is present."""
    s, y = _arrays(scores, labels)
    if y.all() or not y.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score  # lazily: slow to import

    return float(roc_auc_score(y, s))


def average_precision(scores, labels) -> float:
    """Average precision of retrieving the positives by descending score (scikit-learn);
    ``nan`` without positives."""
    s, y = _arrays(scores, labels)
    if not y.any():
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s))


def check_k(k, where: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{where} must be an integer >= 1, got {k!r}")
    return int(k)


def top_k(scores, k: int) -> np.ndarray:
    """Row indices of the ``k`` highest scores (ties by row order)."""
    s = np.asarray(scores, dtype=float).reshape(-1)
    return np.argsort(-s, kind="stable")[:min(check_k(k), len(s))]


def _flag_top(s: np.ndarray, k: int) -> np.ndarray:
    flagged = np.zeros(len(s), dtype=bool)
    flagged[top_k(s, k)] = True
    return flagged


def precision_at_k(scores, labels, k: int) -> float:
    """Fraction of the ``k`` top-scored rows that are positive."""
    s, y = _arrays(scores, labels)
    from sklearn.metrics import precision_score

    return float(precision_score(y, _flag_top(s, k), zero_division=0.0))


def recall_at_k(scores, labels, k: int) -> float:
    """Fraction of the positives among the ``k`` top-scored rows; ``nan`` without positives."""
    s, y = _arrays(scores, labels)
    if not y.any():
        return float("nan")
    from sklearn.metrics import recall_score

    return float(recall_score(y, _flag_top(s, k)))


def f1_at_k(scores, labels, k: int) -> float:
    """F1 of flagging the ``k`` top-scored rows."""
    s, y = _arrays(scores, labels)
    from sklearn.metrics import f1_score

    return float(f1_score(y, _flag_top(s, k), zero_division=0.0))


def at_threshold(scores, labels, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of flagging rows scoring >= ``threshold``, with the counts."""
    s, y = _arrays(scores, labels)
    from sklearn.metrics import precision_recall_fscore_support

    flagged = s >= threshold
    p, r, f, _ = precision_recall_fscore_support(y, flagged, average="binary", zero_division=0.0)
    return {"precision": float(p), "recall": float(r) if y.any() else float("nan"), "f1": float(f),
            "n_flagged": int(flagged.sum()), "n_positive": int(y.sum()), "n": int(len(y))}


def retrieval_metrics(scores, labels, ks=()) -> dict[str, float]:
    """``auroc``, ``ap``, ``p@n_positive`` and ``p@k`` for each ``k`` (the usual table row)."""
    s, y = _arrays(scores, labels)
    out = {"auroc": auroc(s, y), "ap": average_precision(s, y)}
    n_pos = int(y.sum())
    out["p@n_poison"] = precision_at_k(s, y, n_pos) if n_pos else float("nan")
    for k in ks:
        out[f"p@{int(k)}"] = precision_at_k(s, y, k)
    return out


__all__ = ["at_threshold", "auroc", "average_precision", "check_k", "f1_at_k", "precision_at_k", "recall_at_k",
           "retrieval_metrics", "top_k"]
