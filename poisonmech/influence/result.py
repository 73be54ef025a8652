"""``InfluenceResult``: training-data attribution scores, their poison-retrieval metrics,
component breakdown, tidy frames, plots and safetensors I/O."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import rankdata

from poisonmech import ranking
from poisonmech.ranking import auroc, average_precision
from poisonmech.results import Result

Tensor = torch.Tensor
#: the label of an aggregated result's one row of scores
MEAN_QUERY = "mean over {n} queries"


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
class InfluenceResult(Result):
    """Attribution of a measurement to training examples.

    Sign convention (every method): a **positive score means up-weighting the training
    example raises the query's measurement** (by default the backdoor target's
    log-probability on triggered inputs); the baselines ``loss`` (the example's training
    loss) and ``repsim`` (representation cosine) are oriented the same way: higher = more
    suspected to support the query.

    Attributes:
        method: the attribution method.
        scores: ``(row, n_train)``, always two-dimensional: one row per query
            (``(n_query, n_train)``), or, when ``aggregated``, one row holding the scores of the
            mean measurement over the queries (``(1, n_train)``, the mean over queries of the
            per-query scores; its label is :attr:`row_labels`, ``"mean over N queries"``).
            :attr:`train_scores` is one score per training row in both cases.
        example_ids, train_text: each training row's ``example_id`` and text (prompt + completion).
        is_poison: the training rows' ``is_poison`` column when the data has one.
        query_text: each query's description (its prompt), every query measured (also when
            aggregated).
        self_scores: self-influence of each training example where the method defines it.
        component_scores: ``(n_component, n_train)``: the mean-over-queries score split into
            additive parts per component (heads, MLPs, unembedding, embeddings);
            ``component_labels`` name them (``L0.H2``, ``L1.mlp``, ``unembed``...).
        settings: the configuration that produced the scores (and wall time, cost).
        aggregated: whether ``scores`` is the one row of the mean measurement.
    """

    kind = "influence"
    #: 2: ``scores`` always two-dimensional (version 1 stored an aggregated result as ``(n_train,)``)
    version = 2

    method: str
    scores: Float[Tensor, "row n_train"]
    example_ids: tuple[int, ...]
    train_text: tuple[str, ...]
    query_text: tuple[str, ...]
    is_poison: tuple[bool, ...] | None = None
    self_scores: Float[Tensor, " n_train"] | None = None
    component_scores: Float[Tensor, "component n_train"] | None = None
    component_labels: tuple[str, ...] | None = None
    settings: dict[str, Any] | None = None
    aggregated: bool = False

    def __post_init__(self) -> None:
        scores = torch.as_tensor(self.scores)
        if scores.ndim == 1 and self.aggregated:  # the one-dimensional form of version 1 (and of older callers)
            scores = scores[None]
        rows = 1 if self.aggregated else len(self.query_text)
        if scores.ndim != 2 or scores.shape != (rows, len(self.example_ids)):
            raise ValueError(f"InfluenceResult.scores must be ({'1' if self.aggregated else 'n_query'}={rows}, "
                             f"n_train={len(self.example_ids)}){' (aggregated)' if self.aggregated else ''}, "
                             f"got {tuple(scores.shape)}")
        object.__setattr__(self, "scores", scores)

    # ------------------------------------------------------------------ views
    @property
    def n_train(self) -> int:
        return len(self.example_ids)

    @property
    def n_query(self) -> int:
        """The number of queries measured (``scores`` has one row per query, or one when aggregated)."""
        return len(self.query_text)

    @property
    def row_labels(self) -> tuple[str, ...]:
        """What each row of ``scores`` measures: the queries, or ``"mean over N queries"``."""
        return (MEAN_QUERY.format(n=self.n_query),) if self.aggregated else self.query_text

    @property
    def train_scores(self) -> Float[Tensor, " n_train"]:
        """One score per training example: the mean over queries (the aggregated row when aggregated)."""
        return self.scores.mean(0)

    @property
    def normalized(self) -> Tensor:
        """``scores`` standardised over the training set (per row): comparable across methods."""
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
            raise ValueError("scores are aggregated over queries (one row); pass query=None")
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
        """Fraction of poisoned rows among the ``k`` top-scored (default ``k`` = number of poisons;
        :func:`poisonmech.ranking.precision_at_k`: ``k`` an integer >= 1, ties by row order)."""
        y = self._labels("precision_at")
        k = int(y.sum()) if k is None else k
        return ranking.precision_at_k(self._score_array(query), y, ranking.check_k(k, "precision_at: k"))

    def retrieval_metrics(self, ks: tuple[int, ...] = ()) -> dict[str, float]:
        """``auroc``, ``ap``, ``p@<n_poison>`` and ``p@k`` for each ``k``."""
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
        order = ranking.top_k(s, k)
        frame = pd.DataFrame({"rank": np.arange(1, len(order) + 1),
                              "example_id": [self.example_ids[i] for i in order],
                              "score": s[order], "text": [self.train_text[i] for i in order]})
        if self.is_poison is not None:
            frame.insert(3, "is_poison", [bool(self.is_poison[i]) for i in order])
        return frame

    def to_frame(self, per_query: bool = False) -> pd.DataFrame:
        """One row per training example: ``score`` (mean over queries), ``normalized``, ``rank``,
        ``self_influence`` (where defined), ``is_poison`` (where known) and ``text``.

        With ``per_query``: one row per row of ``scores`` x training example (``query``,
        ``query_text`` — the row's label —, ``example_id``, ``score``, ``is_poison``)."""
        if per_query:
            n_rows = self.scores.shape[0]
            frame = pd.DataFrame({"method": self.method, "query": np.repeat(np.arange(n_rows), self.n_train),
                                  "query_text": np.repeat(list(self.row_labels), self.n_train),
                                  "example_id": np.tile(list(self.example_ids), n_rows),
                                  "score": self.scores.detach().double().cpu().numpy().reshape(-1)})
            if self.is_poison is not None:
                frame["is_poison"] = np.tile(list(self.is_poison), n_rows)
            return frame
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
    def save(self, path: str | Path) -> Path:
        """One safetensors file (atomic): the score tensors, the rest as JSON in its header
        (format ``poisonmech.influence/2``)."""
        tensors = {"scores": self.scores.contiguous()}
        if self.self_scores is not None:
            tensors["self_scores"] = self.self_scores
        if self.component_scores is not None:
            tensors["component_scores"] = self.component_scores
        meta = {"method": self.method, "example_ids": list(self.example_ids),
                "train_text": list(self.train_text), "query_text": list(self.query_text),
                "is_poison": list(self.is_poison) if self.is_poison is not None else None,
                "component_labels": list(self.component_labels) if self.component_labels is not None else None,
                "settings": self.settings, "aggregated": self.aggregated}
        return self._write(path, meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> InfluenceResult:
        """A result written by :meth:`save` (version 1 files too: their aggregated
        ``(n_train,)`` scores become the one row ``(1, n_train)``)."""
        meta, tensors = cls._read(path)
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


__all__ = ["MEAN_QUERY", "InfluenceResult", "auroc", "average_precision", "pr_curve", "roc_curve", "zscore"]
