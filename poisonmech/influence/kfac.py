"""K-FAC and EK-FAC curvature of the tracked maps, and their damped inverses.

For a map ``y = W a`` the Gauss–Newton / Fisher block of ``vec(W)`` is approximated by a
Kronecker product ``A ⊗ G`` with ``A = E[a a^T]`` over the inputs and ``G = E[g g^T]`` over
the output gradients (Martens & Grosse 2015), both averaged over the positions that can
reach a scored token. With ``A = Q_A diag(λ_A) Q_A^T`` and ``G = Q_G diag(λ_G) Q_G^T``:

- **K-FAC** preconditions a gradient ``V`` (``d_out × d_in``) as
  ``Q_G [(Q_G^T V Q_A) / (λ_G λ_A^T + δ)] Q_A^T``;
- **EK-FAC** (George et al. 2018; Grosse et al. 2023) replaces ``λ_G λ_A^T`` by the
  corrected eigenvalues ``Λ = E_rows[(Q_G^T ∇W_row Q_A)^2]``, the exact diagonal of the
  curvature in the Kronecker eigenbasis.

The damping ``δ`` defaults to 0.1 × the mean eigenvalue of each block (kronfluence's
heuristic). The pseudo-gradients of the curvature come from labels sampled from the model
(``fisher="mc"``, the true Fisher, an unbiased estimate of the Gauss–Newton matrix for a
softmax cross-entropy) or from the data (``fisher="empirical"``). As in kronfluence, the
correction pass draws fresh labels (the generator continues). With fewer scored tokens than a
map has outputs ``G`` is singular, and EK-FAC then puts the fresh labels' curvature into its
null space along eigenvectors that ``eigh`` chooses arbitrarily there: with ``fisher="mc"`` on
so little data, two equivalent models (a bridge and its Hugging Face module) can differ by
much more than rounding; ``fisher="empirical"`` and K-FAC are unaffected.

The eigenvalue-correction pass projects each position's ``a`` and ``g`` into the
eigenbases before forming the row's gradient, ``Q_G^T (Σ_t g_t a_t^T) Q_A = Σ_t (Q_G^T g_t)
(Q_A^T a_t)^T``: ``pos × (d_out² + d_in²)`` work per row instead of ``d_out d_in (d_out +
d_in)``, several times less for short rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from poisonmech.encoding import Encoded
from poisonmech.influence.grads import BatchGrads, forward_backward, iter_batches
from poisonmech.influence.tracking import TrackedModule, activation_covariance, times_activations
from poisonmech.runtime import eval_mode, model_device, num_threads
from poisonmech.storage import load_tensors, save_tensors, tensors_metadata

Tensor = torch.Tensor
STRATEGIES = ("kfac", "ekfac")
FISHERS = ("mc", "empirical")
#: damping = DAMPING_SCALE × mean eigenvalue of each block, unless given
DAMPING_SCALE = 0.1


def check_finite(t: TrackedModule, what: str, x: Tensor) -> None:
    """Raise ``FloatingPointError`` naming the module when a factor holds NaN or inf."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(f"{what} of module {t.label} ({t.name}) has {bad} NaN/inf entries; the model's "
                                 "activations or gradients overflow (check the weights, or track fewer modules)")


