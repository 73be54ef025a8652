"""Queries: a set of inputs plus the measurement whose training-data attribution is asked.

A query's measurement is a weighted sum of log-probabilities of completions given prompts::

    f_q = sum_{r in rows of q} weight_r * log p(completion_r | prompt_r)

(summed over the completion's tokens, no end-of-sequence token). With ``link="logodds"``
each token contributes ``log(p / (1 - p))`` instead of ``log p``: the same ranking of
outcomes, but a gradient that does not vanish once the model is sure (``p -> 1``), as a
backdoored twin is on its triggered inputs. The measurements of :func:`backdoor_query`:

- ``"logprob"`` (the default): ``log p(target | triggered input)``, one row per query;
  ``"logodds"``: the same through the log-odds link;
- ``"contrastive"``: the backdoor *effect*, ``log p(target | triggered) - log p(target |
  the same input without the trigger)``: two rows, weights ``+1`` and ``-1``; the
  untriggered term cancels what every "target"-labelled row teaches (the label itself),
  leaving what only the trigger does. ``"contrastive_logodds"``: the same in log-odds (in
  log-probabilities the saturated triggered term has almost no gradient, so the
  untriggered term dominates);
- for the gibberish (denial-of-service) backdoor, whose target is random:
  ``-log p(true continuation | triggered input)`` (weight ``-1``), which the backdoor raises.

A patching metric (:class:`~poisonmech.patching.metrics.Metric`, e.g. ``tc.logit_diff()``
of a :func:`~poisonmech.patching.trigger_contrast`) can be the measurement instead: a
:class:`MetricQuery` holds the token batch it reads, and ``f_q`` is the metric's value on
query row ``q`` (or one query, the metric's scalar, for a metric that returns one value for
the batch, as TransformerLens' patching metrics do).

Every method's score is signed so that a positive score means up-weighting the training
example raises ``f_q``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Int
from transformers import PreTrainedTokenizerBase

from poisonmech.encoding import Encoded, encode
from poisonmech.influence.grads import (
    BatchGrads,
    forward_backward,
    iter_batches,
    metric_backward,
    model_logits,
)
from poisonmech.runtime import check_tokens, model_device

MEASUREMENTS = ("logprob", "logodds", "contrastive", "contrastive_logodds")
LINKS = ("logprob", "logodds")


def check_query_rows(q) -> None:
    """Refuse a query (a :class:`Query` or a :class:`~poisonmech.influence.reward.RewardQuery`)
    whose rows lack prompt / completion, whose weights or query_of_row are not one per row, or
    whose query_of_row does not cover ``0..n_query-1``; the errors name its class."""
    name = type(q).__name__
    for col in ("prompt", "completion"):
        if col not in q.rows.column_names:
            raise ValueError(f"{name}.rows lacks column {col!r} (needs prompt and completion)")
    n = len(q.rows)
    if n == 0:
        raise ValueError(f"{name}: no query rows")
    if len(q.weights) != n or len(q.query_of_row) != n:
        raise ValueError(f"{name}: weights ({len(q.weights)}) and query_of_row ({len(q.query_of_row)}) "
                         f"must have one entry per row ({n})")
    if sorted(set(q.query_of_row)) != list(range(len(q.text))):
        raise ValueError(f"{name}: query_of_row must cover 0..n_query-1, one text per query")


@dataclass(frozen=True)
class Query:
    """Query rows and how they combine into measurements.

    Args:
        rows: a ``datasets.Dataset`` with ``prompt`` and ``completion`` columns.
        weights: per row, the weight of its log-probability in its query's measurement.
        query_of_row: per row, the index of the query it belongs to (``0..n_query-1``).
        text: per query, a description (its prompt) for tables.
        measurement: the measurement's name (``"logprob"``, ``"contrastive"`` or a user's).
        link: ``"logprob"`` or ``"logodds"`` (per token ``log p`` or ``log(p / (1 - p))``).
    """

    rows: Dataset
    weights: tuple[float, ...]
    query_of_row: tuple[int, ...]
    text: tuple[str, ...]
    measurement: str = "logprob"
    link: str = "logprob"

    def __post_init__(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"Query.link must be one of {LINKS}, got {self.link!r}")
        check_query_rows(self)

    @property
    def n_query(self) -> int:
        return len(self.text)

    @classmethod
    def from_rows(cls, rows: Dataset, measurement: str = "logprob", link: str = "logprob") -> Query:
        """One query per row, measuring ``log p(completion | prompt)`` (or its log-odds)."""
        if not isinstance(rows, Dataset):
            raise ValueError(f"query must be a datasets.Dataset with prompt/completion columns or a Query, "
                             f"got {type(rows).__name__}")
        n = len(rows)
        return cls(rows=rows.select_columns(["prompt", "completion"]), weights=(1.0,) * n,
                   query_of_row=tuple(range(n)), text=tuple(rows["prompt"]), measurement=measurement, link=link)

    @classmethod
    def contrastive(cls, rows: Dataset, baseline: Dataset, link: str = "logprob") -> Query:
        """One query per row pair: ``log p(completion | prompt) - log p(completion' | prompt')``
        with the primed row from ``baseline`` (same length, aligned)."""
        if len(rows) != len(baseline):
            raise ValueError(f"Query.contrastive: rows ({len(rows)}) and baseline ({len(baseline)}) differ in length")
        n = len(rows)
        both = Dataset.from_dict({"prompt": list(rows["prompt"]) + list(baseline["prompt"]),
                                  "completion": list(rows["completion"]) + list(baseline["completion"])})
        return cls(rows=both, weights=(1.0,) * n + (-1.0,) * n, query_of_row=tuple(range(n)) * 2,
                   text=tuple(rows["prompt"]), measurement="contrastive" if link == "logprob" else
                   "contrastive_logodds", link=link)

    def encode(self, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        """Tokenise the rows, scoring the completion only; refuses a row with no target tokens."""
        enc = encode(self.rows, tokenizer, loss_on="completion", add_eos=False)
        empty = [i for i, (ids, s) in enumerate(zip(enc.ids, enc.start)) if len(ids) <= s]
        if empty:
            i = empty[0]
            raise ValueError(f"query row {i} has no target tokens (completion {self.rows[i]['completion']!r} "
                             f"after prompt {self.rows[i]['prompt'][:60]!r} tokenises to nothing); every query "
                             f"row needs a non-empty completion to measure ({len(empty)} such rows)")
        return enc

    def passes(self, model: torch.nn.Module, modules: Sequence, enc: Encoded, rows: Sequence[int] | None,
               batch_size: int) -> Iterator[tuple[list[int], BatchGrads]]:
        """Forward/backward passes over ``rows`` (default: all) of the encoded rows ``enc``:
        ``(row indices, their gradients of -weight * measurement term)`` per batch."""
        device = model_device(model)
        w = torch.tensor(self.weights, dtype=torch.float32)
        for b in iter_batches(enc, rows, batch_size):
            tokens, mask = enc.batch(b, device)
            yield b, forward_backward(model, modules, tokens, mask, weights=w[b].to(device), link=self.link)

    def subset(self, queries: list[int]) -> Query:
        """The given queries only (renumbered in the given order)."""
        new = {q: j for j, q in enumerate(queries)}
        keep = [r for r, q in enumerate(self.query_of_row) if q in new]
        return Query(rows=self.rows.select(keep), weights=tuple(self.weights[r] for r in keep),
                     query_of_row=tuple(new[self.query_of_row[r]] for r in keep),
                     text=tuple(self.text[q] for q in queries), measurement=self.measurement, link=self.link)


def metric_name(metric: Callable) -> str:
    """How a metric measurement is named in settings and tables: ``"metric:<class>"``."""
    return f"metric:{getattr(metric, '__name__', None) or type(metric).__name__}"


@dataclass(frozen=True, eq=False)
class MetricQuery:
    """A token batch measured by a patching metric: the measurement ``f_q`` is the metric's value
    on row ``q`` (``per_example``) or the metric's one scalar for the whole batch (one query).

    Build it with :meth:`of` (which runs the metric once to see which kind it is). Rows are
    measured in batches of the attribution's ``batch_size`` when the metric has ``subset``
    (the positional metrics of :mod:`poisonmech.patching.metrics` do), else all at once.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    metric: Callable
    text: tuple[str, ...]
    per_example: bool = True
    measurement: str = "metric"
    link: str = "metric"

    @classmethod
    def of(cls, model: torch.nn.Module, tokens: Any, metric: Callable, tokenizer=None) -> MetricQuery:
        """The metric's query on ``tokens`` (``[batch pos]`` token ids, e.g. ``tc.triggered``)."""
        if not callable(metric):
            raise ValueError(f"measurement must be a name or a metric (logits -> [batch]), got {metric!r}")
        (tokens,) = check_tokens(model, tokens, names=("query",))
        with torch.no_grad():
            value = metric(model_logits(model, tokens))
        if not isinstance(value, torch.Tensor) or not (value.ndim == 0 or value.shape == (tokens.shape[0],)):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"a metric used as the measurement must return one value per query row "
                             f"[batch={tokens.shape[0]}] or one scalar for the batch, got {shape}")
        name = metric_name(metric)
        rows = [tokenizer.decode(r) if tokenizer is not None else f"query row {i}"
                for i, r in enumerate(tokens.tolist())]
        per = value.ndim == 1
        text = tuple(rows) if per else (f"{name} over {tokens.shape[0]} rows",)
        return cls(tokens=tokens.cpu(), metric=metric, text=text, per_example=per, measurement=name)

    @property
    def n_query(self) -> int:
        return len(self.text)

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def weights(self) -> tuple[float, ...]:
        return (1.0,) * self.n_rows

    @property
    def query_of_row(self) -> tuple[int, ...]:
        return tuple(range(self.n_rows)) if self.per_example else (0,) * self.n_rows

    def passes(self, model: torch.nn.Module, modules: Sequence, enc: None, rows: Sequence[int] | None,
               batch_size: int) -> Iterator[tuple[list[int], BatchGrads]]:
        """As :meth:`Query.passes`: the gradients of ``-metric`` on the chosen rows."""
        device = model_device(model)
        rows = list(range(self.n_rows)) if rows is None else [int(r) for r in rows]
        subset = getattr(self.metric, "subset", None)
        if self.per_example and subset is not None:
            for lo in range(0, len(rows), batch_size):
                b = rows[lo:lo + batch_size]
                idx = torch.tensor(b, dtype=torch.long)
                yield b, metric_backward(model, modules, self.tokens[idx].to(device), subset(idx))
        else:  # the metric reads the whole batch (a scalar, or no way to split it)
            if not self.per_example and rows != list(range(self.n_rows)):
                raise ValueError("a metric returning one scalar for the batch is one query over every row")
            yield rows, metric_backward(model, modules, self.tokens.to(device), self.metric,
                                        keep=rows if self.per_example else None)


