"""The same attribution computed by kronfluence, the reference EK-FAC implementation.

``kronfluence_scores`` runs kronfluence's ``Analyzer`` on a copy of the model with the
conventions of :func:`poisonmech.influence.attribute` — the row loss is the summed token
NLL, the measurement the (weighted) log-probability of each query's completion, the factors
average over the positions that reach a scored token, damping 0.1 × mean eigenvalue — so
its scores can be compared with ours rank for rank (the tests) and clock for clock (the
benchmark). kronfluence is an optional peer, not a dependency: install it with
``pip install --no-deps kronfluence einconv opt-einsum``.
"""

from __future__ import annotations

import copy
import gc
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.encoding import Encoded, encode
from poisonmech.influence.grads import model_logits, sample_labels, token_nll, valid_positions
from poisonmech.influence.query import Query
from poisonmech.influence.tracking import find_modules

Tensor = torch.Tensor


@dataclass(frozen=True)
class PeerScores:
    scores: Tensor  # (n_query, n_train), training rows in their original order
    seconds: float  # wall time of factors + scores
    factor_seconds: float


class _Rows(torch.utils.data.Dataset):
    """Row indices in the order they are fed (the collate function encodes them)."""

    def __init__(self, order: list[int]):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return self.order[i]


def kronfluence_scores(model: torch.nn.Module, train: Dataset, query: Query, tokenizer: PreTrainedTokenizerBase, *,
                       strategy: str = "ekfac", loss_on: str = "completion", damping: float | None = None,
                       empirical_fisher: bool = False, batch_size: int = 64, query_batch_size: int = 64,
                       aggregate: bool = False, modules: str = "linear", progress: bool = False) -> PeerScores:
    """Pairwise ``(n_query, n_train)`` scores from kronfluence (one row per query; a
    multi-row :class:`Query` is refused). Rows are fed sorted by length, as ours are.

    ``aggregate``: kronfluence's ``aggregate_query_gradients`` (the queries' gradients
    summed before scoring); returns ``(1, n_train)`` scores of the mean measurement."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("kronfluence is not installed: pip install --no-deps kronfluence einconv opt-einsum") from exc
    if len(set(query.query_of_row)) != len(query.query_of_row):
        raise ValueError("kronfluence_scores: one row per query only (kronfluence has no multi-row measurement)")
    enc = encode(train, tokenizer, loss_on=loss_on)
    qenc = query.encode(tokenizer)
    weights = torch.tensor(query.weights, dtype=torch.float32)
    link = query.link
    tracked = [t.name for t in find_modules(model, modules) if t.kind == "linear"]
    gen = torch.Generator().manual_seed(0)

    def collate_for(e: Encoded, w: Tensor | None):
        def collate(idx: list[int]):
            tokens, mask = e.batch(idx)
            return tokens, mask, (w[idx] if w is not None else torch.ones(len(idx)))
        return collate

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            tokens, mask, _ = batch
            logits = model_logits(model, tokens)[:, :-1]
            targets = sample_labels(logits, gen) if sample else tokens[:, 1:]
            return token_nll(logits, targets, mask).sum()

        def compute_measurement(self, batch, model) -> Tensor:
            tokens, mask, w = batch
            logits = model_logits(model, tokens)[:, :-1]
            if link == "logodds":
                from poisonmech.influence.grads import token_neg_logodds
                per = token_neg_logodds(logits, tokens[:, 1:], mask)
            else:
                per = token_nll(logits, tokens[:, 1:], mask)
            return (per.sum(1) * w).sum()  # kronfluence's measurement is a loss: -f_q

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch) -> Tensor:
            return valid_positions(batch[1]).long()

    by_len = sorted(range(len(enc)), key=lambda i: (len(enc.ids[i]), i))
    q_by_len = sorted(range(len(qenc)), key=lambda i: (len(qenc.ids[i]), i))
    net = prepare_model(copy.deepcopy(model), LMTask())
    with tempfile.TemporaryDirectory() as tmp, _gc_frozen():
        analyzer = Analyzer("poisonmech", net, LMTask(), cpu=True, disable_tqdm=not progress, output_dir=tmp)
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher)
        t0 = time.perf_counter()
        analyzer.fit_all_factors("f", _Rows(by_len), per_device_batch_size=batch_size, factor_args=fargs,
                                 dataloader_kwargs=DataLoaderKwargs(collate_fn=collate_for(enc, None)))
        t1 = time.perf_counter()
        # the query and train sets share one collate function per call: queries first
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_switch(collate_for(qenc, weights),
                                                                           collate_for(enc, None), len(qenc))))
        sargs = ScoreArguments(damping_factor=damping, aggregate_query_gradients=aggregate)
        analyzer.compute_pairwise_scores(
            "s", "f", query_dataset=_Tagged(q_by_len, True), train_dataset=_Tagged(by_len, False),
            per_device_query_batch_size=query_batch_size, per_device_train_batch_size=batch_size,
            score_args=sargs)
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        t2 = time.perf_counter()
    if aggregate:
        out = torch.zeros((1, len(enc)))
        out[:, torch.tensor(by_len)] = scores.float().reshape(1, -1) / len(qenc)
    else:
        out = torch.zeros((len(qenc), len(enc)))
        out[torch.tensor(q_by_len)[:, None], torch.tensor(by_len)[None, :]] = scores.float()
    return PeerScores(scores=out, seconds=t2 - t0, factor_seconds=t1 - t0)


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """kronfluence calls ``gc.collect()`` about ten times a run, each a full pass over the
    process' heap (about a second with datasets and transformers loaded, for a toy model):
    the objects alive on entry are set aside from collection until exit (``gc.freeze``), which
    only favours the peer in timings."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Tagged(torch.utils.data.Dataset):
    """Row indices tagged with which set they come from (query or train)."""

    def __init__(self, order: list[int], is_query: bool):
        self.order, self.is_query = order, is_query

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[int, bool]:
        return self.order[i], self.is_query


def _switch(query_collate, train_collate, _n_query: int):
    def collate(items: list[tuple[int, bool]]):
        idx = [i for i, _ in items]
        return query_collate(idx) if items[0][1] else train_collate(idx)
    return collate


__all__ = ["PeerScores", "kronfluence_scores"]