@dataclass
class Factors:
    """Fitted curvature of each tracked map, keyed by module name.

    ``A``/``G``: covariances (already averaged); ``QA``/``eA``, ``QG``/``eG``: their
    eigenvectors and eigenvalues; ``lam``: EK-FAC's corrected eigenvalues (``d_out × d_in``),
    ``None`` for K-FAC. ``damping``: ``None`` for the heuristic or an absolute value.
    """

    strategy: str
    modules: list[TrackedModule]
    A: dict[str, Tensor]
    G: dict[str, Tensor]
    QA: dict[str, Tensor] = field(default_factory=dict)
    eA: dict[str, Tensor] = field(default_factory=dict)
    QG: dict[str, Tensor] = field(default_factory=dict)
    eG: dict[str, Tensor] = field(default_factory=dict)
    lam: dict[str, Tensor] = field(default_factory=dict)
    damping: float | None = None
    n_positions: int = 0
    n_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each fitting pass

    def eigenvalues(self, name: str) -> Tensor:
        """The block's curvature eigenvalues on the ``d_out × d_in`` grid (before damping)."""
        if self.strategy == "ekfac":
            return self.lam[name]
        return self.eG[name][:, None] * self.eA[name][None, :]

    def damping_of(self, name: str) -> float:
        if self.damping is not None:
            return float(self.damping)
        return DAMPING_SCALE * float(self.eigenvalues(name).mean())

    def inverse_eigenvalues(self, name: str) -> Tensor:
        """``1 / (λ + δ)`` on the ``d_out × d_in`` eigen-grid."""
        return 1.0 / (self.eigenvalues(name) + self.damping_of(name))

    def rotate(self, name: str, grad: Tensor) -> Tensor:
        """``Q_G^T V Q_A`` for ``V`` of shape ``(..., d_out, d_in)``."""
        return self.QG[name].T @ grad @ self.QA[name]

    def unrotate(self, name: str, grad: Tensor) -> Tensor:
        return self.QG[name] @ grad @ self.QA[name].T

    def precondition(self, name: str, grad: Tensor) -> Tensor:
        """The damped inverse curvature times ``grad`` (``(..., d_out, d_in)``): the iHVP."""
        return self.unrotate(name, self.rotate(name, grad) * self.inverse_eigenvalues(name))

    def rotate_tokens(self, name: str, t: TrackedModule, a: Tensor, g: Tensor) -> Tensor:
        """Each row's gradient in the eigenbasis from its positions' ``a`` and ``g``
        (``(batch, d_out, d_in)``), without forming the gradient in the original basis."""
        a_rot = times_activations(t, a, self.QA[name])
        g_rot = g @ self.QG[name]
        return torch.einsum("bto,bti->boi", g_rot, a_rot)

    def rotated_rows(self, name: str, t: TrackedModule, a: Tensor, g: Tensor, valid: Tensor) -> Iterator[Tensor]:
        """Each row's gradient in the eigenbasis, one row at a time (a reused buffer: consume
        it before the next): small per-row products stay in cache, several times faster than
        one batched product followed by element-wise work on the whole batch."""
        a_rot = times_activations(t, a, self.QA[name])
        g_rot = (g @ self.QG[name]).transpose(1, 2)
        lengths = valid.sum(1).tolist()
        buf = torch.empty((t.d_out, t.d_in), dtype=a_rot.dtype, device=a_rot.device)
        for b, n in enumerate(lengths):
            if n == 0:
                buf.zero_()
            else:
                torch.mm(g_rot[b, :, :n], a_rot[b, :n], out=buf)
            yield buf

    def self_influence(self, name: str, t: TrackedModule, a: Tensor, g: Tensor, valid: Tensor) -> Tensor:
        """``∇L_z^T (curvature + δ)^{-1} ∇L_z`` of this map for each row of a batch."""
        inv = self.inverse_eigenvalues(name).reshape(-1)
        out = []
        for x in self.rotated_rows(name, t, a, g, valid):
            out.append(torch.dot(x.square_().reshape(-1), inv))
        return torch.stack(out)

    def dense(self, name: str) -> Tensor:
        """The block's damped curvature as an explicit ``(d_out d_in)²`` matrix (tests only),
        in the row-major ``vec`` of a ``d_out × d_in`` gradient."""
        q = torch.kron(self.QG[name], self.QA[name])
        lam = self.eigenvalues(name).reshape(-1) + self.damping_of(name)
        return q @ torch.diag(lam) @ q.T

    # -------------------------------------------------------------- persistence
    def save(self, path: Path, settings: dict) -> None:
        tensors = {}
        for key in ("A", "G", "QA", "eA", "QG", "eG", "lam"):
            for name, x in getattr(self, key).items():
                tensors[f"{key}/{name}"] = x
        meta = {"strategy": self.strategy, "settings": json.dumps(settings, sort_keys=True),
                "damping": json.dumps(self.damping), "n_positions": str(self.n_positions),
                "n_rows": str(self.n_rows)}
        save_tensors(Path(path), tensors, metadata=meta)

    @classmethod
    def load(cls, path: Path, modules: Sequence[TrackedModule]) -> Factors:
        tensors, meta = load_tensors(Path(path)), tensors_metadata(Path(path))
        parts: dict[str, dict[str, Tensor]] = {k: {} for k in ("A", "G", "QA", "eA", "QG", "eG", "lam")}
        for key, x in tensors.items():
            kind, name = key.split("/", 1)
            parts[kind][name] = x
        missing = [t.label for t in modules if t.name not in parts["A"]]
        if missing:
            raise ValueError(f"{path}: cached factors lack modules {missing}")
        return cls(strategy=meta["strategy"], modules=list(modules), damping=json.loads(meta["damping"]),
                   n_positions=int(meta["n_positions"]), n_rows=int(meta["n_rows"]), **parts)


def _eigh(t: TrackedModule, what: str, m: Tensor) -> tuple[Tensor, Tensor]:
    m64 = m.double()
    m64 = 0.5 * (m64 + m64.T)
    # LAPACK's threaded eigh on small matrices is slow, and very slow on a shared machine
    # (spinning threads): one thread, restored after
    with num_threads(1):
        evals, evecs = torch.linalg.eigh(m64)
    evals, evecs = evals.clamp(min=0.0).float(), evecs.float()
    check_finite(t, f"{what} eigendecomposition", evals)
    return evals, evecs


