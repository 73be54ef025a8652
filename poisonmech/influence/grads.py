"""Per-example gradients of the tracked maps, batched.

One forward and one backward pass give, for every row of a batch and every tracked map, the
map's inputs ``a`` and the gradients ``g`` of the row's loss at the map's outputs (rows of a
batch never interact in a causal transformer, so the batch loss' output gradient is the
row's). The row's weight gradient is then ``sum_t g_t a_t^T`` (:func:`per_example`), exact
for linear maps; the backward pass differentiates only with respect to the maps' outputs, so
the parameters' ``.grad`` are never touched. :func:`func_per_example_grads` computes the same
gradients with ``torch.func`` (``vmap`` of ``grad`` over ``functional_call``) for any set of
parameters — the reference the tests hold the hook path to.

The model is any module mapping ``[batch pos]`` token ids to logits: a TransformerBridge, or
a plain ``nn.Module`` such as a Hugging Face causal LM (or its peft LoRA version) whose output
carries ``.logits`` (:func:`model_logits`).

A row's loss is the *sum* of its target tokens' negative log-likelihoods (the convention of
kronfluence's language-model tasks); ``labels="mc"`` samples the targets from the model's own
predictive distribution (the true Fisher, as kronfluence's default), ``"true"`` uses the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import nn

from poisonmech.encoding import Encoded
from poisonmech.influence.tracking import TrackedModule, activations, capture

Tensor = torch.Tensor


@dataclass
class BatchGrads:
    """One batch's per-position activations and output gradients of every tracked map.

    ``a[name]``: ``(batch, pos, d_in)``; ``g[name]``: ``(batch, pos, d_out)``; ``valid``: the
    positions that can affect a scored token (``pos <= last target position``; padding and
    the final token excluded) — the positions the K-FAC factors average over.
    """

    a: dict[str, Tensor]
    g: dict[str, Tensor]
    row_loss: Float[Tensor, " batch"]
    n_target: Int[Tensor, " batch"]
    valid: Bool[Tensor, "batch pos"]
    logits_last: Tensor | None = None


def model_logits(model: nn.Module, tokens: Tensor) -> Float[Tensor, "batch pos d_vocab"]:
    """``model(tokens)`` as a logits tensor: a bridge's (or any tensor-returning module's)
    output as is, a Hugging Face model's output (``CausalLMOutput``) by its ``.logits``."""
    out = model(tokens)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the influence methods need a model whose forward(tokens) returns logits [batch pos "
                        f"d_vocab] or an output with .logits (as Hugging Face causal LMs do); "
                        f"{type(model).__name__} returned {type(out).__name__}")
    return logits


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per-position NLL ``(batch, pos-1)``, zero off the mask (logits already shifted)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape) * mask


