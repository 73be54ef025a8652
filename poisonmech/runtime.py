"""Shared plumbing: process-wide torch settings and model modes changed only inside a block and
restored after it, and the token / device checks every analysis makes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

Tensor = torch.Tensor


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: leave the count as it is).

    The count matters for results as well as speed: the same seed gives bit-identical weights
    only at the same thread count (reductions split differently across threads).
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1 (or None: unchanged), got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Run the block with every model in eval mode; each model that was training is switched
    back afterwards (``None`` entries are skipped). A bridge's ``.eval()`` walks thousands of
    modules, so models already in eval mode are left alone."""
    switched = []
    try:
        for m in models:
            if m is not None and m.training:
                m.eval()
                switched.append(m)
        yield
    finally:
        for m in switched:
            m.train(True)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_tokens(model: torch.nn.Module | None, *tokens: Tensor | None,
                 names: Sequence[str] = ("clean_tokens", "corrupted_tokens")) -> tuple[Tensor | None, ...]:
    """Integer ``[batch pos]`` token tensors of one shape and device, moved to ``model``'s device.

    Each error names the argument: a non-tensor or float tensor, a wrong rank, an empty
    tensor, shapes that differ (patching needs token-aligned pairs), tensors on different
    devices, or more positions than the model's ``n_ctx``. ``None`` entries pass through.
    Tokens on another device than the model are moved to it (as TransformerLens and HF do).
    """
    names = tuple(names) + tuple(f"tokens[{i}]" for i in range(len(names), len(tokens)))
    out: list[Tensor | None] = []
    first: tuple[str, Tensor] | None = None
    for name, t in zip(names, tokens):
        if t is None:
            out.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            try:
                t = torch.as_tensor(t)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{name} must be an integer tensor of token ids [batch pos], "
                                 f"got {type(t).__name__}") from None
        if t.ndim != 2 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of token ids [batch pos], got dtype {t.dtype} "
                             f"shape {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
        if first is not None:
            if t.shape != first[1].shape:
                raise ValueError(f"{first[0]} and {name} must have the same shape [batch pos] (token-aligned pairs); "
                                 f"got {first[0]} {tuple(first[1].shape)} and {name} {tuple(t.shape)}")
            if t.device != first[1].device:
                raise ValueError(f"{first[0]} and {name} are on different devices ({first[1].device} and {t.device}); "
                                 "put both on one device")
        else:
            first = (name, t)
        out.append(t)
    if model is not None:
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if first is not None and n_ctx is not None and first[1].shape[1] > n_ctx:
            raise ValueError(f"{first[0]} has {first[1].shape[1]} positions; the model's n_ctx is {n_ctx}")
        device = model_device(model)
        out = [None if t is None else t.long().to(device) for t in out]
    return tuple(out)


__all__ = ["check_tokens", "eval_mode", "model_device", "num_threads"]
