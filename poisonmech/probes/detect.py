"""Unsupervised poison detectors on a model's training-set representations.

- ``"spectral"`` (Tran, Li & Madry 2018, *Spectral Signatures in Backdoor Attacks*): within
  each class (by default each distinct completion: the poison hides inside its target's
  class), centre the representations, take the top right singular vector ``v`` and score
  every row by its squared projection ``((r - mean) · v)^2``. Scores are divided by their
  class mean so that classes of different spread are comparable (ranking within a class is
  unchanged).
- ``"activation_clustering"`` (Chen et al. 2018, *Detecting Backdoor Attacks on Deep Neural
  Networks by Activation Clustering*): within each class, reduce to ``n_components`` dims
  (ICA, as in the paper, or PCA), split in two with 2-means; the smaller cluster is the
  suspect. Every row gets ``silhouette(class) * margin`` where ``margin = (d_big - d_small)
  / (d_big + d_small)`` is positive for members of the smaller cluster: rows of the small
  cluster of a cleanly split class rank first.

Both score every training row (higher = more suspicious). Where the data carries the known
``is_poison`` column the result reports AUROC, average precision and precision@k, beside a
plain baseline: each row's mean per-token training loss under the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from transformers import PreTrainedTokenizerBase

from poisonmech import ranking
from poisonmech.config import takes_config
from poisonmech.encoding import encode
from poisonmech.metrics import score_completions
from poisonmech.probes.activations import (
    check_site_layers,
    gather_activations,
    n_layers_of,
    prompt_encoding,
    tokenizer_of,
)
from poisonmech.probes.config import DETECTORS, DetectConfig
from poisonmech.probes.linear import few_threads
from poisonmech.probes.result import num, read_probe_file
from poisonmech.results import Result
from poisonmech.runtime import eval_mode
from poisonmech.subject import resolve

Tensor = torch.Tensor
SCORES = ("detector", "loss")


# ---- the detectors on plain arrays (usable on any representations) ---------------------------
def spectral_scores(reps: Float[np.ndarray, "n_train d_model"], classes: Int[np.ndarray, " n_train"]
                    ) -> tuple[Float[np.ndarray, " n_train"], list[dict[str, Any]]]:
    """Tran et al. outlier scores (squared projection on the top singular vector of each
    centred class, divided by the class mean); and per-class statistics."""
    reps = np.asarray(reps, dtype=np.float64)
    scores = np.zeros(len(reps))
    stats = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        if len(idx) < 2:
            stats.append({"class": int(c), "n": len(idx), "top_singular_value": float("nan")})
            continue
        centred = reps[idx] - reps[idx].mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        proj2 = (centred @ vt[0]) ** 2
        scores[idx] = proj2 / max(proj2.mean(), 1e-30)
        stats.append({"class": int(c), "n": len(idx), "top_singular_value": float(s[0]),
                      "explained": float(s[0] ** 2 / max((s ** 2).sum(), 1e-30))})
    return scores, stats


def clustering_scores(reps: Float[np.ndarray, "n_train d_model"], classes: Int[np.ndarray, " n_train"], *,
                      n_components: int = 10, reduce: Literal["ica", "pca"] = "ica", seed: int = 0
                      ) -> tuple[Float[np.ndarray, " n_train"], list[dict[str, Any]]]:
    """Chen et al. activation clustering scores (see the module docstring); and per-class
    statistics (size, smaller-cluster fraction, silhouette)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score

    if reduce not in ("ica", "pca"):
        raise ValueError(f"reduce must be 'ica' or 'pca', got {reduce!r}")
    reps = np.asarray(reps, dtype=np.float64)
    scores = np.zeros(len(reps))
    stats = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        k = min(n_components, reps.shape[1], len(idx) - 1)
        if len(idx) < 4 or k < 1:
            stats.append({"class": int(c), "n": len(idx), "small_fraction": float("nan"),
                          "silhouette": float("nan")})
            continue
        x = reps[idx]
        with warnings.catch_warnings(), few_threads(x.size):
            warnings.simplefilter("ignore", ConvergenceWarning)  # ICA only needs to be roughly right here
            if reduce == "ica":
                z = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=500).fit_transform(x)
            else:
                z = PCA(n_components=k, random_state=seed).fit_transform(x)
            km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
            lab = km.labels_
            sil = float(silhouette_score(z, lab, sample_size=min(len(idx), 2000), random_state=seed)) \
                if len(np.unique(lab)) == 2 else 0.0
        if len(np.unique(lab)) < 2:
            stats.append({"class": int(c), "n": len(idx), "small_fraction": 0.0, "silhouette": 0.0})
            continue
        small = int(np.argmin(np.bincount(lab, minlength=2)))
        d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=-1)
        d_small, d_big = d[:, small], d[:, 1 - small]
        margin = (d_big - d_small) / np.maximum(d_big + d_small, 1e-30)
        scores[idx] = sil * margin
        stats.append({"class": int(c), "n": len(idx), "small_fraction": float(np.mean(lab == small)),
                      "silhouette": sil})
    return scores, stats


