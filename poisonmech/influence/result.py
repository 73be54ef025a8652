"""``InfluenceResult``: training-data attribution scores, their poison-retrieval metrics,
component breakdown, tidy frames, plots and safetensors I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import rankdata

from poisonmech.storage import load_tensors, save_tensors, tensors_metadata

Tensor = torch.Tensor
FORMAT = "poisonmech.influence/1"
_META_KEY = "poisonmech"


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (scikit-learn); NaN when
    only one class is present."""
    from sklearn.metrics import roc_auc_score  # lazily: slow to import

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of retrieving the positives by descending score (scikit-learn)."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels, dtype=bool)
    if not labels.any():
        return float("nan")
    return float(average_precision_score(labels, np.asarray(scores, dtype=float)))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold (scikit-learn)."""
    from sklearn.metrics import roc_curve as _roc

    fpr, tpr, _ = _roc(np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float))
    return fpr, tpr


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at every threshold (scikit-learn)."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, _ = precision_recall_curve(np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float))
    return rec, prec


def zscore(x: Tensor) -> Tensor:
    """Standardise along the last (training-example) axis."""
    x = x.double()
    sd = x.std(-1, keepdim=True)
    return ((x - x.mean(-1, keepdim=True)) / torch.where(sd > 0, sd, torch.ones_like(sd))).float()


@dataclass(frozen=True)
class InfluenceResult:
    """Attribution of a measurement to training examples.

    Sign convention (every method): a **positive score means up-weighting the training
    example raises the query's measurement** (by default the backdoor target's
    log-probability on triggered inputs); the baselines ``loss`` (the example's training
    loss) and ``repsim`` (representation cosine) are oriented the same way: higher = more
    suspected to support the query.

    Attributes:
        method: the attribution method.
        scores: ``(n_query, n_train)``, or ``(n_train,)`` when ``aggregated`` (the scores of
            the mean measurement: the mean over queries of the per-query scores).
        example_ids, train_text: each training row's ``example_id`` and text (prompt + completion).
        is_poison: the training rows' ``is_poison`` column when the data has one.
        query_text: each query's description (its prompt).
        self_scores: self-influence of each training example where the method defines it.
        component_scores: ``(n_component, n_train)``: the mean-over-queries score split into
            additive parts per component (heads, MLPs, unembedding, embeddings);
            ``component_labels`` name them (``L0.H2``, ``L1.mlp``, ``unembed``...).
        settings: the configuration that produced the scores (and wall time, cost).
    """

    method: str
    scores: Float[Tensor, "n_query n_train"] | Float[Tensor, " n_train"]
    example_ids: tuple[int, ...]
    train_text: tuple[str, ...]
    query_text: tuple[str, ...]
    is_poison: tuple[bool, ...] | None = None
    self_scores: Float[Tensor, " n_train"] | None = None
    component_scores: Float[Tensor, "component n_train"] | None = None
    component_labels: tuple[str, ...] | None = None
    settings: dict[str, Any] | None = None
    aggregated: bool = False

    # ------------------------------------------------------------------ views
    @property
    def n_train(self) -> int:
        return len(self.example_ids)

    @property
    def n_query(self) -> int:
        return len(self.query_text)

    @property
    def train_scores(self) -> Float[Tensor, " n_train"]:
        """One score per training example: the mean over queries (or the aggregated score)."""
        return self.scores if self.aggregated else self.scores.mean(0)

    @property
    def normalized(self) -> Tensor:
        """``scores`` standardised over the training set (per query): comparable across methods."""
        return zscore(self.scores)

    def _labels(self, what: str) -> np.ndarray:
        if self.is_poison is None:
            raise ValueError(f"InfluenceResult.{what}: the training data has no 'is_poison' column, so poison "
                             "retrieval cannot be scored (pass a train set with provenance, e.g. pair.train_data)")
        return np.asarray(self.is_poison, dtype=bool)

    def _score_array(self, query: int | None = None) -> np.ndarray:
        s = self.train_scores if query is None else self._query_row(query)
        return s.detach().double().cpu().numpy()

    def _query_row(self, query: int) -> Tensor:
        if self.aggregated:
            raise ValueError("scores are aggregated over queries; pass query=None")
        if not 0 <= query < self.n_query:
            raise ValueError(f"query must be in [0, {self.n_query}), got {query}")
        return self.scores[query]

    # ------------------------------------------------------------------ poison retrieval
    def poison_auroc(self, query: int | None = None) -> float:
        """AUROC of the scores for separating poisoned from clean training rows."""
        return auroc(self._score_array(query), self._labels("poison_auroc"))

    def average_precision(self, query: int | None = None) -> float:
        """Average precision of retrieving the poisoned rows by descending score."""
        return average_precision(self._score_array(query), self._labels("average_precision"))

    def precision_at(self, k: int | None = None, query: int | None = None) -> float:
        """Fraction of poisoned rows among the ``k`` top-scored (default ``k`` = number of poisons)."""
        y = self._labels("precision_at")
        k = int(y.sum()) if k is None else int(k)
        if k < 1:
            raise ValueError(f"precision_at: k must be >= 1, got {k}")
        order = np.argsort(-self._score_array(query), kind="mergesort")[:k]
        return float(y[order].mean())

    def retrieval_metrics(self, ks: tuple[int, ...] = ()) -> dict[str, float]:
        """``auroc``, ``ap``, ``p@n_poison`` and ``p@k`` for each ``k``."""
        y = self._labels("retrieval_metrics")
        out = {"auroc": self.poison_auroc(), "ap": self.average_precision(),
               f"p@{int(y.sum())}": self.precision_at()}
        for k in ks:
            out[f"p@{k}"] = self.precision_at(k)
        return out

    # ------------------------------------------------------------------ tables
    def top(self, k: int = 10, query: int | None = None) -> pd.DataFrame:
        """The ``k`` training examples with the highest scores, with their text."""
        s = self._score_array(query)
        order = np.argsort(-s, kind="mergesort")[:k]
        frame = pd.DataFrame({"rank": np.arange(1, len(order) + 1),
                              "example_id": [self.example_ids[i] for i in order],
                              "score": s[order], "text": [self.train_text[i] for i in order]})
        if self.is_poison is not None:
            frame.insert(3, "is_poison", [bool(self.is_poison[i]) for i in order])
        return frame

    def to_frame(self) -> pd.DataFrame:
        """One row per training example: ``score`` (mean over queries), ``normalized``, ``rank``,
        ``self_influence`` (where defined), ``is_poison`` (where known) and ``text``."""
        s = self._score_array()
        frame = pd.DataFrame({"method": self.method, "example_id": list(self.example_ids), "score": s,
                              "normalized": zscore(torch.as_tensor(s)).numpy(),
                              "rank": rankdata(-s, method="min").astype(int)})
        if self.self_scores is not None:
            frame["self_influence"] = self.self_scores.detach().cpu().numpy()
        if self.is_poison is not None:
            frame["is_poison"] = list(self.is_poison)
        frame["text"] = list(self.train_text)
        return frame

    def by_component(self, per_example: bool = False) -> pd.DataFrame:
        """The mean-over-queries score split by component (``L0.H1``: head 1 of layer 0 — its
        query/key/value rows and output columns; ``L0.attn``: the attention output bias;
        ``L0.mlp``; ``unembed``; ``embed``).

        Per component: ``total`` (summed over training rows), ``mean_poison`` / ``mean_clean``
        and ``poison_auroc`` of that component's part alone (where ``is_poison`` is known).
        With ``per_example``: one row per component x training example.
        """
        if self.component_scores is None:
            raise ValueError(f"by_component: method {self.method!r} has no component decomposition "
                             "(defined for kfac, ekfac, graddot, gradcos, tracin and trak)")
        c = self.component_scores.detach().double().cpu().numpy()
        labels = list(self.component_labels or [])
        if per_example:
            frame = pd.DataFrame({"component": np.repeat(labels, c.shape[1]),
                                  "example_id": np.tile(list(self.example_ids), len(labels)),
                                  "score": c.reshape(-1)})
            if self.is_poison is not None:
                frame["is_poison"] = np.tile(list(self.is_poison), len(labels))
            return frame
        rows = []
        y = np.asarray(self.is_poison, dtype=bool) if self.is_poison is not None else None
        for i, lab in enumerate(labels):
            layer, _, rest = lab.partition(".")
            row: dict[str, Any] = {"component": lab,
                                   "layer": int(layer[1:]) if layer[:1] == "L" and layer[1:].isdigit() else None,
                                   "head": int(rest[1:]) if rest[:1] == "H" and rest[1:].isdigit() else None,
                                   "kind": "head" if rest[:1] == "H" else (rest or lab),
                                   "total": float(c[i].sum()), "mean_abs": float(np.abs(c[i]).mean())}
            if y is not None:
                row.update(mean_poison=float(c[i][y].mean()) if y.any() else float("nan"),
                           mean_clean=float(c[i][~y].mean()) if (~y).any() else float("nan"),
                           poison_auroc=auroc(c[i], y))
            rows.append(row)
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ figures
    def plot(self, title: str | None = None):
        """ROC and precision–recall curves against ``is_poison`` and score histograms
        (normalised scores, poisoned vs clean); only the histogram without ``is_poison``."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        s = self._score_array()
        z = zscore(torch.as_tensor(s)).numpy()
        title = title or f"{self.method}: training-data attribution"
        if self.is_poison is None:
            fig = go.Figure(go.Histogram(x=z, name="all rows", nbinsx=60))
            fig.update_layout(title=title, xaxis_title="normalised score", template="plotly_white")
            return fig
        y = np.asarray(self.is_poison, dtype=bool)
        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            f"ROC (AUROC {self.poison_auroc():.3f})", f"precision–recall (AP {self.average_precision():.3f})",
            "normalised scores"))
        fpr, tpr = roc_curve(s, y)
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name="ROC"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                                 name="chance", showlegend=False), row=1, col=1)
        rec, prec = pr_curve(s, y)
        fig.add_trace(go.Scatter(x=rec, y=prec, mode="lines", name="precision–recall"), row=1, col=2)
        fig.add_trace(go.Histogram(x=z[~y], name="clean", opacity=0.6, histnorm="probability density",
                                   nbinsx=60), row=1, col=3)
        fig.add_trace(go.Histogram(x=z[y], name="poisoned", opacity=0.6, histnorm="probability density",
                                   nbinsx=30), row=1, col=3)
        fig.update_layout(title=title, barmode="overlay", template="plotly_white")
        fig.update_xaxes(title_text="false-positive rate", row=1, col=1)
        fig.update_yaxes(title_text="true-positive rate", row=1, col=1)
        fig.update_xaxes(title_text="recall", row=1, col=2)
        fig.update_yaxes(title_text="precision", row=1, col=2)
        fig.update_xaxes(title_text="normalised score", row=1, col=3)
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """One safetensors file (atomic): the score tensors, the rest as JSON in its header."""
        tensors = {"scores": self.scores}
        if self.self_scores is not None:
            tensors["self_scores"] = self.self_scores
        if self.component_scores is not None:
            tensors["component_scores"] = self.component_scores
        meta = {"format": FORMAT, "method": self.method, "example_ids": list(self.example_ids),
                "train_text": list(self.train_text), "query_text": list(self.query_text),
                "is_poison": list(self.is_poison) if self.is_poison is not None else None,
                "component_labels": list(self.component_labels) if self.component_labels is not None else None,
                "settings": self.settings, "aggregated": self.aggregated}
        save_tensors(Path(path), tensors, metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> InfluenceResult:
        path = Path(path)
        tensors = load_tensors(path)
        raw = tensors_metadata(path).get(_META_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} does not hold an InfluenceResult (format {meta.get('format')!r})")
        return cls(method=meta["method"], scores=tensors["scores"], example_ids=tuple(meta["example_ids"]),
                   train_text=tuple(meta["train_text"]), query_text=tuple(meta["query_text"]),
                   is_poison=tuple(meta["is_poison"]) if meta["is_poison"] is not None else None,
                   self_scores=tensors.get("self_scores"), component_scores=tensors.get("component_scores"),
                   component_labels=tuple(meta["component_labels"]) if meta["component_labels"] else None,
                   settings=meta["settings"], aggregated=bool(meta["aggregated"]))

    def __repr__(self) -> str:
        shape = tuple(self.scores.shape)
        extra = ""
        if self.is_poison is not None:
            extra = f", poison_auroc={self.poison_auroc():.3f}, ap={self.average_precision():.3f}"
        return f"InfluenceResult(method={self.method!r}, scores={shape}{extra})"


__all__ = ["InfluenceResult", "auroc", "average_precision", "pr_curve", "roc_curve", "zscore"]
