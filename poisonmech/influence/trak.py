"""TRAK-style attribution: random projections of per-example gradients and a kernel inverse.

Each map's row gradient ``Σ_t g_t a_t^T`` is projected with a Kronecker-structured Gaussian
sketch, ``R_G^T (Σ_t g_t a_t^T) R_A = Σ_t (R_G^T g_t)(R_A^T a_t)^T`` (as in LoGra, Choe et
al. 2024), so no row gradient is ever formed and a map costs ``k_G × k_A`` features. With
the training features ``Φ`` (``n_train × D``) the score is TRAK's (Park et al. 2023)

    score(q, z) = φ_q^T (Φ^T Φ / n + λ I)^{-1} φ_z,   λ = 0.1 × mean eigenvalue,

on loss gradients (positive: up-weighting ``z`` raises the measurement, as for every method),
averaged over an ensemble of checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from poisonmech.encoding import Encoded
from poisonmech.influence.grads import forward_backward, iter_batches
from poisonmech.influence.kfac import DAMPING_SCALE
from poisonmech.influence.methods import Scores
from poisonmech.influence.query import MetricQuery, Query
from poisonmech.influence.tracking import TrackedModule, activations
from poisonmech.runtime import eval_mode, model_device

Tensor = torch.Tensor


def projections(modules: Sequence[TrackedModule], dim: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Per map, Gaussian sketches ``R_G`` (``d_out × k_G``) and ``R_A`` (``d_in × k_A``) with
    ``k_G k_A ≈ dim`` (each side at most the map's size); seeded, scaled to preserve norms."""
    if dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {dim}")
    gen = torch.Generator().manual_seed(seed)
    side = max(1, math.isqrt(dim))
    out = {}
    for t in modules:
        kg, ka = min(t.d_out, side), min(t.d_in, side)
        out[t.name] = (torch.randn(t.d_out, kg, generator=gen) / math.sqrt(kg),
                       torch.randn(t.d_in, ka, generator=gen) / math.sqrt(ka))
    return out


def block_sizes(modules: Sequence[TrackedModule], proj: dict[str, tuple[Tensor, Tensor]]) -> list[int]:
    return [proj[t.name][0].shape[1] * proj[t.name][1].shape[1] for t in modules]


def features(model: torch.nn.Module, modules: Sequence[TrackedModule], data: Encoded | None,
             proj: dict[str, tuple[Tensor, Tensor]], *, query: Query | MetricQuery | None = None,
             batch_size: int = 64, progress: bool = True, desc: str = "influence: TRAK features") -> Tensor:
    """Projected loss gradients: ``(n_rows, D)`` for training data, or ``(n_query, D)`` for a
    query (its rows' weighted gradients summed per query; ``data`` is the query's encoded rows,
    ``None`` for a :class:`MetricQuery`)."""
    device = model_device(model)
    sizes = block_sizes(modules, proj)
    n_out = len(data) if query is None else query.n_query
    phi = torch.zeros((n_out, sum(sizes)))
    qrow = torch.tensor(query.query_of_row) if query is not None else None
    pr = {k: (rg.to(device), ra.to(device)) for k, (rg, ra) in proj.items()}
    if query is None:
        passes = ((b, forward_backward(model, modules, *data.batch(b, device)))
                  for b in iter_batches(data, None, batch_size))
    else:
        passes = query.passes(model, modules, data, None, batch_size)
    with eval_mode(model):
        for b, bg in tqdm(passes, desc=desc, disable=not progress, leave=False):
            parts = []
            for t in modules:
                rg, ra = pr[t.name]
                parts.append(torch.einsum("btg,bta->bga", bg.g[t.name] @ rg,
                                          activations(t, bg.a[t.name]) @ ra).reshape(len(b), -1))
            feats = torch.cat(parts, 1).cpu()
            if query is None:
                phi[torch.tensor(b)] = feats
            else:
                phi.index_add_(0, qrow[b], feats)
    return phi


def kernel_scores(phi_train: Tensor, phi_query: Tensor, sizes: Sequence[int], labels: Sequence[str],
                  *, damping: float | None = None, self_influence: bool = False) -> Scores:
    """``φ_q^T (Φ^TΦ/n + λI)^{-1} φ_z`` for every query and row, split over the maps' blocks."""
    n, d = phi_train.shape
    k = (phi_train.T.double() @ phi_train.double()) / max(n, 1)
    lam = DAMPING_SCALE * float(torch.diagonal(k).mean()) if damping is None else float(damping)
    chol = torch.linalg.cholesky(k + lam * torch.eye(d, dtype=k.dtype))
    x = torch.cholesky_solve(phi_query.T.double(), chol)  # (D, Q)
    scores = (phi_train.double() @ x).T.float()
    xm = x.mean(1)
    comps, lo = [], 0
    for size in sizes:
        comps.append(phi_train[:, lo:lo + size].double() @ xm[lo:lo + size])
        lo += size
    selfs = None
    if self_influence:
        z = torch.cholesky_solve(phi_train.T.double(), chol)
        selfs = (phi_train.double() * z.T).sum(1).float()
    return Scores(scores=scores, components=torch.stack(comps).float(), component_labels=tuple(labels),
                  self_scores=selfs)


__all__ = ["block_sizes", "features", "kernel_scores", "projections"]
