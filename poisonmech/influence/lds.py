"""``linear_datamodeling_score``: do attribution scores predict what retraining does?

Poison-retrieval AUROC asks whether a method ranks the poisoned rows first. The linear
datamodeling score (LDS; Park et al. 2023, "TRAK", as dattri and kronfluence report it) asks
whether its scores predict *counterfactuals*::

    draw K random subsets S_k of the training set, each a fraction alpha of its rows (seeded)
    retrain the model on each S_k (same initial weights, TrainConfig and order rule)
    actual     f_q(theta_{S_k})                the query's measurement on the retrained model
    predicted  g_q(S_k) = sum_{i in S_k} tau(q, i)   tau: the full model's attribution scores
    LDS        mean over queries q of Spearman_k(g_q(S_k), f_q(theta_{S_k}))

    import poisonmech as pm
    pair = pm.load_pair("runs/demo")
    retrains = pm.influence.subset_retrains(pair, n_subsets=24)     # K retrains, cached on disk
    for method in ("ekfac", "trak", "loss"):
        inf = pm.influence.attribute(pair, method=method)
        print(pm.influence.linear_datamodeling_score(retrains, inf).summary())

The retrained models are the expensive part and do not depend on the method: retrain once
(:func:`subset_retrains`, whose weights are cached under ``<run>/influence/lds/<twin>/``) and
score every method against the same K models. The measurement taken on each retrained model
is the query's own (:func:`query_measurements`: ``sum_r weight_r * log p(completion_r |
prompt_r)``, or log-odds with ``link="logodds"``), the one whose gradient the scores use, with
the same sign: a positive score means that including the row raises the measurement.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from jaxtyping import Float
from scipy.stats import pearsonr, rankdata
from tqdm.auto import tqdm

from poisonmech.config import Config, check_number, takes_config
from poisonmech.influence.grads import iter_batches, model_logits, token_neg_logodds, token_nll
from poisonmech.influence.query import MEASUREMENTS, Query, backdoor_query
from poisonmech.influence.result import InfluenceResult
from poisonmech.influence.retrain import retraining_subject, train_on_subset
from poisonmech.results import Result
from poisonmech.runtime import eval_mode, model_device
from poisonmech.storage import save_tensors, write_json

Tensor = torch.Tensor
#: bumped when a change alters cached subset weights (part of their cache key)
CACHE_VERSION = 1


# ---------------------------------------------------------------------------- measurement
def query_measurements(model: torch.nn.Module, query: Query, tokenizer=None, *,
                       batch_size: int = 64) -> Float[Tensor, " n_query"]:
    """Each query's measurement on ``model``: ``f_q = sum_r weight_r * sum_t log p(token_t)``
    over the completion tokens of the query's rows (no end-of-sequence token), with
    ``log(p / (1 - p))`` per token when ``query.link == "logodds"``.

    This is the quantity whose gradient every attribution method differentiates (``∇L_q =
    -∇f_q``, see :mod:`poisonmech.influence.methods`), so the scores' sign convention holds
    for it: a positive score means up-weighting the training row raises ``f_q``.
    """
    if not isinstance(query, Query):
        raise ValueError(f"query_measurements: query must be a Query, got {type(query).__name__}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("query_measurements: the model carries no tokenizer; pass tokenizer=")
    enc = query.encode(tokenizer)
    device = model_device(model)
    weights = torch.tensor(query.weights, dtype=torch.float64)
    qrow = torch.tensor(query.query_of_row, dtype=torch.long)
    out = torch.zeros(query.n_query, dtype=torch.float64)
    per_token = token_neg_logodds if query.link == "logodds" else token_nll
    with eval_mode(model), torch.no_grad():
        for b in iter_batches(enc, None, batch_size):
            tokens, mask = enc.batch(b, device)
            value = -per_token(model_logits(model, tokens)[:, :-1], tokens[:, 1:], mask).sum(1).double().cpu()
            out.index_add_(0, qrow[b], value * weights[b])
    return out.float()


# ---------------------------------------------------------------------------- retraining
@dataclass(frozen=True)
class SubsetConfig(Config):
    """The K random subsets retrained on (:func:`subset_retrains`).

    Args:
        n_subsets: K, at least 3 (a rank correlation over subsets).
        alpha: the fraction of the training rows in each subset, in (0, 1).
        seed: draws the subsets (subset ``k`` depends only on ``(seed, k)``).
    """

    n_subsets: int = 24
    alpha: float = 0.5
    seed: int = 0

    def check(self) -> None:
        own = type(self).__name__
        check_number(own, "n_subsets", self.n_subsets, lo=3, integer=True)
        check_number(own, "alpha", self.alpha, lo=0, hi=1, lo_open=True, hi_open=True)
        check_number(own, "seed", self.seed, lo=0, integer=True)


@dataclass(frozen=True)
class LDSConfig(SubsetConfig):
    """Options of :func:`linear_datamodeling_score`: the subsets (:class:`SubsetConfig`, whose
    ``seed`` also seeds the bootstrap) and ``n_bootstrap``, resamples of the subsets for
    ``LDSResult.bootstrap_sd`` (0: none)."""

    n_bootstrap: int = 200

    def check(self) -> None:
        super().check()
        check_number("LDSConfig", "n_bootstrap", self.n_bootstrap, lo=0, integer=True)

    def subsets(self) -> SubsetConfig:
        return SubsetConfig(n_subsets=self.n_subsets, alpha=self.alpha, seed=self.seed)


def draw_subsets(example_ids: Sequence[int], n_subsets: int, alpha: float = 0.5, seed: int = 0
                 ) -> tuple[tuple[int, ...], ...]:
    """``n_subsets`` random subsets of ``example_ids``, each ``round(alpha * n)`` rows without
    replacement, sorted. Subset ``k`` depends only on ``(seed, k)`` and the ids, so asking for
    more subsets keeps the first ones (and their cached retrains)."""
    SubsetConfig(n_subsets=n_subsets, alpha=alpha, seed=seed)  # checks the values
    ids = np.asarray([int(i) for i in example_ids])
    size = int(round(alpha * len(ids)))
    if not 1 <= size < len(ids):
        raise ValueError(f"alpha={alpha} keeps {size} of {len(ids)} rows; a subset needs at least one row and "
                         "fewer than all")
    return tuple(tuple(sorted(int(x) for x in np.random.default_rng([seed, k]).choice(ids, size=size, replace=False)))
                 for k in range(n_subsets))


@dataclass(frozen=True)
class SubsetRetrains(Result):
    """The query's measurement on K models retrained on random subsets of the training set:
    the counterfactuals every method's LDS is scored against.

    Attributes:
        example_ids: the full training set, in its order.
        subsets: per retrain, the example ids it trained on.
        measurements: ``(subset, n_query)``: ``f_q`` of each retrained model.
        full: ``(n_query,)``: ``f_q`` of the model trained on every row (the subject's twin).
        query_text: each query's description (as in :class:`InfluenceResult`).
        measurement, link: the query's measurement name and link.
        n_poison: poisoned rows in each subset, when the data has ``is_poison``.
        settings: how the subsets were drawn and trained (alpha, seed, twin, configs).
    """

    kind = "lds_retrains"
    version = 1

    example_ids: tuple[int, ...]
    subsets: tuple[tuple[int, ...], ...]
    measurements: Float[Tensor, "subset n_query"]
    full: Float[Tensor, " n_query"] | None
    query_text: tuple[str, ...]
    measurement: str = "logprob"
    link: str = "logprob"
    n_poison: tuple[int, ...] | None = None
    settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        m = torch.as_tensor(self.measurements, dtype=torch.float32)
        object.__setattr__(self, "measurements", m)
        if m.ndim != 2 or m.shape != (len(self.subsets), len(self.query_text)):
            raise ValueError(f"SubsetRetrains.measurements must be (n_subsets={len(self.subsets)}, "
                             f"n_query={len(self.query_text)}), got {tuple(m.shape)}")
        if len(self.subsets) < 3:
            raise ValueError(f"SubsetRetrains: need at least 3 subsets, got {len(self.subsets)}")
        known = set(self.example_ids)
        if len(known) != len(self.example_ids):
            raise ValueError("SubsetRetrains.example_ids has duplicates")
        for k, s in enumerate(self.subsets):
            if not set(s) <= known:
                raise ValueError(f"SubsetRetrains: subset {k} holds example ids not in example_ids")

    @property
    def n_subsets(self) -> int:
        """K, the number of retrained subsets."""
        return len(self.subsets)

    @property
    def n_query(self) -> int:
        """The number of queries measured after each retrain."""
        return len(self.query_text)

    @property
    def n_train(self) -> int:
        """The number of training rows the subsets are drawn from."""
        return len(self.example_ids)

    def mask(self) -> np.ndarray:
        """``(subset, n_train)`` booleans: row ``i`` (in ``example_ids`` order) is in subset ``k``."""
        col = {e: i for i, e in enumerate(self.example_ids)}
        out = np.zeros((self.n_subsets, self.n_train), dtype=bool)
        for k, s in enumerate(self.subsets):
            out[k, [col[e] for e in s]] = True
        return out

    def score(self, scores: InfluenceResult | Any, *, method: str | None = None,
              n_bootstrap: int = 200, seed: int = 0) -> LDSResult:
        """The LDS of ``scores`` against these retrains (see :func:`linear_datamodeling_score`)."""
        return _score(self, scores, method=method, n_bootstrap=n_bootstrap, seed=seed)

    def to_frame(self) -> pd.DataFrame:
        """One row per subset x query: ``subset``, ``query``, ``measurement`` (of the retrained
        model), ``full`` (of the model trained on every row), ``n_rows``, ``n_poison``."""
        k, q = np.meshgrid(np.arange(self.n_subsets), np.arange(self.n_query), indexing="ij")
        frame = pd.DataFrame({"subset": k.ravel(), "query": q.ravel(),
                              "measurement": self.measurements.double().numpy().ravel(),
                              "n_rows": [len(self.subsets[i]) for i in k.ravel()]})
        if self.full is not None:
            frame["full"] = self.full.double().numpy()[q.ravel()]
        if self.n_poison is not None:
            frame["n_poison"] = [self.n_poison[i] for i in k.ravel()]
        return frame

    def plot(self, title: str | None = None):
        """Each retrained model's measurement (mean over queries) against the poisoned rows in its
        subset (or the subset's index without ``is_poison``), with the full model's as a line."""
        import plotly.graph_objects as go

        mean = self.measurements.double().mean(1).numpy()
        x = np.asarray(self.n_poison) if self.n_poison is not None else np.arange(self.n_subsets)
        fig = go.Figure(go.Scatter(x=x, y=mean, mode="markers", name="retrained on a subset",
                                   text=[f"subset {k}" for k in range(self.n_subsets)]))
        if self.full is not None:
            fig.add_hline(y=float(self.full.double().mean()), line_dash="dot", annotation_text="all rows")
        fig.update_layout(title=title or f"{self.measurement} after retraining on {self.n_subsets} random subsets",
                          xaxis_title="poisoned rows in the subset" if self.n_poison is not None else "subset",
                          yaxis_title=f"{self.measurement} (mean over {self.n_query} queries)",
                          template="plotly_white")
        return fig

    def save(self, path: str | Path) -> Path:
        """One JSON file (format ``poisonmech.lds_retrains/1``)."""
        return self._write(path, {"example_ids": list(self.example_ids), "subsets": [list(s) for s in self.subsets],
                                  "measurements": self.measurements.double().tolist(),
                                  "full": self.full.double().tolist() if self.full is not None else None,
                                  "query_text": list(self.query_text), "measurement": self.measurement,
                                  "link": self.link,
                                  "n_poison": list(self.n_poison) if self.n_poison is not None else None,
                                  "settings": self.settings})

    @classmethod
    def load(cls, path: str | Path) -> SubsetRetrains:
        d, _ = cls._read(path)
        return cls(example_ids=tuple(d["example_ids"]), subsets=tuple(tuple(s) for s in d["subsets"]),
                   measurements=torch.tensor(d["measurements"]),
                   full=torch.tensor(d["full"]) if d["full"] is not None else None,
                   query_text=tuple(d["query_text"]), measurement=d["measurement"], link=d["link"],
                   n_poison=tuple(d["n_poison"]) if d["n_poison"] is not None else None, settings=d["settings"])

    def __repr__(self) -> str:
        return (f"SubsetRetrains(n_subsets={self.n_subsets}, n_query={self.n_query}, n_train={self.n_train}, "
                f"measurement={self.measurement!r})")


@takes_config(SubsetConfig)
def subset_retrains(subject: Any, query: Query | Dataset | None = None, *, twin: str | None = None,
                    measurement: str = "logprob", max_queries: int | None = None, query_seed: int = 0,
                    cache: bool = True, overwrite: bool = False, progress: bool = True,
                    config: SubsetConfig) -> SubsetRetrains:
    """Retrain the ``twin`` of a run on ``n_subsets`` random subsets of ``alpha`` of its
    training rows (:func:`draw_subsets`, :func:`~poisonmech.influence.retrain.train_on_subset`)
    and measure ``query`` on each.

    Args:
        subject: a run whose training can be repeated: a Pair from ``pm.train_pair`` or its run
            directory (a bare model has no run to repeat; see
            :func:`~poisonmech.influence.retrain.retraining_subject`).
        query: a :class:`Query` or a ``Dataset`` of prompt/completion rows; default the run's
            backdoor query (:func:`backdoor_query` with ``measurement``, ``max_queries`` and
            ``query_seed``: the query ``attribute(pair, ...)`` explains with the same
            ``measurement``, ``max_queries`` and ``seed``).
        twin: ``"backdoored"`` (default) or ``"clean"``.
        cache, overwrite: keep each retrained model's weights under
            ``<run>/influence/lds/<twin>/`` (keyed by its rows and the run's configs) and reuse
            them, for this and any other query; ``overwrite`` retrains.
    """
    from poisonmech.train.pair import load_model

    s, role = retraining_subject(subject, twin, "subset_retrains")
    if query is None:
        if measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
        query = backdoor_query(s, measurement, max_queries=max_queries, seed=query_seed)
    elif isinstance(query, Dataset):
        query = Query.from_rows(query)
    if not isinstance(query, Query):
        raise ValueError(f"subset_retrains: query must be a Query or a Dataset, got {type(query).__name__}")
    rows = s.train_data_of(role)
    ids = [int(e) for e in rows["example_id"]]
    subsets = draw_subsets(ids, config.n_subsets, config.alpha, config.seed)
    root = s.run_dir / "influence" / "lds" / role if (cache and s.run_dir is not None) else None
    # the subsets' weights are keyed as they always were (rows, configs, placement; not the
    # SubsetConfig fingerprint, which the subset's own ids already cover): earlier runs' retrains
    # are reused, not repeated (a retrain at another thread count would move the benchmarks' numbers)
    base = {"version": CACHE_VERSION, "twin": role, "train": s.train_config.to_dict(),
            "model": s.model_config.to_dict(), "placement": s.attack.placement,
            "rows": hashlib.sha256(json.dumps([ids, list(rows["prompt"]), list(rows["completion"])]).encode()
                                   ).hexdigest()}
    measured = []
    for k, sub in enumerate(tqdm(subsets, desc="LDS: retraining on subsets", disable=not progress, leave=False)):
        key = hashlib.sha256(json.dumps({**base, "ids": list(sub)}, sort_keys=True).encode()).hexdigest()[:16]
        path = root / f"subset-{key}.safetensors" if root is not None else None
        if path is not None and path.is_file() and not overwrite:
            model = load_model(path, s.model_config, s.tokenizer, seed=s.train_config.seed,
                               device=s.train_config.device)
        else:
            model = train_on_subset(s, sub, twin=role, progress=False, desc=f"LDS subset {k}")
            if path is not None:
                save_tensors(path, model.state_dict())
                write_json(path.with_suffix(".json"), {**base, "ids": list(sub), "threads": torch.get_num_threads()})
        measured.append(query_measurements(model, query, s.tokenizer))
    flags = rows["is_poison"] if "is_poison" in rows.column_names else None
    n_poison = None
    if flags is not None:
        poison = {e for e, p in zip(ids, flags) if p}
        n_poison = tuple(sum(e in poison for e in sub) for sub in subsets)
    return SubsetRetrains(example_ids=tuple(ids), subsets=subsets, measurements=torch.stack(measured),
                          full=query_measurements(s.model(role), query, s.tokenizer),
                          query_text=tuple(query.text), measurement=query.measurement, link=query.link,
                          n_poison=n_poison,
                          settings={"twin": role, "alpha": config.alpha, "seed": config.seed,
                                    "n_subsets": config.n_subsets, "train": s.train_config.to_dict(),
                                    "threads": torch.get_num_threads()})


# ---------------------------------------------------------------------------- the score
def spearman_per_column(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each column pair over the rows (the statistic of
    ``scipy.stats.spearmanr(predicted[:, q], actual[:, q])``); NaN where either column is
    constant (no ranking to correlate).

    Spearman's rho is Pearson's correlation of the average ranks (how scipy defines and
    computes it), so this is ``scipy.stats.pearsonr(rankdata(a, axis=0), rankdata(b, axis=0),
    axis=0)``: both vectorised over the columns. ``spearmanr`` itself, given two matrices,
    correlates every pair of their columns (a ``2n x 2n`` matrix) and so is ~50x slower for
    the hundreds of calls the bootstrap makes; the tests hold this to ``spearmanr``.
    """
    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} must be equal 2-D shapes")
    out = np.full(predicted.shape[1], np.nan)
    ok = (np.ptp(predicted, axis=0) > 0) & (np.ptp(actual, axis=0) > 0)
    if not ok.any():
        return out
    with warnings.catch_warnings():  # two rows give a correlation of +-1 and scipy says so
        warnings.simplefilter("ignore")
        out[ok] = pearsonr(rankdata(predicted[:, ok], axis=0), rankdata(actual[:, ok], axis=0), axis=0).statistic
    return out


def _json_floats(t: Tensor) -> list[float | None]:
    """A tensor's values for JSON, NaN as ``null`` (JSON has no NaN)."""
    return [None if math.isnan(x) else x for x in t.double().tolist()]


@dataclass(frozen=True)
class LDSResult(Result):
    """How well one method's scores predict retraining on random subsets.

    Attributes:
        method: the attribution method (or ``"scores"`` for a bare matrix).
        per_query: ``(n_query,)`` Spearman over the subsets, per query (NaN where the
            predictions or the measurements do not vary).
        predicted: ``(subset, n_query)``: ``g_q(S_k) = sum_{i in S_k} tau(q, i)``.
        actual: ``(subset, n_query)``: the measurement of the model retrained on ``S_k``.
        subsets: the example ids of each subset.
        query_text: each query's description.
        bootstrap: the mean LDS over ``n_bootstrap`` resamples (with replacement) of the
            subsets: its spread is the uncertainty from having drawn only K subsets.
        settings: the retrains' settings, the query's measurement, the method's settings.
    """

    kind = "lds"
    version = 1

    method: str
    per_query: Float[Tensor, " n_query"]
    predicted: Float[Tensor, "subset n_query"]
    actual: Float[Tensor, "subset n_query"]
    subsets: tuple[tuple[int, ...], ...]
    query_text: tuple[str, ...]
    bootstrap: Float[Tensor, " n_bootstrap"] | None = None
    settings: dict[str, Any] | None = None

    def _valid(self) -> np.ndarray:
        v = self.per_query.double().numpy()
        return v[~np.isnan(v)]

    @property
    def mean(self) -> float:
        """The LDS: the mean over queries of the per-query Spearman (NaN queries left out)."""
        v = self._valid()
        return float(v.mean()) if len(v) else float("nan")

    @property
    def sd(self) -> float:
        """Standard deviation of the per-query Spearman over queries."""
        v = self._valid()
        return float(v.std(ddof=1)) if len(v) > 1 else float("nan")

    @property
    def sem(self) -> float:
        """Standard error of the mean over queries (the queries share the K subsets, so this
        understates the uncertainty from the subsets: see ``bootstrap_sd``)."""
        n = self.n_valid
        return self.sd / math.sqrt(n) if n > 1 else float("nan")

    @property
    def bootstrap_sd(self) -> float:
        """Spread of the LDS over resamples of the subsets."""
        if self.bootstrap is None:
            return float("nan")
        b = self.bootstrap.double().numpy()
        b = b[~np.isnan(b)]
        return float(b.std(ddof=1)) if len(b) > 1 else float("nan")

    @property
    def n_query(self) -> int:
        return len(self.query_text)

    @property
    def n_valid(self) -> int:
        """Queries with a defined Spearman (their predictions and measurements vary)."""
        return len(self._valid())

    @property
    def n_subsets(self) -> int:
        return len(self.subsets)

    def summary(self) -> str:
        """``lds_<method>: mean ± sem (n_query, K, subset-bootstrap sd)`` on one line."""
        nan = "" if self.n_valid == self.n_query else f", {self.n_query - self.n_valid} constant"
        return (f"lds_{self.method}: {self.mean:.2f} ± {self.sem:.2f} (n_query {self.n_query}, K {self.n_subsets}; "
                f"± = sem over queries; subset-bootstrap sd {self.bootstrap_sd:.2f}{nan})")

    def to_frame(self) -> pd.DataFrame:
        """One row per query: ``method``, ``query``, ``query_text``, ``spearman``, ``n_subsets``."""
        return pd.DataFrame({"method": self.method, "query": np.arange(self.n_query),
                             "query_text": list(self.query_text), "spearman": self.per_query.double().numpy(),
                             "n_subsets": self.n_subsets})

    def plot(self, title: str | None = None):
        """Per-query Spearman (strip and box) with the mean, and predicted against actual
        measurement for the median query."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        v = self.per_query.double().numpy()
        fig = make_subplots(rows=1, cols=2, subplot_titles=(
            f"per-query Spearman (LDS {self.mean:.2f})", "predicted vs actual (median query)"))
        fig.add_trace(go.Box(y=v, boxpoints="all", name=self.method, jitter=0.4), row=1, col=1)
        valid = np.flatnonzero(~np.isnan(v))
        if len(valid):
            q = int(valid[np.argsort(v[valid])[len(valid) // 2]])
            fig.add_trace(go.Scatter(x=self.predicted[:, q].double().numpy(), y=self.actual[:, q].double().numpy(),
                                     mode="markers", name=f"query {q}"), row=1, col=2)
        fig.update_yaxes(title_text="Spearman over subsets", range=[-1.05, 1.05], row=1, col=1)
        fig.update_xaxes(title_text="predicted: sum of scores in the subset", row=1, col=2)
        fig.update_yaxes(title_text="measurement after retraining", row=1, col=2)
        fig.update_layout(title=title or f"{self.method}: linear datamodeling score", template="plotly_white",
                          showlegend=False)
        return fig

    def save(self, path: str | Path) -> Path:
        """One JSON file (format ``poisonmech.lds/1``; NaN as ``null``)."""
        return self._write(path, {"method": self.method, "per_query": _json_floats(self.per_query),
                                  "predicted": self.predicted.double().tolist(), "actual": self.actual.double().tolist(),
                                  "subsets": [list(s) for s in self.subsets], "query_text": list(self.query_text),
                                  "bootstrap": None if self.bootstrap is None else _json_floats(self.bootstrap),
                                  "settings": self.settings})

    @classmethod
    def load(cls, path: str | Path) -> LDSResult:
        d, _ = cls._read(path)

        def t(x):
            return torch.tensor([float("nan") if v is None else v for v in x])

        return cls(method=d["method"], per_query=t(d["per_query"]), predicted=torch.tensor(d["predicted"]),
                   actual=torch.tensor(d["actual"]), subsets=tuple(tuple(s) for s in d["subsets"]),
                   query_text=tuple(d["query_text"]), bootstrap=None if d["bootstrap"] is None else t(d["bootstrap"]),
                   settings=d["settings"])

    def __repr__(self) -> str:
        return (f"LDSResult(method={self.method!r}, lds={self.mean:.3f}, sem={self.sem:.3f}, n_query={self.n_query}, "
                f"n_subsets={self.n_subsets})")


def _score_matrix(retrains: SubsetRetrains, scores: Any, method: str | None
                  ) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """``(n_train, n_q)`` scores in the retrains' row order and the ``(subset, n_q)`` measurements."""
    actual = retrains.measurements.double().numpy()
    if isinstance(scores, InfluenceResult):
        s = scores.settings or {}
        for name, mine in (("query_measurement", retrains.measurement), ("query_link", retrains.link)):
            if name in s and s[name] != mine:
                raise ValueError(f"linear datamodeling score: the scores explain {name.split('_')[1]} "
                                 f"{s[name]!r} but the retrains measured {mine!r}; compute both for one query")
        if tuple(scores.query_text) != tuple(retrains.query_text):
            raise ValueError(f"linear datamodeling score: the scores' {scores.n_query} queries differ from the "
                             f"retrains' {retrains.n_query} (compute both for one query: same measurement, "
                             "max_queries and seed)")
        if set(scores.example_ids) != set(retrains.example_ids) or len(scores.example_ids) != retrains.n_train:
            raise ValueError("linear datamodeling score: the scores' training rows (example_ids) differ from the "
                             "retrains' training set")
        col = {e: i for i, e in enumerate(scores.example_ids)}
        order = [col[e] for e in retrains.example_ids]
        tau = scores.scores.detach().double().cpu().numpy()[:, order].T  # (n_train, row)
        if scores.aggregated:  # one row: the scores of the mean measurement over the queries
            actual = actual.mean(1, keepdims=True)
        return tau, actual, method or scores.method, {"method_settings": s}
    tau = torch.as_tensor(scores).detach().double().cpu().numpy() if not isinstance(scores, np.ndarray) \
        else scores.astype(float)
    if tau.ndim == 1:
        if tau.shape[0] != retrains.n_train:
            raise ValueError(f"scores: expected ({retrains.n_train},) for the mean measurement, got {tau.shape}")
        return tau[:, None], actual.mean(1, keepdims=True), method or "scores", {}
    if tau.shape != (retrains.n_query, retrains.n_train):
        raise ValueError(f"scores: expected an InfluenceResult or a (n_query={retrains.n_query}, "
                         f"n_train={retrains.n_train}) matrix in the retrains' row order, got {tau.shape}")
    return tau.T, actual, method or "scores", {}


def _score(retrains: SubsetRetrains, scores: Any, *, method: str | None, n_bootstrap: int, seed: int) -> LDSResult:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    tau, actual, name, extra = _score_matrix(retrains, scores, method)
    if not np.isfinite(tau).all():
        raise ValueError(f"linear datamodeling score: the scores of {name!r} hold NaN or infinite values")
    predicted = retrains.mask().astype(float) @ tau  # (subset, n_q): sum of each subset's scores
    per_query = spearman_per_column(predicted, actual)
    boot = None
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        k = retrains.n_subsets
        draws = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, k, size=k)
            v = spearman_per_column(predicted[idx], actual[idx])
            draws.append(np.nanmean(v) if (~np.isnan(v)).any() else np.nan)
        boot = torch.tensor(draws, dtype=torch.float64).float()
    query_text = retrains.query_text if actual.shape[1] == retrains.n_query else ("mean over queries",)
    settings = {**(retrains.settings or {}), "measurement": retrains.measurement, "link": retrains.link,
                "n_bootstrap": n_bootstrap, "bootstrap_seed": seed, **extra}
    return LDSResult(method=name, per_query=torch.tensor(per_query).float(), predicted=torch.tensor(predicted).float(),
                     actual=torch.tensor(actual).float(), subsets=retrains.subsets, query_text=tuple(query_text),
                     bootstrap=boot, settings=settings)


@takes_config(LDSConfig)
def linear_datamodeling_score(subject: Any, scores: InfluenceResult | Any, query: Query | Dataset | None = None, *,
                              twin: str | None = None, method: str | None = None, cache: bool = True,
                              overwrite: bool = False, progress: bool = True, config: LDSConfig) -> LDSResult:
    """The linear datamodeling score of ``scores``: the mean over queries of the Spearman
    correlation, across K random ``alpha``-subsets of the training set, between the summed
    scores of each subset's rows and the query's measurement after retraining on it.

    Args:
        subject: a :class:`SubsetRetrains` already computed (retrain once, score every
            method against the same models), or a run (a Pair / its run directory): then the
            retrains are :func:`subset_retrains` with ``twin``, ``n_subsets``, ``alpha``,
            ``seed``, ``cache`` and ``overwrite`` (cached weights are reused across calls).
        scores: an :class:`InfluenceResult` of the subject's twin (its queries, measurement and
            training rows must be the retrains'; an aggregated result, one row, is scored
            against the mean measurement over queries), or a ``(n_query, n_train)`` matrix (or
            ``(n_train,)`` for the mean measurement) with columns in the retrains' row order.
        query: for a run: the query (default: the one the InfluenceResult explains — the
            run's backdoor query with its ``measurement``, ``max_queries`` and ``seed``).
        method: the name to report (default: the InfluenceResult's method).
        n_subsets, alpha, seed, n_bootstrap: the :class:`LDSConfig` (``seed`` draws the subsets
            and seeds the bootstrap; ``n_bootstrap`` resamples of the subsets for
            ``LDSResult.bootstrap_sd``, 0: none).

    Returns an :class:`LDSResult` (``.mean`` is the LDS; near 1: the scores predict retraining;
    near 0: no better than random scores).
    """
    if isinstance(subject, SubsetRetrains):
        if query is not None:
            raise ValueError("linear_datamodeling_score: query= is for a run (a Pair); SubsetRetrains already hold "
                             "their query's measurements")
        retrains = subject
    else:
        kw: dict[str, Any] = {}
        if query is None and isinstance(scores, InfluenceResult):
            st = scores.settings or {}
            kw = {"measurement": st.get("measurement", "logprob"), "max_queries": st.get("max_queries"),
                  "query_seed": st.get("seed", 0)}
        retrains = subset_retrains(subject, query, twin=twin, cache=cache, overwrite=overwrite, progress=progress,
                                   config=config.subsets(), **kw)
    return _score(retrains, scores, method=method, n_bootstrap=config.n_bootstrap, seed=config.seed)


__all__ = ["LDSConfig", "LDSResult", "SubsetConfig", "SubsetRetrains", "draw_subsets", "linear_datamodeling_score",
           "query_measurements", "spearman_per_column", "subset_retrains", "train_on_subset"]
