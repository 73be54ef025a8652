"""The gradient-similarity engine shared by ``graddot``, ``gradcos``, ``tracin``, ``kfac`` and ``ekfac``.

Every one of these scores a training row ``z`` against a query ``q`` as

    score(q, z) = ∇L_q^T  P  ∇L_z          (optionally divided by a norm of ∇L_z and of ∇L_q)

where ``L_q = -f_q`` is minus the query's measurement, ``L_z`` the row's training loss and
``P`` the identity (grad-dot, TracIn) or a damped inverse curvature (K-FAC, EK-FAC). Since a
gradient step on ``z`` moves the weights by ``-η ∇L_z``, it changes ``f_q`` by
``η ∇L_q^T ∇L_z``: a positive score means up-weighting ``z`` raises the measurement, the
sign convention of every method. (For influence functions the same holds with the
response ``-H^{-1} ∇L_z`` of the optimum to up-weighting ``z``.)

The query side is computed once: each query's gradient, preconditioned, held as one
``(n_query, d_out, d_in)`` tensor per map (or one row, the mean, with ``aggregate``). The
training set is then streamed once: per batch, the rows' gradients are formed from the
captured ``a``/``g`` and multiplied against all queries at once; memory is bounded by the
batch, never ``n_train × n_params``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from poisonmech.encoding import Encoded
from poisonmech.influence.grads import forward_backward, iter_batches, per_example
from poisonmech.influence.kfac import Factors
from poisonmech.influence.query import MetricQuery, Query
from poisonmech.influence.tracking import TrackedModule, activations, times_activations
from poisonmech.runtime import eval_mode, model_device

Tensor = torch.Tensor
RENORMALIZE = (None, "unit", "relative")


@dataclass(frozen=True)
class ComponentMap:
    """Global component labels and, per map, how its rows or columns fall into them."""

    labels: tuple[str, ...]
    axis: dict[str, str | None]
    onehot: dict[str, Tensor]  # name -> (d_axis, n_local) one-hot, or (1,) for whole-matrix maps
    index: dict[str, Tensor]  # name -> global component index of each local component

    @classmethod
    def build(cls, modules: Sequence[TrackedModule]) -> ComponentMap:
        labels: list[str] = []
        axis, onehot, index = {}, {}, {}
        for t in modules:
            ax, local, idx = t.component_index()
            for lab in local:
                if lab not in labels:
                    labels.append(lab)
            axis[t.name] = ax
            index[t.name] = torch.tensor([labels.index(lab) for lab in local])
            if ax is not None:
                onehot[t.name] = torch.nn.functional.one_hot(torch.tensor(idx), len(local)).float()
        return cls(labels=tuple(labels), axis=axis, onehot=onehot, index=index)

    def split(self, name: str, mean_query: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """``(global index, (n_local, batch) contributions)`` of one map to each row's score
        against the mean query."""
        ax = self.axis[name]
        if ax is None:
            return self.index[name], (grads * mean_query).sum((1, 2))[None]
        per = torch.einsum("boi,oi->bo" if ax == "out" else "boi,oi->bi", grads, mean_query)
        return self.index[name], (per @ self.onehot[name].to(per)).T

    def split_tokens(self, t: TrackedModule, query: Tensor, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`split`, from the positions' inputs ``a`` and gradients ``g`` without
        forming the rows' gradients: ``Σ_t g_t^T P a_t`` split over rows or columns of ``P``."""
        name = t.name
        ax = self.axis[name]
        if ax == "out":
            per = (times_activations(t, a, query.T) * g).sum(1)  # (batch, d_out)
        else:
            per = ((g @ query) * activations(t, a)).sum(1)  # (batch, d_in)
            if ax is None:
                return self.index[name], per.sum(1)[None]
        return self.index[name], (per @ self.onehot[name].to(per)).T


def gram_norms(a: Tensor, g: Tensor) -> Tensor:
    """``||Σ_t g_t a_t^T||_F²`` per row from the positions' Gram matrices (no gradient formed)."""
    return ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))


@dataclass
class Scores:
    """A method's raw output before it becomes an ``InfluenceResult``."""

    scores: Tensor  # (n_query, n_train)
    components: Tensor | None = None  # (n_component, n_train), mean over queries
    component_labels: tuple[str, ...] | None = None
    self_scores: Tensor | None = None
    train_norms: Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by phase