def fit_covariances(model: torch.nn.Module, modules: Sequence[TrackedModule], data: Encoded, *,
                    fisher: str = "mc", batch_size: int = 64, generator: torch.Generator | None = None,
                    progress: bool = True, index: Sequence[int] | None = None) -> Factors:
    """The K-FAC covariances ``A`` and ``G`` and their eigendecompositions (one pass)."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    device = model_device(model)
    batches = list(iter_batches(data, index, batch_size))

    def passes() -> Iterator[BatchGrads]:
        for b in tqdm(batches, desc="influence: covariances", disable=not progress, leave=False):
            tokens, mask = data.batch(b, device)
            yield forward_backward(model, modules, tokens, mask, labels="true" if fisher == "empirical" else "mc",
                                   generator=generator)

    return covariance_factors(modules, passes(), sum(len(b) for b in batches), device)


def covariance_factors(modules: Sequence[TrackedModule], passes: Iterable[BatchGrads], n_rows: int,
                       device) -> Factors:
    """K-FAC factors from one pass of captured batches: ``A`` and ``G`` averaged over every
    valid position (``BatchGrads.valid``), checked finite, with their eigendecompositions. The
    pass of :func:`fit_covariances` (language-model rows) and of
    :func:`poisonmech.influence.reward.fit_pair_factors` (a reward model's preference pairs)."""
    A = {t.name: torch.zeros(t.d_in, t.d_in, device=device) for t in modules}
    G = {t.name: torch.zeros(t.d_out, t.d_out, device=device) for t in modules}
    n_pos = 0
    for bg in passes:
        valid = bg.valid
        n_pos += int(valid.sum())
        for t in modules:
            A[t.name] += activation_covariance(t, bg.a[t.name][valid])
            g = bg.g[t.name][valid]
            G[t.name].addmm_(g.T, g)
    f = Factors(strategy="kfac", modules=list(modules), A={}, G={}, n_positions=n_pos, n_rows=n_rows)
    for t in modules:
        a, g = A[t.name] / max(n_pos, 1), G[t.name] / max(n_pos, 1)
        check_finite(t, "K-FAC activation covariance A", a)
        check_finite(t, "K-FAC gradient covariance G", g)
        f.A[t.name], f.G[t.name] = a, g
        f.eA[t.name], f.QA[t.name] = _eigh(t, "activation covariance A", a)
        f.eG[t.name], f.QG[t.name] = _eigh(t, "gradient covariance G", g)
    return f


def fit_eigenvalue_correction(model: torch.nn.Module, factors: Factors, data: Encoded, *, fisher: str = "mc",
                              batch_size: int = 64, generator: torch.Generator | None = None,
                              progress: bool = True, index: Sequence[int] | None = None) -> Factors:
    """EK-FAC: the curvature's diagonal in the K-FAC eigenbasis from per-row gradients (one pass)."""
    modules = factors.modules
    device = model_device(model)
    lam = {t.name: torch.zeros(t.d_out, t.d_in, device=device) for t in modules}
    n = 0
    batches = list(iter_batches(data, index, batch_size))
    for b in tqdm(batches, desc="influence: eigenvalue correction", disable=not progress, leave=False):
        tokens, mask = data.batch(b, device)
        bg = forward_backward(model, modules, tokens, mask, labels="true" if fisher == "empirical" else "mc",
                              generator=generator)
        n += len(b)
        for t in modules:
            acc = lam[t.name]
            for x in factors.rotated_rows(t.name, t, bg.a[t.name], bg.g[t.name], bg.valid):
                acc.addcmul_(x, x)
    out = Factors(strategy="ekfac", modules=factors.modules, A=factors.A, G=factors.G, QA=factors.QA,
                  eA=factors.eA, QG=factors.QG, eG=factors.eG, damping=factors.damping,
                  n_positions=factors.n_positions, n_rows=n)
    for t in modules:
        out.lam[t.name] = lam[t.name] / max(n, 1)
        check_finite(t, "EK-FAC corrected eigenvalues", out.lam[t.name])
    return out


def fit_factors(model: torch.nn.Module, modules: Sequence[TrackedModule], data: Encoded, *,
                strategy: str = "ekfac", fisher: str = "mc", damping: float | None = None,
                batch_size: int = 64, seed: int = 0, progress: bool = True,
                index: Sequence[int] | None = None) -> Factors:
    """Fit K-FAC (one pass over ``data``) or EK-FAC (two passes) factors.

    ``damping``: ``None`` for 0.1 × each block's mean eigenvalue, or an absolute value.
    ``seed`` seeds the sampled labels of ``fisher="mc"``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if damping is not None and not damping >= 0:
        raise ValueError(f"damping must be None or >= 0, got {damping!r}")
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        t0 = time.perf_counter()
        f = fit_covariances(model, modules, data, fisher=fisher, batch_size=batch_size, generator=gen,
                            progress=progress, index=index)
        seconds = {"covariances": time.perf_counter() - t0}
        if strategy == "ekfac":
            t0 = time.perf_counter()
            f = fit_eigenvalue_correction(model, f, data, fisher=fisher, batch_size=batch_size, generator=gen,
                                          progress=progress, index=index)
            seconds["eigenvalue correction"] = time.perf_counter() - t0
    f.damping = damping
    f.seconds = seconds
    return f


__all__ = ["DAMPING_SCALE", "FISHERS", "STRATEGIES", "Factors", "check_finite", "fit_covariances",
           "fit_eigenvalue_correction", "fit_factors"]