# ---- the result --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionResult(Result):
    """A poison score for every training row, with the loss baseline and the known poison flags.

    Attributes:
        scores: detector score per row (higher = more suspicious).
        loss: the row's mean per-token loss under the model (the plain baseline).
        is_poison: the known poison flags, or ``None`` when the data has no ``is_poison`` column.
        class_index: each row's class (an index into ``classes``).
        classes: the class names (completions, or the ``by`` column's values).
        class_stats: per-class statistics of the detector (sizes, singular values, silhouettes).
        method, site, layer, position: where the representations were read.
        k: the default ``k`` of ``precision_at`` (the number of poisoned rows when known).

    The metrics are :mod:`poisonmech.ranking`'s: NaN where the flags have one class (AUROC) or
    no poisoned row (AP, the default precision@k); a ``k`` < 1 is an error.
    """

    scores: Float[Tensor, " n_train"]
    loss: Float[Tensor, " n_train"]
    is_poison: Bool[Tensor, " n_train"] | None
    class_index: Int[Tensor, " n_train"]
    classes: tuple[str, ...]
    class_stats: tuple[dict[str, Any], ...]
    method: str
    site: str
    layer: int
    position: str
    k: int | None = None

    kind: ClassVar[str] = "probes.detection"
    version: ClassVar[int] = 1

    def __repr__(self) -> str:
        head = (f"DetectionResult {self.method!r} at {self.site} layer {self.layer} ({self.position}): "
                f"{len(self.scores)} rows, {len(self.classes)} classes")
        if self.is_poison is None:
            return head + ", no is_poison column (quality not measurable)"
        return (f"{head}, {int(self.is_poison.sum())} poisoned\n"
                f"  AUROC {num(self.poison_auroc())} (loss baseline {num(self.poison_auroc('loss'))}) | "
                f"AP {num(self.average_precision())} (loss {num(self.average_precision('loss'))}) | "
                f"precision@{self.k} {num(self.precision_at())} (loss {num(self.precision_at(scores='loss'))})")

    def _pick(self, scores: str) -> np.ndarray:
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {SCORES}, got {scores!r}")
        return (self.scores if scores == "detector" else self.loss).numpy()

    def _truth(self) -> np.ndarray:
        if self.is_poison is None:
            raise ValueError("is_poison: the training data had no 'is_poison' column, so detection "
                             "quality cannot be measured")
        return self.is_poison.numpy()

    def poison_auroc(self, scores: Literal["detector", "loss"] = "detector") -> float:
        """AUROC of ``scores`` (the detector's or the loss baseline's) against ``is_poison``
        (NaN when every row or none is poisoned)."""
        return ranking.auroc(self._pick(scores), self._truth())

    def average_precision(self, scores: Literal["detector", "loss"] = "detector") -> float:
        """Average precision of retrieving the poisoned rows by ``scores`` (NaN without poison)."""
        return ranking.average_precision(self._pick(scores), self._truth())

    def precision_at(self, k: int | None = None, scores: Literal["detector", "loss"] = "detector") -> float:
        """Fraction of poisoned rows among the ``k`` highest scores (ties by row order).

        ``k`` defaults to the number of poisoned rows (NaN when there are none); an explicit
        ``k`` must be an integer >= 1 (:func:`poisonmech.ranking.check_k`), and one larger than
        the number of rows uses every row.
        """
        y = self._truth()
        if k is None:
            if not self.k:
                return float("nan")
            k = self.k
        return ranking.precision_at_k(self._pick(scores), y, ranking.check_k(k, "precision_at: k"))

    def top(self, k: int) -> Int[Tensor, " k"]:
        """Row indices of the ``k`` most suspicious rows (ties by row order)."""
        return torch.as_tensor(ranking.top_k(self.scores.numpy(), k))

    def to_frame(self, per_example: bool = False) -> pd.DataFrame:
        """Summary: one row per (score, metric) for the detector and the loss baseline;
        ``per_example=True``: one row per training row (class, scores, ranks, is_poison)."""
        if per_example:
            s = self.scores.numpy()
            frame = pd.DataFrame({"row": np.arange(len(s)),
                                  "class": [self.classes[i] for i in self.class_index.tolist()],
                                  "score": s, "loss": self.loss.numpy(),
                                  "rank": pd.Series(-s).rank(method="first").astype(int).to_numpy()})
            if self.is_poison is not None:
                frame["is_poison"] = self.is_poison.numpy()
            frame.insert(0, "method", self.method)
            return frame
        if self.is_poison is None:
            return pd.DataFrame(columns=["method", "score", "metric", "value"])
        rows = []
        for which, name in (("detector", self.method), ("loss", "loss baseline")):
            for metric, value in (("auroc", self.poison_auroc(which)),
                                  ("average_precision", self.average_precision(which)),
                                  (f"precision_at_{self.k}", self.precision_at(None, which))):
                rows.append({"method": self.method, "score": name, "metric": metric, "value": value,
                             "site": self.site, "layer": self.layer, "n_poison": int(self._truth().sum()),
                             "n_train": len(self.scores)})
        return pd.DataFrame(rows)

    def plot(self, kind: Literal["roc", "hist"] = "roc", title: str | None = None):
        """ROC curves of the detector and the loss baseline (``"roc"``), or the detector's score
        histogram split by ``is_poison`` (``"hist"``; the only kind without poison flags)."""
        import plotly.graph_objects as go

        title = title or f"poison detection: {self.method} at {self.site} layer {self.layer}"
        fig = go.Figure()
        if kind == "roc" and self.is_poison is not None:
            from sklearn.metrics import roc_curve

            y = self._truth()
            for which, name in (("detector", self.method), ("loss", "loss baseline")):
                fpr, tpr, _ = roc_curve(y, self._pick(which))
                fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines",
                                         name=f"{name} (AUROC {self.poison_auroc(which):.3f})"))
            fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                                     name="chance"))
            fig.update_layout(xaxis_title="false positive rate", yaxis_title="true positive rate")
        elif kind in ("roc", "hist"):
            s = self.scores.numpy()
            groups = [("all rows", np.ones(len(s), bool))] if self.is_poison is None else \
                [("clean rows", ~self._truth()), ("poisoned rows", self._truth())]
            for name, m in groups:
                fig.add_trace(go.Histogram(x=s[m], name=name, opacity=0.6, histnorm="probability"))
            fig.update_layout(barmode="overlay", xaxis_title=f"{self.method} score", yaxis_title="fraction of rows")
        else:
            raise ValueError(f"kind must be 'roc' or 'hist', got {kind!r}")
        fig.update_layout(title=title, template="plotly_white")
        return fig

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (scores, loss, flags + JSON header)."""
        tensors = {"scores": self.scores, "loss": self.loss, "class_index": self.class_index}
        if self.is_poison is not None:
            tensors["is_poison"] = self.is_poison
        return self._write(path, {"classes": list(self.classes), "class_stats": list(self.class_stats),
                                  "method": self.method, "site": self.site, "layer": self.layer,
                                  "position": self.position, "k": self.k}, tensors)

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """Read a file written by :meth:`save` (another kind of file is an error)."""
        t, m = read_probe_file(cls, path)
        return cls(scores=t["scores"], loss=t["loss"], is_poison=t.get("is_poison"), class_index=t["class_index"],
                   classes=tuple(m["classes"]), class_stats=tuple(m["class_stats"]), method=m["method"],
                   site=m["site"], layer=m["layer"], position=m["position"], k=m["k"])


# ---- the entry point ---------------------------------------------------------------------------
@torch.no_grad()
def example_losses(model: torch.nn.Module, data: Dataset, tokenizer: PreTrainedTokenizerBase, *,
                   batch_size: int = 256) -> Float[np.ndarray, " n_train"]:
    """Mean per-token loss of every row (on the completion; on all tokens when every completion is empty)."""
    comps = list(data["completion"]) if "completion" in data.column_names else [""] * len(data)
    loss_on = "completion" if any(c.strip() for c in comps) else "all"
    rows = Dataset.from_dict({"prompt": list(data["prompt"]), "completion": comps})
    with eval_mode(model):
        res = score_completions(model, encode(rows, tokenizer, loss_on=loss_on), batch_size=batch_size)
    return res["nll"] / np.maximum(res["n"], 1)


@takes_config(DetectConfig)
def detect_poison(subject, train_data: Dataset | None = None, method: str | None = None, *, twin: str | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True,
                  config: DetectConfig) -> DetectionResult:
    """Score every training row for how likely it is poisoned, without using the poison flags.

    Args:
        subject: a run (``Pair``, pipeline stage, run directory, ...) or a bare model
            (:func:`poisonmech.resolve`); the model read is the trained one (``twin``,
            default: the backdoored twin / the model after the stages).
        train_data: its training rows (``prompt``; ``completion``; ``is_poison`` if known);
            default: the run's training rows (a bare model needs them).
        method: ``"spectral"`` (Tran et al. 2018) or ``"activation_clustering"`` (Chen et
            al. 2018); default ``"spectral"``.
        tokenizer: default: the subject's.
        The options are :class:`DetectConfig`'s (``layer``: default the last; ``site``;
        ``position``: ``"last"``, ``"mean"`` or an int; ``by``: the class column; ``n_components``
        and ``reduce`` for activation clustering; ``batch_size``; ``seed``).

    Returns a ``DetectionResult``: ``.poison_auroc()``, ``.average_precision()``,
    ``.precision_at(k)`` (each also for ``scores="loss"``), ``.to_frame()``, ``.plot()``.
    """
    s = resolve(subject, tokenizer=tokenizer, where="detect_poison")
    return _detect(s, twin, train_data, (config.method,), config, progress)[config.method]


@takes_config(DetectConfig)
def detect_poison_methods(subject, train_data: Dataset | None = None, methods: Sequence[str] | None = None, *,
                          twin: str | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                          progress: bool = True, config: DetectConfig) -> dict[str, DetectionResult]:
    """:func:`detect_poison` for several ``methods`` at once (default: every detector),
    ``{method: DetectionResult}``: the training-set activations and the per-example losses are
    computed once and shared. ``methods`` replaces the config's ``method``."""
    methods = DETECTORS if methods is None else tuple(methods) if not isinstance(methods, str) else (methods,)
    bad = [m for m in methods if m not in DETECTORS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty sequence of {DETECTORS}, got {list(methods)!r}")
    s = resolve(subject, tokenizer=tokenizer, where="detect_poison_methods")
    return _detect(s, twin, train_data, methods, config, progress)


def _detect(s, twin: str | None, train_data: Dataset | None, methods: tuple[str, ...], cfg: DetectConfig,
            progress: bool) -> dict[str, DetectionResult]:
    """The detectors on ``twin``'s training rows (``train_data``, else that role's own)."""
    where = "detect_poison" if len(methods) == 1 else "detect_poison_methods"
    model = s.model(twin)
    if train_data is None:
        train_data = s.train_data_of(twin)
    if train_data is None:
        s.require("train_data", where, "train_data")  # a subject without training rows: says so
        raise ValueError(f"{where}: the subject carries no training rows of {s.role(twin)!r}; pass train_data=")
    tok = tokenizer_of(s, where)
    site, position, by = cfg.site, cfg.position, cfg.by
    layer = n_layers_of(model) - 1 if cfg.layer is None else cfg.layer
    (layer,) = check_site_layers(model, site, layer)
    if by is not None and by not in train_data.column_names:
        raise ValueError(f"by={by!r}: the training data has no such column; columns: {train_data.column_names}")
    enc = prompt_encoding(train_data, tok)
    pos = (-1,) if position in ("last", "mean") else (int(position),)
    acts = gather_activations(model, enc, site=site, layers=(layer,), positions=pos, mean=position == "mean",
                              batch_size=cfg.batch_size, progress=progress, desc="training-set activations")
    if not acts.valid.all():
        raise ValueError(f"position={position}: {int((~acts.valid[:, 0]).sum())} rows are shorter than that")
    reps = acts.acts[0, :, 0].double().numpy()
    if by is None:
        classes, cls_idx = ("all",), np.zeros(len(train_data), dtype=np.int64)
    else:
        names, cls_idx = np.unique(np.asarray([str(v) for v in train_data[by]]), return_inverse=True)
        classes = tuple(names.tolist())
    loss = example_losses(model, train_data, tok, batch_size=max(cfg.batch_size, 256))
    is_poison = None
    if "is_poison" in train_data.column_names:
        is_poison = torch.as_tensor(np.asarray(train_data["is_poison"], dtype=bool))
    out = {}
    for method in methods:
        if method == "spectral":
            scores, stats = spectral_scores(reps, cls_idx)
        else:
            scores, stats = clustering_scores(reps, cls_idx, n_components=cfg.n_components, reduce=cfg.reduce,
                                              seed=cfg.seed)
        for st in stats:
            st["class"] = classes[st["class"]]
        out[method] = DetectionResult(scores=torch.as_tensor(scores, dtype=torch.float64),
                                      loss=torch.as_tensor(loss, dtype=torch.float64), is_poison=is_poison,
                                      class_index=torch.as_tensor(cls_idx, dtype=torch.long), classes=classes,
                                      class_stats=tuple(stats), method=method, site=site, layer=layer,
                                      position=str(position), k=int(is_poison.sum()) if is_poison is not None else None)
    return out


def detection_table(results: Sequence[DetectionResult]) -> pd.DataFrame:
    """Several detectors' summaries in one frame (the loss baseline once)."""
    frames = [r.to_frame() for r in results]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out.drop_duplicates(subset=["score", "metric", "site", "layer"], keep="first").reset_index(drop=True)