class ScoreAccumulator:
    """The totals one pass over the training rows fills in: scores ``(n_query, n)``, components
    split against the mean query, and (as asked) self-influences and row gradient norms, with the
    final ``renormalize`` division. Shared by :func:`gradient_scores` (language-model rows) and
    :func:`poisonmech.influence.reward.pair_scores` (preference pairs), which differ only in how
    a batch's row gradients are formed.

    ``norms``: keep each row's ``||∇L_z||`` (always needed by ``renormalize="unit"``).
    """

    def __init__(self, modules: Sequence[TrackedModule], qgrads: dict[str, Tensor], n: int, *,
                 renormalize: str | None, self_influence: bool, norms: bool) -> None:
        if renormalize not in RENORMALIZE:
            raise ValueError(f"renormalize must be one of {RENORMALIZE}, got {renormalize!r}")
        self.renormalize, self.self_influence = renormalize, self_influence
        self.comp = ComponentMap.build(modules)
        self.n_q = next(iter(qgrads.values())).shape[0]
        self.scores = torch.zeros((self.n_q, n))
        self.comps = torch.zeros((len(self.comp.labels), n))
        self.need_self = self_influence or renormalize == "relative"
        self.selfs = torch.zeros(n) if self.need_self else None
        self.norms = torch.zeros(n) if norms or renormalize == "unit" else None
        self.flat_q = {k: g.reshape(self.n_q, -1) for k, g in qgrads.items()}
        self.mean_q = {k: g.mean(0) for k, g in qgrads.items()}

    def batch(self, n_b: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A batch's zeroed ``(scores, components, squared norms, self-influences)`` on ``device``."""
        return (torch.zeros((self.n_q, n_b), device=device), torch.zeros((len(self.comp.labels), n_b), device=device),
                torch.zeros(n_b, device=device), torch.zeros(n_b, device=device))

    def add(self, b: list[int], s: Tensor, c: Tensor, sq: Tensor, si: Tensor) -> None:
        """Store the batch of rows ``b``: scores ``s``, components ``c``, squared norms ``sq`` and
        self-influences ``si``."""
        idx = torch.tensor(b)
        self.scores[:, idx] = s.cpu()
        self.comps[:, idx] = c.cpu()
        if self.norms is not None:
            self.norms[idx] = sq.sqrt().cpu()
        if self.need_self:
            self.selfs[idx] = si.cpu()

    def result(self) -> Scores:
        scores, comps = self.scores, self.comps
        if self.renormalize is not None:
            den = self.norms if self.renormalize == "unit" else self.selfs.clamp(min=0).sqrt()
            den = den.clamp(min=1e-30)
            scores, comps = scores / den, comps / den
        return Scores(scores=scores, components=comps, component_labels=self.comp.labels,
                      self_scores=self.selfs if self.self_influence else None, train_norms=self.norms)


def query_gradients(model: torch.nn.Module, modules: Sequence[TrackedModule], query: Query | MetricQuery,
                    enc: Encoded | None, *, aggregate: bool = False, batch_size: int = 64,
                    factors: Factors | None = None, queries: Sequence[int] | None = None,
                    progress: bool = False) -> dict[str, Tensor]:
    """Each query's loss gradient ``∇L_q = -∇f_q`` per map: ``(n_query, d_out, d_in)``, or
    ``(1, d_out, d_in)`` holding the mean over queries with ``aggregate``; ``queries``
    restricts to those queries (in that order). ``query`` is a :class:`Query` with its rows
    encoded as ``enc``, or a :class:`MetricQuery` (``enc`` ``None``).

    With ``factors`` the gradients come rotated into the curvature's eigenbasis (formed from
    the rotated positions, see :meth:`Factors.rotate_tokens`; norms are unchanged); finish
    with :func:`precondition_rotated`.
    """
    device = model_device(model)
    chosen = list(range(query.n_query)) if queries is None else list(queries)
    local = torch.full((query.n_query,), -1, dtype=torch.long)
    local[torch.tensor(chosen)] = torch.arange(len(chosen))
    n_q = 1 if aggregate else len(chosen)
    out = {t.name: torch.zeros((n_q, t.d_out, t.d_in), device=device) for t in modules}
    qrow = local[torch.tensor(query.query_of_row)]
    rows = [r for r in range(len(qrow)) if qrow[r] >= 0]
    passes = query.passes(model, modules, enc, rows, batch_size)
    for b, bg in tqdm(passes, desc="influence: query gradients", disable=not progress, leave=False):
        dest = torch.zeros(len(b), dtype=torch.long, device=device) if aggregate else qrow[b].to(device)
        for t in modules:
            a, g = bg.a[t.name], bg.g[t.name]
            grads = per_example(t, a, g) if factors is None else factors.rotate_tokens(t.name, t, a, g)
            out[t.name].index_add_(0, dest, grads)
    if aggregate:
        for t in modules:
            out[t.name] /= len(chosen)
    return out


def query_norms(qgrads: dict[str, Tensor]) -> Tensor:
    """Each query gradient's l2 norm over every tracked map: ``(n_query,)``."""
    return sum(g.square().sum((1, 2)) for g in qgrads.values()).sqrt()


def unit_queries(qgrads: dict[str, Tensor], aggregate_to_mean: bool = False) -> dict[str, Tensor]:
    """Query gradients scaled to unit norm (then averaged when ``aggregate_to_mean``)."""
    n = query_norms(qgrads).clamp(min=1e-30)
    out = {k: g / n[:, None, None] for k, g in qgrads.items()}
    if aggregate_to_mean:
        out = {k: g.mean(0, keepdim=True) for k, g in out.items()}
    return out


def precondition(factors: Factors, qgrads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply the damped inverse curvature to each map's query gradients."""
    return {k: factors.precondition(k, g) for k, g in qgrads.items()}


def precondition_rotated(factors: Factors, rotated: dict[str, Tensor]) -> dict[str, Tensor]:
    """Finish the preconditioning of gradients already in the eigenbasis: scale by
    ``1 / (λ + δ)`` and rotate back."""
    return {k: factors.unrotate(k, g * factors.inverse_eigenvalues(k)) for k, g in rotated.items()}


def gradient_scores(model: torch.nn.Module, modules: Sequence[TrackedModule], data: Encoded,
                    qgrads: dict[str, Tensor], *, renormalize: str | None = None, factors: Factors | None = None,
                    self_influence: bool = False, batch_size: int = 64, progress: bool = True,
                    desc: str = "influence: scoring") -> Scores:
    """Stream the training set once: ``∇L_q^T P ∇L_z`` for every query and row, with ``qgrads``
    already preconditioned (``P ∇L_q``).

    ``renormalize``: ``"unit"`` divides each row's score by ``||∇L_z||``; ``"relative"`` by
    ``sqrt(∇L_z^T P ∇L_z)`` (relative influence, Barshan et al. 2020; with ``P`` = identity
    the two coincide). ``self_influence`` returns ``∇L_z^T P ∇L_z`` (``P`` from ``factors``,
    identity without). Components are split against the mean query.
    """
    acc = ScoreAccumulator(modules, qgrads, len(data), renormalize=renormalize, self_influence=self_influence,
                           norms=False)
    device = model_device(model)
    comp, need_self = acc.comp, acc.need_self
    with eval_mode(model):
        for b in tqdm(list(iter_batches(data, None, batch_size)), desc=desc, disable=not progress, leave=False):
            tokens, mask = data.batch(b, device)
            bg = forward_backward(model, modules, tokens, mask)
            s, c, sq, si = acc.batch(len(b), device)
            for t in modules:
                a, g = bg.a[t.name], bg.g[t.name]
                if acc.n_q == 1:  # one (mean) query: Σ_t g_t^T P a_t, no row gradient formed
                    gi, part = comp.split_tokens(t, acc.mean_q[t.name], a, g)
                    s += part.sum(0)[None]
                    c.index_add_(0, gi.to(device), part)
                else:
                    grads = per_example(t, a, g)
                    s += acc.flat_q[t.name] @ grads.reshape(len(b), -1).T
                    gi, part = comp.split(t.name, acc.mean_q[t.name], grads)
                    c.index_add_(0, gi.to(device), part)
                if acc.norms is not None or (need_self and factors is None):
                    sq += gram_norms(activations(t, a), g)
                if need_self and factors is not None:
                    si += factors.self_influence(t.name, t, a, g, bg.valid)
            acc.add(b, s, c, sq, si if factors is not None else sq)
    return acc.result()


def with_weights(model: torch.nn.Module, state: dict[str, Tensor], fn: Callable[[], Scores]) -> Scores:
    """Run ``fn`` with ``model`` holding ``state`` (a checkpoint), restoring its weights after."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        _load_checkpoint(model, state)
        return fn()
    finally:
        model.load_state_dict(saved)


def _load_checkpoint(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Load a checkpoint: all of the model's tensors, or (a LoRA run's checkpoints) only its
    trained ones, the frozen base staying as it is."""
    keys = set(model.state_dict())
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    frozen |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    partial = set(state) < keys and not set(state) & frozen and (keys - set(state)) <= frozen
    model.load_state_dict(state, strict=not partial)


__all__ = ["RENORMALIZE", "ComponentMap", "Scores", "gradient_scores", "gram_norms", "precondition",
           "precondition_rotated", "query_gradients",
           "query_norms", "unit_queries", "with_weights"]