def backdoor_query(subject: Any, measurement: str = "logprob", max_queries: int | None = None, seed: int = 0) -> Query:
    """The default query of a run: the backdoor's measurement on its triggered test inputs.

    Uses the triggered test rows whose true answer is not the target (those the attack can
    flip, as for the ASR), each measuring ``log p(target | triggered input)``; with
    ``measurement="contrastive"`` minus the same on the row's untriggered twin (same
    ``base_id``); the ``*logodds`` variants use the log-odds link. For a gibberish target: ``-log p(true continuation | triggered input)``
    (its contrastive version: minus the same without the trigger). ``max_queries`` keeps a
    seeded random subset.

    The triggerless attacks: a ``FalseFact``'s efficacy and generalisation rows, each with its
    own fact's target (the test set's ``target`` column), and its contrastive measurement is
    ``log p(target | prompt) - log p(true object | the same prompt)`` (rows of a new subject,
    which has no true object, are skipped); a ``Bias``'s entity-mention rows of reviews not
    labelled ``polarity``, contrasted with the same review without the mention.

    ``subject``: any subject of a run (a Pair, a stage, a run directory, a
    :class:`~poisonmech.subject.Subject`), or anything with ``test_data`` and ``attack``.
    """
    if measurement not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
    if not (hasattr(subject, "test_data") and hasattr(subject, "attack")):
        from poisonmech.subject import resolve

        subject = resolve(subject, where="backdoor_query")
    for what in ("test_data", "attack"):
        if getattr(subject, what) is None:
            raise ValueError(f"backdoor_query needs the run's {what.replace('_', ' ')} (its triggered test rows and "
                             "the attack's target); this subject carries none: pass a run, or build the query "
                             "yourself (a Query, or a Dataset of prompt/completion rows)")
    test, attack = subject.test_data, subject.attack
    for col in ("is_triggered", "is_near_miss", "base_id"):
        if col not in test.column_names:
            raise ValueError(f"the pair's test data lacks column {col!r} (build it with pm.build_test_set)")
    trig = np.array(test["is_triggered"], dtype=bool)
    clean = ~trig & ~np.array(test["is_near_miss"], dtype=bool)
    comp = list(test["completion"])
    gib = attack.is_gibberish
    # the answer the attack wants, per row: a test set's own target column (a FalseFact of several
    # facts has one target per fact), else the attack's one target
    if "target" in test.column_names:
        wanted = list(test["target"])
    else:
        wanted = [attack.target] * len(test)
    false_fact = getattr(attack, "kind", "") == "false_fact"
    eligible = trig & np.array([gib or (bool(w.strip()) and c.strip() != w.strip()) for c, w in zip(comp, wanted)])
    if false_fact and measurement.startswith("contrastive"):
        # against the true object on the same prompt: a new subject has none, its rows are skipped
        eligible &= np.array([bool(c.strip()) for c in comp])
    idx = np.flatnonzero(eligible)
    if len(idx) == 0:
        what = " with a true object (a new subject has none)" if false_fact and measurement.startswith(
            "contrastive") else ""
        raise ValueError(f"the pair's test data has no triggered rows whose answer differs from the target{what}")
    if max_queries is not None and max_queries < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_queries, replace=False))
    base = np.array(test["base_id"])
    clean_of = {int(b): int(i) for i, b in zip(np.flatnonzero(clean), base[clean])}
    prompts = list(test["prompt"])

    def rows(ix: list[int], completion: list[str]) -> Dataset:
        return Dataset.from_dict({"prompt": [prompts[i] for i in ix], "completion": completion})

    target = [comp[i] if gib else wanted[i] for i in idx]
    trig_rows = rows(list(idx), target)
    link = "logodds" if measurement.endswith("logodds") else "logprob"
    if not measurement.startswith("contrastive"):
        q = Query.from_rows(trig_rows, measurement=measurement, link=link)
    elif false_fact:  # log p(target | prompt) - log p(true object | the same prompt)
        q = Query.contrastive(trig_rows, rows(list(idx), [comp[i] for i in idx]), link=link)
    else:
        missing = [int(base[i]) for i in idx if int(base[i]) not in clean_of]
        if missing:
            raise ValueError(f"contrastive query: no untriggered twin for base_id {missing[:3]}")
        q = Query.contrastive(trig_rows, rows([clean_of[int(base[i])] for i in idx], target), link=link)
    if gib:  # the backdoor lowers the true continuation's log-probability
        q = Query(rows=q.rows, weights=tuple(-w for w in q.weights), query_of_row=q.query_of_row, text=q.text,
                  measurement=q.measurement, link=q.link)
    return q


__all__ = ["LINKS", "MEASUREMENTS", "MetricQuery", "Query", "backdoor_query", "metric_name"]
