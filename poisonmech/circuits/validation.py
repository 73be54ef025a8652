"""Argument checks shared by the circuit analyses: each error names the field and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Int

Tensor = torch.Tensor


def check_choice(field: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_tokens(model, clean_tokens, corrupted_tokens=None, *, names=("clean_tokens", "corrupted_tokens"),
                 ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None]:
    """Integer ``[batch pos]`` tensors of one shape, moved to the model's device."""
    out = []
    for name, t in zip(names, (clean_tokens, corrupted_tokens)):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an integer tensor of token ids [batch pos], got {shape}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
        out.append(t.to(model_device(model)))
    if out[1] is not None and out[0].shape != out[1].shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape [batch pos] (token-aligned pairs); "
                         f"got {names[0]} {tuple(out[0].shape)} and {names[1]} {tuple(out[1].shape)}")
    return out[0], out[1]


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
