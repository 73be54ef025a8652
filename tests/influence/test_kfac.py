"""K-FAC / EK-FAC inverse-Hessian-vector products against explicit damped Gauss–Newton inverses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poisonmech.encoding import Encoded
from poisonmech.influence.kfac import Factors, fit_factors
from poisonmech.influence.tracking import find_modules
from tests.helpers import LinearSoftmax, one_token_rows, small_bridge


def _row_grad(model: LinearSoftmax, x: int, y: int) -> torch.Tensor:
    """Autograd gradient of ``-log p(y | x)`` as a row-major ``vec([W | b])``."""
    loss = F.cross_entropy(model(torch.tensor([[x]]))[0], torch.tensor([y]))
    gw, gb = torch.autograd.grad(loss, [model.lin.weight, model.lin.bias])
    return torch.cat([gw, gb[:, None]], 1).reshape(-1)


def _gauss_newton(model: LinearSoftmax, x: int) -> torch.Tensor:
    """Exact GGN ``J^T H_out J`` of the softmax cross-entropy w.r.t. ``vec([W | b])``."""
    a = torch.cat([model.embed.weight[x], torch.ones(1)]).detach()
    p = model(torch.tensor([[x]]))[0, 0].softmax(-1).detach()
    h = torch.diag(p) - torch.outer(p, p)
    jac = torch.kron(torch.eye(len(p)), a[None])  # d logits / d vec([W | b]), row-major
    return jac.T @ h @ jac


def _ihvp(factors: Factors, name: str, v: torch.Tensor) -> torch.Tensor:
    return factors.precondition(name, v).reshape(-1)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [None, 0.05])
def test_ihvp_exact_for_one_linear_layer_and_one_token(strategy, damping):
    """One row, one scored token: the empirical Fisher ``vec(g a^T) vec(g a^T)^T`` is exactly
    ``G ⊗ A``, so K-FAC and EK-FAC must give the explicit damped inverse (heuristic damping:
    0.1 × the mean eigenvalue, i.e. 0.1 × trace / dimension)."""
    torch.manual_seed(0)
    model = LinearSoftmax()
    (t,) = find_modules(model)
    f = fit_factors(model, [t], one_token_rows(1, 3), strategy=strategy, fisher="empirical", damping=damping,
                    progress=False)
    g = _row_grad(model, 1, 3)
    fisher = torch.outer(g, g).double()
    lam = 0.1 * torch.trace(fisher) / len(g) if damping is None else damping
    v = torch.randn(t.d_out, t.d_in)
    explicit = torch.linalg.solve(fisher + lam * torch.eye(len(g), dtype=torch.float64), v.reshape(-1).double())
    torch.testing.assert_close(_ihvp(f, t.name, v).double(), explicit, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_ihvp_matches_exact_gauss_newton_with_sampled_labels(strategy):
    """With labels sampled from the model (the default ``fisher="mc"``), ``G`` estimates the
    output Hessian ``diag(p) - p p^T``: on many copies of one row the K-FAC / EK-FAC inverse
    matches the explicit damped Gauss–Newton inverse up to Monte-Carlo error."""
    torch.manual_seed(0)
    model = LinearSoftmax()
    (t,) = find_modules(model)
    f = fit_factors(model, [t], one_token_rows(2, 0, n=6000), strategy=strategy, batch_size=2000, seed=1,
                    progress=False)
    ggn = _gauss_newton(model, 2).double()
    lam = float(0.1 * torch.trace(ggn) / len(ggn))
    f.damping = lam
    for _ in range(3):
        v = torch.randn(t.d_out, t.d_in)
        explicit = torch.linalg.solve(ggn + lam * torch.eye(len(ggn), dtype=torch.float64), v.reshape(-1).double())
        ours = _ihvp(f, t.name, v).double()
        assert (ours - explicit).norm() / explicit.norm() < 0.05


@pytest.mark.parametrize("arch", ["native", "gpt2"])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_precondition_is_the_dense_damped_inverse_on_a_bridge(arch, strategy):
    """On a real bridge (nn.Linear and GPT-2's Conv1D), the eigenbasis preconditioner equals
    the explicit inverse of its own damped curvature matrix; K-FAC's matrix is ``G ⊗ A``."""
    model = small_bridge(arch)
    mods = find_modules(model)
    g = torch.Generator().manual_seed(0)
    data = Encoded(ids=[torch.randint(1, 40, (int(n),), generator=g).tolist() for n in (6, 9, 5, 8, 7, 9)],
                   start=[3, 4, 2, 5, 3, 6], pad_id=0)
    f = fit_factors(model, mods, data, strategy=strategy, batch_size=4, progress=False)
    for t in (mods[0], mods[3], mods[-1]):
        dense = f.dense(t.name).double()
        if strategy == "kfac":
            lam = f.damping_of(t.name)
            kron = torch.kron(f.G[t.name], f.A[t.name]).double() + lam * torch.eye(len(dense), dtype=torch.float64)
            torch.testing.assert_close(dense, kron, rtol=1e-3, atol=1e-5 * float(kron.abs().max()))
        v = torch.randn(t.d_out, t.d_in, generator=g)
        explicit = torch.linalg.solve(dense, v.reshape(-1).double())
        torch.testing.assert_close(_ihvp(f, t.name, v).double(), explicit, rtol=2e-3,
                                   atol=2e-4 * float(explicit.abs().max()))


def test_nan_factors_name_the_module():
    model = small_bridge()
    mods = find_modules(model)
    with torch.no_grad():
        model.unembed._original_component.weight[0, 0] = float("nan")
    data = Encoded(ids=[[1, 2, 3, 4]] * 2, start=[2, 2], pad_id=0)
    with pytest.raises(FloatingPointError, match=r"of module (L\d\.\S+|unembed) .* NaN/inf"):
        fit_factors(model, mods, data, fisher="empirical", progress=False)


def test_factors_save_load(tmp_path):
    model = small_bridge()
    mods = find_modules(model)
    data = Encoded(ids=[[1, 2, 3, 4, 5], [3, 4, 5, 6]], start=[2, 2], pad_id=0)
    f = fit_factors(model, mods, data, strategy="ekfac", progress=False)
    f.save(tmp_path / "f.safetensors", {"a": 1})
    g = Factors.load(tmp_path / "f.safetensors", mods)
    assert g.strategy == "ekfac" and g.n_rows == 2
    for t in mods:
        torch.testing.assert_close(g.lam[t.name], f.lam[t.name])
        torch.testing.assert_close(g.inverse_eigenvalues(t.name), f.inverse_eigenvalues(t.name))
