"""Checks of the circuit analyses' own arguments (tokens and devices: :mod:`poisonmech.runtime`;
options: :mod:`poisonmech.circuits.config`); each error names the argument and what is allowed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from poisonmech.circuits.graph import Graph
from poisonmech.runtime import check_tokens

Tensor = torch.Tensor


def check_metric(metric: Callable) -> None:
    if not callable(metric):
        raise ValueError(f"metric must be a callable mapping logits [batch pos d_vocab] to [batch], "
                         f"got {type(metric).__name__}")


def apply_metric(metric: Callable, logits: Tensor) -> Tensor:
    """``metric(logits)``, checked to be one value per example ``[batch]``."""
    values = metric(logits)
    batch = logits.shape[0]
    if not isinstance(values, torch.Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"metric must map logits [batch pos d_vocab] to one value per example [batch={batch}], "
                         f"got {shape}")
    return values


def check_selection(top_n: int | None, threshold: float | None) -> None:
    """Exactly one of ``top_n`` (a positive int) and ``threshold`` (a non-negative number)."""
    if (top_n is None) == (threshold is None):
        raise ValueError("pass exactly one of top_n= (keep the n highest-scoring edges) and threshold= "
                         f"(keep edges scoring at least this much); got top_n={top_n!r}, threshold={threshold!r}")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ValueError(f"top_n must be a positive integer, got {top_n!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or threshold < 0):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")


def check_contrast(model, clean_tokens, corrupted_tokens, metric: Callable, graph, where: str):
    """``(clean_tokens, corrupted_tokens, graph)`` of a discovery: a metric, both token-aligned
    batches (moved to the model's device) and the model's graph (``graph`` or read from it)."""
    check_metric(metric)
    if corrupted_tokens is None:
        raise ValueError(f"{where} needs corrupted_tokens (token-aligned with clean_tokens)")
    clean_tokens, corrupted_tokens = check_tokens(model, clean_tokens, corrupted_tokens)
    return clean_tokens, corrupted_tokens, graph or Graph.from_model(model)
