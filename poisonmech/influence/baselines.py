"""Gradient-free baselines: per-example training loss and representation similarity (RepSim).

- ``loss``: each training row's mean token cross-entropy over its scored tokens (exactly
  ``masked_loss`` on that row alone). It ignores the query; high loss = suspicious.
- ``repsim``: cosine similarity between representations, the final normalised residual
  stream (the unembedding's input) averaged over the positions that predict scored tokens.
  A query's representation is the weighted sum of its rows' (for a contrastive measurement:
  triggered minus untriggered, the trigger's effect on the representation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from poisonmech.encoding import Encoded
from poisonmech.influence.grads import iter_batches, model_logits, token_nll
from poisonmech.influence.methods import Scores
from poisonmech.influence.query import Query
from poisonmech.influence.tracking import TrackedModule, capture
from poisonmech.runtime import eval_mode, model_device

Tensor = torch.Tensor


@torch.no_grad()
def loss_scores(model: torch.nn.Module, data: Encoded, *, batch_size: int = 64, progress: bool = True) -> Tensor:
    """Each row's mean token NLL over its scored tokens: ``(n_train,)``."""
    device = model_device(model)
    out = torch.zeros(len(data))
    with eval_mode(model):
        for b in tqdm(list(iter_batches(data, None, batch_size)), desc="influence: losses", disable=not progress,
                      leave=False):
            tokens, mask = data.batch(b, device)
            nll = token_nll(model_logits(model, tokens)[:, :-1], tokens[:, 1:], mask)
            out[torch.tensor(b)] = (nll.sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
    return out


@torch.no_grad()
def representations(model: torch.nn.Module, unembed: TrackedModule, data: Encoded, *, batch_size: int = 64,
                    progress: bool = True, desc: str = "influence: representations") -> Tensor:
    """Each row's unembedding input averaged over its scored-token-predicting positions."""
    device = model_device(model)
    reps = None
    with eval_mode(model):
        for b in tqdm(list(iter_batches(data, None, batch_size)), desc=desc, disable=not progress, leave=False):
            tokens, mask = data.batch(b, device)
            with capture(model, [unembed]) as cap:
                model(tokens)
            x = cap.inputs[unembed.name][:, :-1].float()
            m = mask.float()
            r = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
            if reps is None:
                reps = torch.zeros((len(data), r.shape[-1]))
            reps[torch.tensor(b)] = r.cpu()
    return reps


def repsim_scores(model: torch.nn.Module, modules: Sequence[TrackedModule], data: Encoded, query: Query,
                  query_enc: Encoded, *, batch_size: int = 64, progress: bool = True) -> Scores:
    """Cosine of each query's representation with each training row's: ``(n_query, n_train)``."""
    unembed = [t for t in modules if t.role == "unembed"]
    if not unembed:
        raise ValueError("repsim needs the model's unembedding (an nn.Linear named unembed / lm_head)")
    rq_rows = representations(model, unembed[0], query_enc, batch_size=batch_size, progress=False)
    w = torch.tensor(query.weights, dtype=torch.float32)[:, None]
    rq = torch.zeros((query.n_query, rq_rows.shape[1])).index_add_(0, torch.tensor(query.query_of_row), w * rq_rows)
    rz = representations(model, unembed[0], data, batch_size=batch_size, progress=progress)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # noqa: E731
    return Scores(scores=unit(rq) @ unit(rz).T)


__all__ = ["loss_scores", "repsim_scores", "representations"]