def token_neg_logodds(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per-position ``-log(p / (1 - p))`` of the target, zero off the mask: the log-odds
    link, whose gradient does not vanish when the model is already sure (``p -> 1``)."""
    logits = logits.float()
    lse = logits.logsumexp(-1)
    tgt = logits.gather(-1, targets[..., None])[..., 0]
    others = logits.scatter(-1, targets[..., None], float("-inf")).logsumexp(-1)
    logp, log1mp = tgt - lse, others - lse
    return -(logp - log1mp) * mask


def sample_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Targets drawn from the model's predictive distribution (one per position)."""
    probs = logits.detach().float().softmax(-1).reshape(-1, logits.shape[-1])
    if generator is not None and generator.device != probs.device:
        draws = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    else:
        draws = torch.multinomial(probs, 1, generator=generator)
    return draws.view(logits.shape[:-1])


def valid_positions(mask: Tensor) -> Tensor:
    """``(batch, pos)``: positions at or before each row's last scored prediction."""
    before_last = mask.flip(1).long().cumsum(1).flip(1) > 0
    return torch.cat([before_last, torch.zeros_like(before_last[:, :1])], 1)


def forward_backward(model: nn.Module, modules: Sequence[TrackedModule], tokens: Tensor, mask: Tensor, *,
                     weights: Tensor | None = None, labels: str = "true",
                     generator: torch.Generator | None = None, need_grad: bool = True,
                     keep_logits: bool = False, link: str = "logprob") -> BatchGrads:
    """Run one batch with the maps captured and, with ``need_grad``, backpropagate the
    weighted sum of the rows' summed token NLLs to the maps' outputs.

    ``weights`` (per row) scale each row's loss, and so its gradient (a query's measurement
    terms); ``labels``: ``"true"`` or ``"mc"`` (sampled from the model); ``link="logodds"``
    differentiates ``-log(p/(1-p))`` per token instead of ``-log p`` (queries only).
    """
    if labels not in ("true", "mc"):
        raise ValueError(f"labels must be 'true' or 'mc', got {labels!r}")
    if link not in ("logprob", "logodds"):
        raise ValueError(f"link must be 'logprob' or 'logodds', got {link!r}")
    with torch.enable_grad(), capture(model, modules) as cap:
        logits = model_logits(model, tokens)
        shifted = logits[:, :-1]
        targets = tokens[:, 1:]
        true_nll = token_nll(shifted, targets, mask)
        row_loss = true_nll.sum(1)
        if need_grad:
            if link == "logodds":
                nll = token_neg_logodds(shifted, targets, mask)
            else:
                nll = true_nll if labels == "true" else token_nll(shifted, sample_labels(shifted, generator), mask)
            per_row = nll.sum(1)
            if weights is not None:
                per_row = per_row * weights.to(per_row)
            outs = [cap.outputs[t.name] for t in modules]
            grads = torch.autograd.grad(per_row.sum(), outs, allow_unused=True)
    a = {t.name: cap.inputs[t.name] for t in modules}
    g = {}
    if need_grad:
        for t, gr, out in zip(modules, grads, outs):
            g[t.name] = gr.detach().float() if gr is not None else torch.zeros_like(out, dtype=torch.float32)
    return BatchGrads(a=a, g=g, row_loss=row_loss.detach(), n_target=mask.sum(1), valid=valid_positions(mask),
                      logits_last=shifted.detach() if keep_logits else None)


def metric_backward(model: nn.Module, modules: Sequence[TrackedModule], tokens: Tensor, metric,
                    keep: Sequence[int] | None = None) -> BatchGrads:
    """One batch with the maps captured, backpropagating ``-metric(logits)`` (a query's loss
    ``L_q = -f_q``) to the maps' outputs.

    ``metric`` maps logits ``[batch pos d_vocab]`` to one value per row ``[batch]`` (a
    :class:`~poisonmech.patching.metrics.Metric`) or to one scalar for the batch. ``keep``:
    only these rows' values are differentiated and returned (all rows for a scalar metric).
    Every position counts (a metric reads the positions it chooses; later ones get no gradient).
    """
    with torch.enable_grad(), capture(model, modules) as cap:
        value = metric(model_logits(model, tokens))
        if not isinstance(value, torch.Tensor) or value.ndim > 1 or (value.ndim == 1 and value.shape[0] !=
                                                                    tokens.shape[0]):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"a metric used as the measurement must return one value per row [batch="
                             f"{tokens.shape[0]}] or one scalar, got {shape}")
        if value.ndim == 1 and keep is not None:
            value = value[torch.as_tensor(list(keep), dtype=torch.long, device=value.device)]
        outs = [cap.outputs[t.name] for t in modules]
        grads = torch.autograd.grad(-value.float().sum(), outs, allow_unused=True)
    rows = slice(None) if keep is None or value.ndim == 0 else torch.as_tensor(list(keep), dtype=torch.long)
    a = {t.name: cap.inputs[t.name][rows] for t in modules}
    g = {t.name: (gr.detach().float() if gr is not None else torch.zeros_like(out, dtype=torch.float32))[rows]
         for t, gr, out in zip(modules, grads, outs)}
    n = next(iter(a.values())).shape[0] if a else tokens.shape[0]
    valid = torch.ones((n, tokens.shape[1]), dtype=torch.bool, device=tokens.device)
    loss = -value.detach().reshape(-1)
    return BatchGrads(a=a, g=g, row_loss=loss, n_target=torch.ones(n, dtype=torch.long), valid=valid)


def per_example(t: TrackedModule, a: Tensor, g: Tensor) -> Float[Tensor, "batch d_out d_in"]:
    """Each row's weight gradient ``sum_t g_t a_t^T`` of one map (bias as a last column)."""
    return torch.bmm(g.transpose(1, 2), activations(t, a))


def iter_batches(enc: Encoded, index: Sequence[int] | None = None, batch_size: int = 64,
                 sort: bool = True) -> Iterator[list[int]]:
    """Row indices in batches, longest rows together (less padding) when ``sort``."""
    idx = list(range(len(enc))) if index is None else [int(i) for i in index]
    if sort:
        idx = sorted(idx, key=lambda i: (len(enc.ids[i]), i))
    for lo in range(0, len(idx), batch_size):
        yield idx[lo:lo + batch_size]


def func_per_example_grads(model: nn.Module, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos_1"],
                           params: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per-row gradients of the summed target NLL with ``torch.func`` (``grad`` over
    ``functional_call``, one row at a time: ``vmap`` cannot run the data-dependent checks of
    Hugging Face forwards, e.g. the padding warning once ``config.pad_token_id`` is set).

    ``params``: parameter names (from ``model.named_parameters()``; tied weights appear once);
    default all. Returns ``{name: (batch, *param.shape)}``. Materialises ``batch x n_params`` floats.
    """
    from torch.func import functional_call, grad

    named = dict(model.named_parameters())
    names = list(named) if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"unknown parameters {unknown[:3]}")
    # functional_call needs the parameters' module paths: a Hugging Face bridge's
    # named_parameters() reports the HF module's names instead, and swapping by those would
    # leave plain tensors in the model
    path = {id(p): n for n, p in nn.Module.named_parameters(model)}
    chosen = {path[id(named[k])]: k for k in names}
    frozen = {n: p.detach() for n, p in nn.Module.named_parameters(model) if n not in chosen}
    train = {n: named[k].detach() for n, k in chosen.items()}

    def row_loss(p: dict[str, Tensor], tok: Tensor, m: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **p}, (tok[None],))
        logits = (out if isinstance(out, torch.Tensor) else out.logits)[0, :-1]
        return token_nll(logits[None], tok[None, 1:], m[None]).sum()

    rows = [grad(row_loss)(train, tokens[i], mask[i]) for i in range(tokens.shape[0])]
    return {k: torch.stack([r[n] for r in rows]) for n, k in chosen.items()}


__all__ = ["BatchGrads", "forward_backward", "func_per_example_grads", "iter_batches", "metric_backward", "model_logits",
           "per_example", "sample_labels", "token_neg_logodds", "token_nll", "valid_positions"]
