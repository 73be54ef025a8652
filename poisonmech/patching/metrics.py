"""Patching metrics that say where they read the logits.

A metric maps logits ``[batch pos d_vocab]`` to one value per example ``[batch]`` (or, as
``transformer_lens.patching``'s metrics do, to one scalar for the batch: patching then keeps
one value per cell). The helpers here also expose ``positions`` (the one position per example they read) and
``at(logits_at_positions)``, so the patching engine computes logits, and the last layer,
only there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int

Tensor = torch.Tensor


@runtime_checkable
class Metric(Protocol):
    """What every patching analysis measures: logits ``[batch pos d_vocab]`` -> ``[batch]``
    (one value per example), or a scalar for the whole batch (``transformer_lens.patching``'s
    convention; the result then holds one value per cell, ``PatchResult.per_example=False``).
    Any callable of that shape is a metric; :class:`PositionalMetric` subclasses also say
    which position they read, so the engine computes logits only there."""

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"] | Float[Tensor, ""]: ...


def last_positions(tokens: Int[Tensor, "batch pos"], pad_id: int | None) -> Int[Tensor, " batch"]:
    """Index of each row's last real token (rows are right-padded with ``pad_id``)."""
    if pad_id is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    real = tokens != pad_id
    idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return torch.where(real, idx, torch.zeros_like(idx)).max(1).values


class PositionalMetric:
    """Base for metrics that read one position per example."""

    positions: Int[Tensor, " batch"]

    def at(self, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, " batch"]:
        raise NotImplementedError

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        if logits.ndim != 3 or logits.shape[0] != self.positions.shape[0]:
            raise ValueError(f"{type(self).__name__}: expected logits [batch={self.positions.shape[0]}, pos, d_vocab], "
                             f"got {tuple(logits.shape)}")
        rows = torch.arange(logits.shape[0], device=logits.device)
        return self.at(logits[rows, self.positions.to(logits.device)])

    def subset(self, index: Tensor) -> PositionalMetric:
        """The same metric restricted to some examples (used to chunk work)."""
        raise NotImplementedError


def _refuse_reward_model(metric, logits: Tensor) -> None:
    if logits.shape[-1] == 1:
        raise ValueError(f"{type(metric).__name__}: the model has one output per position, a reward model: its "
                         "metric is the reward (tc.reward() of pm.patching.trigger_contrast on the reward stage, or "
                         "poisonmech.train.reward.reward_metric())")


@dataclass(frozen=True)
class LogitDiff(PositionalMetric):
    """``logit[target] - logit[answer]`` at each example's position (e.g. backdoor target vs true label)."""

    target: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"]

    def at(self, logits):
        _refuse_reward_model(self, logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.target.to(logits.device)] - logits[rows, self.answer.to(logits.device)]

    def subset(self, index):
        return LogitDiff(self.target[index], self.answer[index], self.positions[index])


@dataclass(frozen=True)
class TargetLogProb(PositionalMetric):
    """Log-probability of ``target`` at each example's position."""

    target: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"]

    def at(self, logits):
        _refuse_reward_model(self, logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits.float().log_softmax(-1)[rows, self.target.to(logits.device)]

    def subset(self, index):
        return TargetLogProb(self.target[index], self.positions[index])


@dataclass(frozen=True)
class NormalizedRecovery(PositionalMetric):
    """``(m - corrupted) / (clean - corrupted)`` of a base metric: 0 = corrupted run, 1 = clean run.

    ``clean`` and ``corrupted`` are the base metric's per-example values on the two runs.
    """

    base: PositionalMetric
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]

    @property
    def positions(self):  # type: ignore[override]
        return self.base.positions

    def at(self, logits):
        den = (self.clean - self.corrupted).to(logits.device)
        den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
        return (self.base.at(logits) - self.corrupted.to(logits.device)) / den

    def subset(self, index):
        return NormalizedRecovery(self.base.subset(index), self.clean[index], self.corrupted[index])


def logit_diff(target, answer, positions) -> LogitDiff:
    """Logit difference between the backdoor ``target`` token and the true ``answer`` token.

    Each argument is an int (same for every example) or a ``[batch]`` tensor; ``positions``
    is where the answer is predicted (e.g. :func:`last_positions`).
    """
    positions = torch.as_tensor(positions, dtype=torch.long)
    n = positions.shape[0]
    return LogitDiff(_per_example(target, n), _per_example(answer, n), positions)


def target_logprob(target, positions) -> TargetLogProb:
    """Log-probability of the backdoor ``target`` token at ``positions``."""
    positions = torch.as_tensor(positions, dtype=torch.long)
    return TargetLogProb(_per_example(target, positions.shape[0]), positions)


def normalized_recovery(base: PositionalMetric, model, clean_tokens, corrupted_tokens) -> NormalizedRecovery:
    """Wrap ``base`` so that the corrupted run scores 0 and the clean run scores 1 (per example)."""
    with torch.no_grad():
        clean = base(model(clean_tokens)).detach()
        corrupted = base(model(corrupted_tokens)).detach()
    return NormalizedRecovery(base, clean, corrupted)


def _per_example(x, n: int) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.ndim == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"expected an int or a [batch={n}] tensor of token ids, got shape {tuple(t.shape)}")
    return t
