"""``attribute``: which training examples drive a measurement, by any of eight methods.

    import poisonmech as pm
    pair = pm.load_pair("runs/demo")
    inf = pm.influence.attribute(pair, method="ekfac")      # triggered test inputs as queries
    inf.poison_auroc(), inf.top(10), inf.by_component(), inf.plot()

Methods (every score: positive = up-weighting the example raises the measurement):

==========  ==============================================================================
``loss``     the example's training loss (baseline; query-independent)
``repsim``   cosine of final-layer representations (baseline)
``graddot``  ``∇L_q · ∇L_z`` over the tracked maps
``gradcos``  the same with both gradients unit-normalised
``tracin``   ``Σ_checkpoints lr · ∇L_q · ∇L_z`` (Pruthi et al. 2020), the run's checkpoints
``trak``     projected gradients through the kernel inverse (Park et al. 2023)
``kfac``     influence function ``∇L_q^T (G ⊗ A + δ)^{-1} ∇L_z``
``ekfac``    the same with eigenvalue-corrected curvature (Grosse et al. 2023)
==========  ==============================================================================

Expensive parts are cached under the run directory (``<run>/influence/<twin>/``), keyed by
everything they depend on (settings, weights, data): curvature factors, TRAK features and
finished results, each a safetensors file with a JSON sidecar of its settings;
``overwrite=True`` recomputes.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.config import Config, ConfigError, check_choice, check_number, takes_config
from poisonmech.encoding import Encoded, encode
from poisonmech.influence import trak as trak_mod
from poisonmech.influence.baselines import loss_scores, repsim_scores
from poisonmech.influence.kfac import FISHERS, Factors, fit_factors
from poisonmech.influence.methods import (
    RENORMALIZE,
    Scores,
    gradient_scores,
    precondition_rotated,
    query_gradients,
    unit_queries,
    with_weights,
)
from poisonmech.influence.preference import (
    check_preference_config,
    combine,
    dpo_weights,
    encode_pairs,
    is_preference_data,
    pair_text,
    same_pairs,
)
from poisonmech.influence.query import MEASUREMENTS, MetricQuery, Query, backdoor_query, metric_name
from poisonmech.influence.result import InfluenceResult
from poisonmech.influence.reward import REWARD_MEASUREMENTS, RewardQuery, attribute_reward
from poisonmech.influence.tracking import PRESETS, TrackedModule, find_modules
from poisonmech.runtime import eval_mode, model_device
from poisonmech.storage import load_tensors, save_tensors, write_json
from poisonmech.subject import Subject, model_fingerprint, resolve
from poisonmech.train.loop import Checkpoint
from poisonmech.weights import lora_module

Tensor = torch.Tensor

METHODS = ("ekfac", "kfac", "tracin", "trak", "graddot", "gradcos", "repsim", "loss")
#: methods with a self-influence (``∇L_z^T P ∇L_z``)
SELF_INFLUENCE = ("ekfac", "kfac", "tracin", "trak", "graddot")
#: bumped when a change alters cached factors, features or results (part of every cache key)
CACHE_VERSION = 1
#: methods that can average over checkpoints (``ensemble``)
ENSEMBLE_METHODS = ("graddot", "gradcos", "trak", "kfac", "ekfac")


@dataclass(frozen=True)
class InfluenceConfig(Config):
    """The options of one attribution (with the weights, data and query, the cache key of its result).

    Args:
        method: one of ``METHODS``.
        measurement: what is attributed. ``None`` (the default): the model's default,
            ``"logprob"`` for a language model, ``"reward_margin"`` for a reward model. A name:
            the run's default query of a language model
            (:func:`~poisonmech.influence.query.backdoor_query`): ``"logprob"``, ``"logodds"``,
            ``"contrastive"``, ``"contrastive_logodds"``; of a reward model
            (:func:`~poisonmech.influence.reward.reward_query`): ``"reward_margin"``,
            ``"reward"``, ``"trigger_margin"``. Or a patching metric (a
            :class:`~poisonmech.patching.metrics.Metric`, logits ``[batch pos d_vocab]`` ->
            ``[batch]``, e.g. ``tc.logit_diff()``; or one scalar for the batch), with ``query=``
            the tokens it reads: for the gradient methods (``graddot``, ``gradcos``, ``tracin``,
            ``trak``, ``kfac``, ``ekfac``; ``loss`` ignores the query). A result of a metric is
            not cached (a callable has no stable hash).
        aggregate: score the mean measurement over the queries (one pass; the result's
            ``scores`` are one row, ``(1, n_train)``).
        modules: which maps the gradient methods see: ``"linear"``, ``"all"`` (plus embeddings)
            or glob patterns of map labels/paths.
        damping: K-FAC/EK-FAC/TRAK damping; ``None`` = 0.1 × each block's mean eigenvalue.
        fisher: curvature from sampled labels (``"mc"``, the true Fisher) or the data (``"empirical"``).
        renormalize: ``None``; ``"unit"`` (unit-normalised gradients); ``"relative"`` (divide by
            the square root of the example's self-influence, Barshan et al. 2020).
        self_influence: also compute each training example's self-influence.
        projection_dim: TRAK features per map.
        ensemble: score with the last this many checkpoints of the run and average the scores,
            each standardised over the training set first (their scales differ by orders of
            magnitude across training); 1 (default): the model as given. For ``graddot``,
            ``gradcos``, ``trak``, ``kfac`` and ``ekfac`` (``tracin`` always sums all checkpoints).
        max_queries: use a seeded subset of the run's default queries.
        batch_size: rows per forward/backward pass.
        seed: seeds sampled labels, projections and query subsets.
    """

    method: str = "ekfac"
    measurement: str | Callable | None = None
    aggregate: bool = False
    modules: str | tuple[str, ...] = "linear"
    damping: float | None = None
    fisher: str = "mc"
    renormalize: str | None = None
    self_influence: bool = False
    projection_dim: int = 256
    ensemble: int = 1
    max_queries: int | None = None
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.modules, str) and isinstance(self.modules, (list, tuple)):
            object.__setattr__(self, "modules", tuple(self.modules))
        super().__post_init__()

    def check(self) -> None:
        own = "InfluenceConfig"
        check_choice(own, "method", self.method, METHODS)
        if self.measurement is not None and not callable(self.measurement) and \
                self.measurement not in MEASUREMENTS + REWARD_MEASUREMENTS:
            raise ConfigError(f"{own}.measurement must be one of {MEASUREMENTS} (a language model's), "
                              f"{REWARD_MEASUREMENTS} (a reward model's), None (the model's default) or a metric "
                              f"(logits [batch pos d_vocab] -> [batch]), got {self.measurement!r}")
        for name in ("aggregate", "self_influence"):
            check_choice(own, name, getattr(self, name), (False, True))
        if isinstance(self.modules, str):
            ok = self.modules in PRESETS
        else:
            ok = isinstance(self.modules, tuple) and bool(self.modules) and all(isinstance(m, str) for m in self.modules)
        if not ok:
            raise ConfigError(f"{own}.modules must be one of {PRESETS} or a non-empty list of glob patterns, "
                              f"got {self.modules!r}")
        check_choice(own, "fisher", self.fisher, FISHERS)
        check_choice(own, "renormalize", self.renormalize, RENORMALIZE)
        check_number(own, "damping", self.damping, lo=0, optional=True)
        for name in ("projection_dim", "ensemble", "batch_size"):
            check_number(own, name, getattr(self, name), lo=1, integer=True)
        check_number(own, "max_queries", self.max_queries, lo=1, integer=True, optional=True)
        check_number(own, "seed", self.seed, lo=0, integer=True)
        if self.ensemble > 1 and self.method not in ENSEMBLE_METHODS:
            raise ConfigError(f"{own}.ensemble={self.ensemble}: checkpoint ensembles are for {ENSEMBLE_METHODS}, "
                              f"not method={self.method!r}")

    @property
    def metric(self) -> Callable | None:
        """The patching metric measured, or ``None`` for a named measurement."""
        return self.measurement if callable(self.measurement) else None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON types (a metric measurement as its name, ``"metric:<class>"``)."""
        d = super().to_dict()
        if self.metric is not None:
            d["measurement"] = metric_name(self.metric)
        return d

    def fingerprint(self) -> str:
        """As :meth:`Config.fingerprint`; with a metric measurement the hash takes the metric's
        ``repr`` (a callable has no stable hash) and warns: it is then no cache key
        (``attribute`` caches no result of a metric)."""
        if self.metric is None:
            return super().fingerprint()
        warnings.warn(f"InfluenceConfig.fingerprint: the measurement is a metric ({metric_name(self.metric)}), "
                      "which has no stable hash; the fingerprint uses its repr and should not key a cache",
                      stacklevel=2)
        blob = json.dumps({"config": type(self).__name__, **self.to_dict(), "metric_repr": repr(self.metric)},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- inputs
def _check_tokenizer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    own = getattr(model, "tokenizer", None)
    if tokenizer is None:
        if own is None:
            raise ValueError("attribute: the model carries no tokenizer; pass tokenizer=")
        return own
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ValueError("attribute: the train set's tokenizer differs from the model's (their vocabularies "
                         f"differ: {len(tokenizer)} vs {len(own)} tokens); encode the data with the tokenizer "
                         "the model was trained with (for a run: pair.tokenizer)")
    return tokenizer


def _check_ids(enc: Encoded, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, what: str,
               rows: Dataset) -> None:
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if d_vocab is None:  # a plain Hugging Face module (or its peft version)
        d_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max((max(r) for r in enc.ids if r), default=-1)
    if d_vocab is not None and top >= d_vocab:
        raise ValueError(f"attribute: the {what} holds token id {top} but the model's vocabulary has {d_vocab} "
                         "tokens: its tokenizer differs from the model's")
    unk = tokenizer.unk_token_id
    if unk is not None:
        bad = [i for i, r in enumerate(enc.ids) if unk in r]
        if bad:
            i = bad[0]
            raise ValueError(f"attribute: {len(bad)} {what} rows contain words unknown to the model's tokenizer "
                             f"(e.g. row {i}: {rows[i]['prompt'][:60]!r}); was the data built for another "
                             "tokenizer? Use the data of the model's own task/run")


def _checkpoint_list(checkpoints: Sequence[Any] | None) -> list[tuple[Path, float]]:
    out = []
    for c in checkpoints or []:
        if isinstance(c, Checkpoint):
            out.append((Path(c.path), float(c.lr)))
        else:
            path, lr = c
            out.append((Path(path), float(lr)))
    return out


# ---------------------------------------------------------------------------- caching
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(enc: Encoded) -> str:
    """A hash of encoded rows (their token ids and scored spans): the data part of the cache keys.

    Kept as it was (rather than :func:`~poisonmech.subject.dataset_fingerprint` of the rows)
    so that the caches of earlier runs stay valid: the key is of what the scores depend on,
    the tokens."""
    return _sha([enc.ids, enc.start])


class _Cache:
    """Files under one folder, named by kind and a hash of their settings (JSON sidecar)."""

    def __init__(self, root: Path | None, overwrite: bool):
        self.root, self.overwrite = root, overwrite

    def path(self, kind: str, settings: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{kind}-{_sha(settings)[:16]}.safetensors"

    def hit(self, path: Path | None) -> bool:
        return path is not None and path.is_file() and not self.overwrite

    def note(self, path: Path | None, settings: dict[str, Any]) -> None:
        if path is not None:
            write_json(path.with_suffix(".json"), settings)


# ---------------------------------------------------------------------------- methods
def _factors(model, modules, data, cfg: InfluenceConfig, cache: _Cache, base: dict[str, Any],
             progress: bool) -> Factors:
    return _cached_factors(model, modules, cfg, cache, base, "factors",
                           lambda: fit_factors(model, modules, data, strategy=cfg.method, fisher=cfg.fisher,
                                               batch_size=cfg.batch_size, seed=cfg.seed, progress=progress))


def _cached_factors(model, modules, cfg: InfluenceConfig, cache: _Cache, base: dict[str, Any], kind: str,
                    fit: Callable[[], Factors]) -> Factors:
    """The method's curvature factors from the cache, else ``fit()`` (then cached), keyed by
    ``base``, the weights, ``kind`` and the fitting settings; damped as ``cfg`` asks. Shared
    with :func:`poisonmech.influence.reward._pair_factors`."""
    settings = {**base, "weights": model_fingerprint(model), "kind": kind, "strategy": cfg.method,
                "fisher": cfg.fisher, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "modules": [t.name for t in modules]}
    path = cache.path(f"factors-{cfg.method}", settings)
    if cache.hit(path):
        f = Factors.load(path, modules)
    else:
        f = fit()
        if path is not None:
            f.save(path, settings)
            cache.note(path, settings)
    f.damping = cfg.damping
    return f


#: memory for the queries' gradients held at once (pairwise scoring); beyond it the queries
#: are scored in chunks, one pass over the training set each (as kronfluence does per query batch)
QUERY_MEMORY_BYTES = 2 * 1024**3


def _query_chunks(n_query: int, modules: Sequence[TrackedModule]) -> list[list[int]]:
    per_query = 4 * sum(t.n_params for t in modules)
    size = max(1, QUERY_MEMORY_BYTES // per_query)
    return [list(range(lo, min(lo + size, n_query))) for lo in range(0, n_query, size)]


def _prepared_queries(model, modules, query, qenc, cfg: InfluenceConfig, factors: Factors | None, unit: bool,
                      chunk: list[int]) -> dict[str, torch.Tensor]:
    """The chunk's query gradients, unit-normalised and preconditioned as the method asks."""
    q = query_gradients(model, modules, query, qenc, aggregate=cfg.aggregate and not unit,
                        batch_size=cfg.batch_size, factors=factors, queries=chunk)
    if unit:  # rotation keeps norms: normalising in the eigenbasis is the same
        q = unit_queries(q)
        if cfg.aggregate:
            q = {k: g.sum(0, keepdim=True) for k, g in q.items()}
    return q


def _gradient_method(model, modules, data, query, qenc, cfg: InfluenceConfig, factors: Factors | None,
                     progress: bool, desc: str = "influence: scoring") -> Scores:
    def score(q: dict[str, torch.Tensor], **kw) -> Scores:
        return gradient_scores(model, modules, data, q, factors=factors, batch_size=cfg.batch_size,
                               progress=progress, **kw)

    return _chunked_scores(model, modules, query, qenc, cfg, factors, desc, score)


def _chunked_scores(model, modules, query, qenc, cfg: InfluenceConfig, factors: Factors | None, desc: str,
                    score: Callable[..., Scores]) -> Scores:
    """The query side (chunked, unit-normalised and preconditioned as the method asks) and one
    pass ``score(q, renormalize=, self_influence=, desc=)`` over the training data per chunk of
    queries (one pass with ``aggregate``): :func:`_gradient_method` over rows,
    :func:`poisonmech.influence.reward.pair_scores` over a reward model's preference pairs."""
    unit = cfg.method == "gradcos" or cfg.renormalize == "unit"
    renorm = "unit" if cfg.method == "gradcos" else cfg.renormalize
    selfi = cfg.self_influence and cfg.method in SELF_INFLUENCE
    chunks = _query_chunks(query.n_query, modules)
    t0 = time.perf_counter()
    t_query = 0.0
    if cfg.aggregate:  # one mean query, accumulated chunk by chunk
        q = None
        for chunk in chunks:
            part = _prepared_queries(model, modules, query, qenc, cfg, factors, unit, chunk)
            weight = len(chunk) if not unit else 1.0
            q = {k: v * weight for k, v in part.items()} if q is None else {k: q[k] + v * weight
                                                                            for k, v in part.items()}
        q = {k: v / query.n_query for k, v in q.items()}
        if factors is not None:
            q = precondition_rotated(factors, q)
        t_query = time.perf_counter() - t0
        s = score(q, renormalize=renorm, self_influence=selfi, desc=desc)
    else:
        s = None
        for i, chunk in enumerate(chunks):
            t1 = time.perf_counter()
            q = _prepared_queries(model, modules, query, qenc, cfg, factors, unit, chunk)
            if factors is not None:
                q = precondition_rotated(factors, q)
            t_query += time.perf_counter() - t1
            part = score(q, renormalize=renorm, self_influence=selfi and i == 0,
                         desc=desc if len(chunks) == 1 else f"{desc} (queries {chunk[0]}-{chunk[-1]})")
            part.components *= len(chunk) / query.n_query
            if s is None:
                s = part
            else:
                s.scores = torch.cat([s.scores, part.scores])
                s.components += part.components
    s.seconds = {**(factors.seconds if factors is not None else {}), "query gradients": t_query,
                 "scoring": time.perf_counter() - t0 - t_query}
    return s


def _add(acc: Scores | None, s: Scores, w: float) -> Scores:
    if acc is None:
        return Scores(scores=w * s.scores, components=None if s.components is None else w * s.components,
                      component_labels=s.component_labels,
                      self_scores=None if s.self_scores is None else w * s.self_scores)
    acc.scores += w * s.scores
    if acc.components is not None:
        acc.components += w * s.components
    if acc.self_scores is not None:
        acc.self_scores += w * s.self_scores
    return acc


def _tracin(model, modules, data, query, qenc, cfg, ckpts, progress) -> Scores:
    acc = None
    for i, (path, lr) in enumerate(ckpts):
        s = with_weights(model, load_tensors(path, device=model_device(model)),
                         lambda i=i: _gradient_method(model, modules, data, query, qenc, cfg, None, progress,
                                                      desc=f"influence: TracIn checkpoint {i + 1}/{len(ckpts)}"))
        acc = _add(acc, s, lr)
    return acc


def _trak(model, modules, data, query, qenc, cfg, cache: _Cache, base, progress, name: str) -> Scores:
    proj = trak_mod.projections(modules, cfg.projection_dim, cfg.seed)
    sizes = trak_mod.block_sizes(modules, proj)
    settings = {**base, "kind": "trak-features", "weights": model_fingerprint(model),
                "projection_dim": cfg.projection_dim, "seed": cfg.seed, "modules": [t.name for t in modules]}
    path = cache.path("trak-features", settings)
    t0 = time.perf_counter()
    if cache.hit(path):
        phi = load_tensors(path)["phi"]
    else:
        phi = trak_mod.features(model, modules, data, proj, batch_size=cfg.batch_size, progress=progress,
                                desc=f"influence: TRAK features ({name})")
        if path is not None:
            save_tensors(path, {"phi": phi})
            cache.note(path, settings)
    t1 = time.perf_counter()
    phi_q = trak_mod.features(model, modules, qenc, proj, query=query, batch_size=cfg.batch_size,
                              progress=False)
    if cfg.aggregate:
        phi_q = phi_q.mean(0, keepdim=True)
    s = trak_mod.kernel_scores(phi, phi_q, sizes, [t.label for t in modules], damping=cfg.damping,
                               self_influence=cfg.self_influence)
    s.seconds = {"features": t1 - t0, "scoring": time.perf_counter() - t1}
    return s


def _standardised(s: Scores) -> Scores:
    """Scores z-scored over the training set (per query); components scaled alike (not shifted)."""
    sd = s.scores.std(-1, keepdim=True).clamp(min=1e-30)
    scores = (s.scores - s.scores.mean(-1, keepdim=True)) / sd
    comps = None
    if s.components is not None:
        comps = s.components / s.scores.mean(0).std().clamp(min=1e-30)
    return Scores(scores=scores, components=comps, component_labels=s.component_labels, self_scores=s.self_scores,
                  seconds=s.seconds)


def _ensemble(model, ckpts: list[tuple[Path, float]], cfg: InfluenceConfig, run) -> Scores:
    """``run(name)`` on the model as given, or averaged over the last ``cfg.ensemble`` checkpoints."""
    if cfg.ensemble == 1:
        return run("model")
    if len(ckpts) < cfg.ensemble:
        raise ValueError(f"ensemble={cfg.ensemble} but only {len(ckpts)} checkpoints are known (pass a pair "
                         "trained with checkpoints, or checkpoints=[...])")
    acc, seconds = None, {}
    device = model_device(model)
    for path, _ in ckpts[-cfg.ensemble:]:
        s = _standardised(with_weights(model, load_tensors(path, device=device), lambda p=path: run(Path(p).stem)))
        for k, v in s.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        acc = _add(acc, s, 1.0 / cfg.ensemble)
    acc.seconds = seconds
    return acc


# ---------------------------------------------------------------------------- entry point
def _result(cfg: InfluenceConfig, s: Scores, query: Query | MetricQuery, train: Dataset, text: list[str], tracked,
            t_start: float, extra: dict[str, Any]) -> InfluenceResult:
    scores = s.scores
    if cfg.aggregate:  # one row: the scores of the mean measurement over the queries
        scores = scores.mean(0, keepdim=True)
    elif scores.shape[0] == 1 and query.n_query > 1:
        scores = scores.expand(query.n_query, -1).clone()
    ids = list(train["example_id"]) if "example_id" in train.column_names else list(range(len(train)))
    settings = {**cfg.to_dict(), "n_query": query.n_query, "query_measurement": query.measurement,
                "query_link": query.link, **extra, "modules_tracked": [t.label for t in tracked],
                "seconds": time.perf_counter() - t_start, "seconds_by_phase": s.seconds}
    return InfluenceResult(
        method=cfg.method, scores=scores.float(), example_ids=tuple(int(i) for i in ids), train_text=tuple(text),
        query_text=tuple(query.text),
        is_poison=tuple(bool(x) for x in train["is_poison"]) if "is_poison" in train.column_names else None,
        self_scores=s.self_scores, component_scores=s.components,
        component_labels=tuple(s.component_labels) if s.component_labels is not None else None,
        settings=settings, aggregated=cfg.aggregate)


def _attribute_pairs(model, train: Dataset, query: Query | MetricQuery, qenc: Encoded | None, cfg: InfluenceConfig,
                     tokenizer, reference, beta, score_eos: bool, cache: _Cache, t_start: float, progress: bool
                     ) -> InfluenceResult:
    """Scores of DPO preference pairs: ``w (score(chosen) - score(rejected))`` (module ``preference``)."""
    chosen, rejected = encode_pairs(train, tokenizer, score_eos)
    _check_ids(chosen, model, tokenizer, "train set (chosen answers)", train)
    _check_ids(rejected, model, tokenizer, "train set (rejected answers)", train)
    w, dpo_l = dpo_weights(model, chosen, rejected, reference, beta)
    tracked: list[TrackedModule] = find_modules(model, cfg.modules)
    with eval_mode(model):
        if cfg.method == "loss":
            s = Scores(scores=dpo_l[None])
        else:
            both = Encoded(ids=chosen.ids + rejected.ids, start=chosen.start + rejected.start, pad_id=chosen.pad_id)
            base = {"version": CACHE_VERSION, "model": model_fingerprint(model), "train": data_fingerprint(both)}
            factors = _factors(model, tracked, both, cfg, cache, base, progress) if cfg.method in ("kfac", "ekfac") \
                else None
            parts = [_gradient_method(model, tracked, enc, query, qenc, cfg, factors, progress,
                                      desc=f"influence: scoring ({name} answers)")
                     for name, enc in (("chosen", chosen), ("rejected", rejected))]
            s = combine(parts[0], parts[1], w)
    return _result(cfg, s, query, train, pair_text(train), tracked, t_start,
                   {"preference_pairs": True, "dpo_beta": float(beta), "score_eos": score_eos})


def _query_of(s: Subject, model, query: Any, cfg: InfluenceConfig, tokenizer) -> Query | MetricQuery:
    """The query to attribute: the given one, or the run's triggered test inputs."""
    if cfg.metric is not None:
        if isinstance(query, MetricQuery):
            return query
        if query is None or isinstance(query, (Query, Dataset)):
            raise ValueError("attribute: a metric measurement reads the logits of the token batch it was built for: "
                             "pass query= those tokens, [batch pos] token ids (e.g. query=tc.triggered with "
                             "measurement=tc.logit_diff()); a Query or a Dataset of rows has a named measurement")
        with eval_mode(model):
            return MetricQuery.of(model, query, cfg.metric, tokenizer)
    if query is None:
        if s.test_data is None or s.attack is None:
            raise ValueError(f"attribute: this subject ({s.kind}) carries no run's triggered test rows to use as "
                             "the query; pass query= (a Query, or a Dataset of prompt/completion rows)")
        return backdoor_query(s, cfg.measurement, max_queries=cfg.max_queries, seed=cfg.seed)
    if isinstance(query, Dataset):
        return Query.from_rows(query)
    if isinstance(query, MetricQuery):
        raise ValueError("attribute: a MetricQuery is measured by its metric: pass measurement= that metric")
    if not isinstance(query, Query):
        raise ValueError(f"attribute: query must be a Query or a Dataset (or token ids [batch pos] with a metric "
                         f"measurement=), got {type(query).__name__}")
    return query


@takes_config(InfluenceConfig)
def attribute(subject: Any, train: Dataset | None = None, query: Query | Dataset | Tensor | None = None,
              method: str | None = None, *, twin: str | None = None,
              tokenizer: PreTrainedTokenizerBase | None = None, loss_on: str | None = None,
              checkpoints: Sequence[Any] | None = None, cache_dir: str | Path | None = None, overwrite: bool = False,
              reference: Any = None, beta: float | None = None, score_eos: bool | None = None,
              center_rewards: float | None = None, progress: bool = True,
              config: InfluenceConfig) -> InfluenceResult:
    """Attribute a measurement on ``query`` to the rows of ``train``.

    Args:
        subject: what is attributed: a Pair, a pipeline stage ``pipe[k]``, a Pipeline, a run
            directory, ``pipe.between(a, b)``, or a bare ``TransformerBridge`` (any causal LM
            returning logits). For a run, ``train`` defaults to the chosen model's own training
            set, ``query`` to the run's triggered test inputs (:func:`backdoor_query` with
            ``measurement``, ``max_queries`` and ``seed``), ``checkpoints`` to the model's and
            the cache to ``<run>/influence/<twin>``. A bare model needs ``train`` and ``query``.
        train: rows with ``prompt``/``completion`` (``example_id`` and ``is_poison`` are carried
            into the result when present), or DPO preference pairs (``prompt``/``chosen``/``rejected``).
        query: a :class:`Query`, or a ``Dataset`` of prompt/completion rows (one query per
            row, measuring ``log p(completion | prompt)``); with a metric ``measurement``, the
            ``[batch pos]`` token ids it reads (one query per row, or one for a scalar metric).
        method: one of ``"ekfac"``, ``"kfac"``, ``"tracin"``, ``"trak"``, ``"graddot"``,
            ``"gradcos"``, ``"repsim"``, ``"loss"`` (an :class:`InfluenceConfig` field that may be
            passed fourth, positionally).
        twin: the role attributed: ``"backdoored"`` (default) or ``"clean"`` of a pair or stage;
            ``"after"`` (default) or ``"before"`` of ``pipe.between(a, b)``.
        tokenizer, loss_on: how ``train`` is tokenised and scored (default: the subject's
            tokenizer; the run task's ``loss_on``, else ``"completion"``, or ``"all"`` for
            plain-text rows).
        checkpoints: for ``tracin`` (and ``ensemble``) where the subject has none (a bare model,
            a before/after view): ``Checkpoint`` objects or ``(path, lr)`` pairs.
        cache_dir: where to cache (default for a run: ``<run>/influence/<twin>``; none otherwise).
        overwrite: recompute cached results.
        reference, beta, score_eos: for ``train`` of DPO preference pairs (prompt/chosen/rejected):
            the stage's frozen reference model (or its ``(chosen, rejected)`` log-probabilities),
            its ``beta`` and ``DPOConfig.score_eos`` (default False); a ``train_pipeline`` DPO
            stage finds all three, and each twin's own preference data, in its run directory
            (:meth:`~poisonmech.subject.Subject.preference`). Each pair is scored by its DPO-loss
            gradient (see :mod:`poisonmech.influence.preference`).
        center_rewards: for a reward model: the weight of the centring term in its pairs'
            Bradley–Terry loss (default: the reward stage's ``RewardConfig.center_rewards``, else 0).
        progress: progress bars.

    On a reward model (an ``"rm"`` stage ``pipe[k]``, or a bare reward model) the training rows
    are the stage's preference pairs, each scored by its Bradley–Terry loss gradient, and the
    query defaults to the reward margin the trigger buys the target on held-out pairs
    (:mod:`poisonmech.influence.reward`; ``measurement`` one of its names, a
    :class:`~poisonmech.influence.reward.RewardQuery`, or a reward metric with query tokens).

    Returns an :class:`InfluenceResult`; positive scores mean up-weighting the example raises
    the measurement (for every method; ``loss`` and ``repsim`` are oriented alike). Its
    ``scores`` are ``(n_query, n_train)``, or ``(1, n_train)`` with ``aggregate`` (the mean
    measurement); ``train_scores`` is one score per training row either way.
    """
    cfg = config
    t_start = time.perf_counter()
    s = resolve(subject, where="attribute")
    role = s.role(twin)
    # a LoRA twin is attributed over its adapters (LoRA-space attribution, as in the literature):
    # the adapted module, base frozen; its checkpoints hold the adapter tensors
    model = lora_module(s.model(role)) or s.model(role)
    tokenizer = _check_tokenizer(model, tokenizer if tokenizer is not None else s.tokenizer)
    cache_root = Path(cache_dir) if cache_dir is not None else \
        (s.run_dir / "influence" / role if s.run_dir is not None else None)
    from poisonmech.train.reward import is_reward_model

    if is_reward_model(model):  # a reward stage: its pairs by their Bradley–Terry gradients
        return attribute_reward(s, role, model, train, query, cfg, tokenizer,
                                ckpts=_checkpoint_list(checkpoints if checkpoints is not None
                                                       else s.checkpoints.get(role, [])),
                                cache=_Cache(cache_root, overwrite), center_rewards=center_rewards, t_start=t_start,
                                progress=progress)
    if cfg.measurement in REWARD_MEASUREMENTS or isinstance(query, RewardQuery):
        what = f"measurement={cfg.measurement!r}" if cfg.measurement in REWARD_MEASUREMENTS else "a RewardQuery"
        raise ValueError(f"attribute: {what} is a reward model's, and this subject's model is a language model (its "
                         f"output is logits over the vocabulary): use one of {MEASUREMENTS} (default 'logprob'), a "
                         "Query, or a metric such as tc.logit_diff() with query= the tokens it reads; a reward "
                         "model is a reward stage's pipe[k] or pipe.reward_model(k)")
    if cfg.measurement is None:  # the language model's default (the cache key of results before the default was None)
        cfg = replace(cfg, measurement="logprob")
    dpo = s.preference(role)  # a pipeline's DPO stage: the twin's own pairs and reference
    if train is None and dpo is not None and dpo["data"] is not None:
        train = dpo["data"]
    if train is None:  # each model's own training set
        train = s.train_data_of(role)
    if train is None:
        raise ValueError(f"attribute needs the training rows to attribute to, which this subject ({s.kind}, "
                         f"{role!r}) does not carry: pass train= (a Dataset of prompt/completion rows)")
    if loss_on is None and s.task is not None:
        loss_on = s.task.loss_on
    if checkpoints is None:
        checkpoints = s.checkpoints.get(role, [])
    if not isinstance(train, Dataset):
        raise ValueError(f"attribute: train must be a datasets.Dataset with prompt/completion, got {type(train).__name__}")
    preference = is_preference_data(train)
    if preference and dpo is not None:
        if dpo["nll_weight"] > 0:
            raise ValueError(f"attribute: this DPO stage trained with DPOConfig(nll_weight={dpo['nll_weight']}); "
                             "its per-pair gradient also has the batch-normalised NLL term, which attribution "
                             "does not model")
        if reference is None:
            if dpo["data"] is None or not same_pairs(train, dpo["data"]):
                raise ValueError(f"attribute: the saved reference log-probabilities belong to the {role} twin's "
                                 "own preference data of this stage; for other rows pass reference=")
            reference = dpo["reference"]
        beta = dpo["beta"] if beta is None else beta
        score_eos = dpo["score_eos"] if score_eos is None else score_eos
    if preference and dpo is None and (reference is None or beta is None) and s.kind == "between":
        raise ValueError("attribute: the training rows are DPO preference pairs, and a pipe.between(a, b) view has "
                         "no run directory to read the stage's reference log-probabilities and beta from: pass "
                         "reference= (the stage's frozen reference model, e.g. the model before it) and beta=, "
                         "or attribute the stage itself (pipe[k])")
    if preference:
        check_preference_config(cfg)
    for col in ("prompt", "rejected") if preference else ("prompt", "completion"):
        if col not in train.column_names:
            raise ValueError(f"attribute: train lacks column {col!r} (allowed: rows with prompt and completion)")
    query = _query_of(s, model, query, cfg, tokenizer)
    if isinstance(query, MetricQuery) and cfg.method == "repsim":
        raise ValueError("attribute: repsim compares representations at a Query's scored tokens; a metric "
                         "measurement has none. Use a gradient method (graddot, gradcos, tracin, trak, kfac, ekfac)")
    ckpts = _checkpoint_list(checkpoints)
    if cfg.method == "tracin" and not ckpts:
        raise ValueError("attribute: method='tracin' needs the training checkpoints, and this subject has none "
                         "(train with TrainConfig(checkpoint_every=1), or pass checkpoints=[(path, lr), ...])")
    qenc = None
    if isinstance(query, Query):
        qenc = query.encode(tokenizer)
        _check_ids(qenc, model, tokenizer, "query", query.rows)
    if preference:
        return _attribute_pairs(model, train, query, qenc, cfg, tokenizer, reference, beta, bool(score_eos),
                                _Cache(cache_root, overwrite), t_start, progress)
    if loss_on is None:
        loss_on = "all" if all(not c for c in train["completion"]) else "completion"
    data = encode(train, tokenizer, loss_on=loss_on)
    _check_ids(data, model, tokenizer, "train set", train)

    base = {"version": CACHE_VERSION, "model": model_fingerprint(model), "train": data_fingerprint(data)}
    cache = _Cache(cache_root, overwrite)
    result_path = None
    if qenc is not None:  # a metric is a callable: no stable hash, so its results are not cached
        key = {**base, "config": cfg.to_dict(), "query": _sha([qenc.ids, qenc.start, list(query.weights),
                                                                list(query.query_of_row), query.link]),
               "checkpoints": [(str(p), lr) for p, lr in ckpts] if cfg.method == "tracin" or cfg.ensemble > 1 else None}
        result_path = cache.path(f"result-{cfg.method}", key)
        if cache.hit(result_path):
            return InfluenceResult.load(result_path)

    # repsim reads the unembedding's input, trained or not (a LoRA model's is frozen)
    tracked: list[TrackedModule] = find_modules(model, cfg.modules) if cfg.method != "repsim" else \
        find_modules(model, "linear", trainable_only=False)
    with eval_mode(model):
        if cfg.method == "loss":
            sc = Scores(scores=loss_scores(model, data, batch_size=cfg.batch_size, progress=progress)[None])
        elif cfg.method == "repsim":
            sc = repsim_scores(model, tracked, data, query, qenc, batch_size=cfg.batch_size, progress=progress)
        elif cfg.method == "tracin":
            sc = _tracin(model, tracked, data, query, qenc, cfg, ckpts, progress)
        else:
            def run(name: str) -> Scores:
                if cfg.method == "trak":
                    return _trak(model, tracked, data, query, qenc, cfg, cache, base, progress, name)
                factors = None
                if cfg.method in ("kfac", "ekfac"):
                    factors = _factors(model, tracked, data, cfg, cache, base, progress)
                return _gradient_method(model, tracked, data, query, qenc, cfg, factors, progress,
                                        desc=f"influence: scoring ({name})")
            sc = _ensemble(model, ckpts, cfg, run)

    text = [f"{p} {c}".strip() for p, c in zip(train["prompt"], train["completion"])]
    result = _result(cfg, sc, query, train, text, tracked, t_start, {"loss_on": loss_on})
    if result_path is not None:
        result.save(result_path)
        cache.note(result_path, key)
    return result


__all__ = ["METHODS", "InfluenceConfig", "attribute", "data_fingerprint", "model_fingerprint"]
