"""LoRA-space attribution: on a peft LoRA model only the adapters train, and every gradient
method scores over the adapter parameters (``lora_A`` / ``lora_B``), as the literature does;
frozen parameters are left out in general.

References: torch.func per-example gradients over the adapter parameters only (grad-dot,
grad-cos), the exact damped inverse Gauss–Newton matrix of the adapter parameters from
torch.func Jacobians (EK-FAC / K-FAC), and kronfluence on the same adapters.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy.stats import pearsonr, spearmanr
from torch.func import functional_call, jacrev

from poisonmech.encoding import Encoded, encode
from poisonmech.influence import METHODS, Query, attribute
from poisonmech.influence.kfac import fit_factors
from poisonmech.influence.tracking import find_modules
from poisonmech.storage import save_tensors
from tests.hf_models import hf_bridge, hf_module
from tests.influence.test_hf_architectures import QUERY, TOK, TRAIN, _func_grads, _rows

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def lora_model(arch: str = "llama", targets: list[str] | None = None, r: int = 4, seed: int = 0, peft_model=False,
               **kw):
    """A peft LoRA model of a tiny random HF model (``.base_model.model``: the HF module with
    ``lora.Linear`` layers; the PeftModel itself with ``peft_model``). peft starts ``lora_B`` at
    zero (the adapter a no-op, so ``lora_A``'s gradient is zero); it is drawn at random here,
    standing in for a trained adapter."""
    base = hf_module(arch, vocab=len(TOK), **kw)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or TARGETS[arch],
                                                lora_dropout=0.0, fan_in_fan_out=arch == "gpt2"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval() if peft_model else model.base_model.model.eval()


def _trainable(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def _tracked(model, mods) -> set[int]:
    lookup = dict(model.named_modules())
    return {id(lookup[t.name].weight) for t in mods} | {id(lookup[t.name].bias) for t in mods if t.bias}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_adapters_are_tracked(arch):
    """The maps are the lora_A / lora_B matrices (GPT-2's Conv1D base layers included), labelled
    after the layer they adapt; their weights are exactly the trainable parameters."""
    model = lora_model(arch)
    mods = find_modules(model)
    assert _tracked(model, mods) == _trainable(model)
    assert all(t.lora in ("A", "B") and t.kind == "linear" and not t.bias for t in mods)
    labels = {t.label for t in mods}
    if arch == "llama":
        assert {"L0.attn.q_proj.lora_A", "L0.attn.k_proj.lora_B", "L1.mlp.down_proj.lora_B"} <= labels
        comps = {t.label: t.component_index()[1] for t in mods}
        assert comps["L0.attn.q_proj.lora_B"] == [f"L0.H{h}" for h in range(4)]  # heads on B's rows
        assert comps["L0.attn.k_proj.lora_B"] == ["L0.KV0", "L0.KV1"]  # grouped key/value heads
        assert comps["L0.attn.q_proj.lora_A"] == ["L0.attn"]  # A's rows are rank, not heads
        assert comps["L0.attn.o_proj.lora_A"][:4] == [f"L0.H{h}" for h in range(4)]  # heads on A's columns
    else:
        assert {"L0.attn.c_attn.lora_A", "L0.attn.c_proj.lora_B", "L0.mlp.c_proj.lora_A"} <= labels
    # the PeftModel itself: the same maps under its prefix
    wrapped = lora_model(arch, peft_model=True)
    assert [t.label for t in find_modules(wrapped)] == [t.label for t in mods]


def _autograd_scores(model, mods, train, query) -> torch.Tensor:
    """``∇L_q · ∇L_z`` from torch.func gradients over the adapter parameters only."""
    tenc, qenc = encode(train, TOK, loss_on="completion"), Query.from_rows(query).encode(TOK)

    def flat(e):
        g = _func_grads(model, mods, *e.batch(list(range(len(e)))))
        return torch.cat([g[t.name].reshape(len(e), -1) for t in mods], 1)

    return flat(qenc) @ flat(tenc).T, flat(qenc), flat(tenc)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_space_graddot_and_gradcos_equal_autograd_over_the_adapters(arch):
    """grad-dot and grad-cos on a LoRA model are the dot / cosine of the per-example gradients
    over the adapter parameters (torch.func, frozen weights held fixed); unfreezing the base
    changes the scores (the frozen weights are not silently included)."""
    model = lora_model(arch)
    mods = find_modules(model)
    expected, gq, gz = _autograd_scores(model, mods, TRAIN, QUERY)
    dot = attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method="graddot", progress=False).scores
    torch.testing.assert_close(dot, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    cos = attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method="gradcos", progress=False).scores
    unit = gq / gq.norm(dim=1, keepdim=True) @ (gz / gz.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, unit, rtol=1e-4, atol=1e-5)
    for p in model.parameters():
        p.requires_grad_(True)
    full = attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method="graddot", progress=False).scores
    assert (full - dot).abs().max() > 0.1 * dot.abs().max()


def test_every_method_on_a_lora_model(tmp_path):
    """All eight methods run on the LoRA module and on the PeftModel, with the same scores; the
    gradient methods see only the adapters, and split them into heads (GQA key/value heads apart)."""
    module, wrapped = lora_model(), lora_model(peft_model=True)
    ckpts = []
    for tag, m in (("module", module), ("peft", wrapped)):
        ckpts.append(tmp_path / f"{tag}.safetensors")
        save_tensors(ckpts[-1], dict(m.state_dict()))
    for method in METHODS:
        res = [attribute(m, train=TRAIN, query=QUERY, tokenizer=TOK, method=method, progress=False,
                         projection_dim=16, checkpoints=[(c, 0.1)]) for m, c in zip((module, wrapped), ckpts)]
        a, b = res[0].scores, res[1].scores
        assert a.shape == (3, 10) and torch.isfinite(a).all() and a.abs().max() > 0, method
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=method)
        if method not in ("loss", "repsim"):
            assert all("lora_" in lab for lab in res[0].settings["modules_tracked"]), method
        if method == "graddot":
            assert {"L0.H0", "L0.KV1", "L1.attn", "L1.mlp"} <= set(res[0].component_labels)


def ggn_case(seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """K-FAC / EK-FAC / grad-dot scores against the exact damped inverse-GGN ones on a one-layer
    LoRA Llama: ``{method: (pearson, spearman, relative error)}``."""
    model = lora_model("llama", ["q_proj", "v_proj", "down_proj"], r=2, seed=seed, d_model=16, n_heads=2,
                       n_kv_heads=1, d_mlp=32, n_layers=1)
    mods = find_modules(model)
    train, query = _rows(12, seed), _rows(4, seed + 100)
    _, gq, gz = _autograd_scores(model, mods, train, query)
    gq, gz = gq.double(), gz.double()
    enc = encode(train, TOK, loss_on="completion")
    params = dict(torch.nn.Module.named_parameters(model))
    path = {id(p): n for n, p in params.items()}
    lookup = dict(model.named_modules())
    names = [path[id(lookup[t.name].weight)] for t in mods]  # row-major vec of each (d_out, d_in) weight, in order
    fixed = {n: p.detach() for n, p in params.items()}

    def logits(sub, tok):
        return functional_call(model, {**fixed, **sub}, (tok[None],)).logits[0]

    ggn = torch.zeros(gz.shape[1], gz.shape[1], dtype=torch.float64)
    for i in range(len(enc)):
        tok, mask = enc.batch([i])
        jac = jacrev(logits)({n: fixed[n] for n in names}, tok[0])
        jm = torch.cat([jac[n].flatten(2) for n in names], -1).double()  # (pos, vocab, n_params)
        with torch.no_grad():
            p = logits({}, tok[0]).double().softmax(-1)
        for t in torch.nonzero(mask[0]).flatten().tolist():  # the positions predicting scored tokens
            h = torch.diag(p[t]) - torch.outer(p[t], p[t])
            ggn += jm[t].T @ h @ jm[t]
    ggn /= len(enc)  # per row, as EK-FAC's eigenvalues and kronfluence's
    lam = float(0.1 * torch.trace(ggn) / len(ggn))
    exact = (gq @ torch.linalg.solve(ggn + lam * torch.eye(len(ggn), dtype=torch.float64), gz.T)).flatten()
    copies = Encoded(ids=enc.ids * 100, start=enc.start * 100, pad_id=enc.pad_id)
    qg = _func_grads(model, mods, *Query.from_rows(query).encode(TOK).batch(list(range(4))))
    scores = {"graddot": (gq @ gz.T).flatten()}
    for strategy in ("kfac", "ekfac"):
        f = fit_factors(model, mods, copies, strategy=strategy, fisher="mc", damping=lam, batch_size=400, seed=seed,
                        progress=False)
        pre = torch.cat([f.precondition(t.name, qg[t.name]).reshape(4, -1) for t in mods], 1).double()
        scores[strategy] = (pre @ gz.T).flatten()
    return {k: (float(pearsonr(v.numpy(), exact.numpy()).statistic),
                float(spearmanr(v.numpy(), exact.numpy()).statistic),
                float((v - exact).norm() / exact.norm())) for k, v in scores.items()}


def test_lora_ekfac_tracks_the_exact_damped_inverse_gauss_newton():
    """A one-layer Llama with LoRA on q, v and down (208 adapter parameters): the exact damped
    Gauss–Newton inverse of the adapter parameters, ``(J^T H J / n + λ)^{-1}`` from torch.func
    Jacobians, against K-FAC / EK-FAC fitted with sampled labels on 100 copies of the rows (the
    same λ). The approximation is not exact on LoRA (block-diagonal over lora_A and lora_B, whose
    product is what the model sees, and Kronecker within each; measured over seeds 0-5: Pearson
    EK-FAC 0.51-0.73, K-FAC 0.47-0.62, grad-dot 0.22-0.58; EK-FAC's relative error 0.71-0.90,
    K-FAC's 2.8-4.3), so the test asks for that ordering on seed 0 (0.72, 0.58, 0.57): EK-FAC
    tracks the exact products, in direction and scale, better than K-FAC and grad-dot."""
    r = ggn_case(0)
    assert r["ekfac"][0] >= 0.65 and r["ekfac"][2] < 0.8, r
    assert r["ekfac"][0] > r["kfac"][0] and r["ekfac"][0] > r["graddot"][0] + 0.1 and r["kfac"][2] > 2, r


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_lora_ihvp_is_exact_on_one_scored_token(strategy):
    """One row, one scored token: each adapter matrix's empirical Fisher is exactly ``G ⊗ A``,
    so the K-FAC / EK-FAC inverse is the explicit damped one (torch.func gradients)."""
    model = lora_model("llama", ["v_proj", "o_proj", "up_proj"], r=2, d_model=16, n_heads=2, n_kv_heads=1,
                       d_mlp=32)
    mods = find_modules(model)
    data = Encoded(ids=[[3, 17]], start=[1], pad_id=0)
    f = fit_factors(model, mods, data, strategy=strategy, fisher="empirical", progress=False)
    grads = _func_grads(model, mods, *data.batch([0]))
    g = torch.Generator().manual_seed(0)
    for t in mods:
        v = grads[t.name][0].reshape(-1).double()
        lam = 0.1 * float(v @ v) / len(v)
        w = torch.randn(t.d_out, t.d_in, generator=g)
        explicit = torch.linalg.solve(torch.outer(v, v) + lam * torch.eye(len(v), dtype=torch.float64),
                                      w.reshape(-1).double())
        ours = f.precondition(t.name, w).reshape(-1).double()
        torch.testing.assert_close(ours, explicit, rtol=1e-3, atol=1e-4 * float(explicit.abs().max()), msg=t.label)


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="kronfluence is not installed")
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_lora_kfac_and_ekfac_equal_kronfluence(strategy):
    """kronfluence tracking the same lora_A / lora_B nn.Linear modules: the same scores (empirical labels)."""
    from poisonmech.influence.peers import kronfluence_scores

    model = lora_model("llama")
    q = Query.from_rows(QUERY)
    ours = attribute(model, train=TRAIN, query=q, tokenizer=TOK, method=strategy, fisher="empirical",
                     progress=False).scores
    theirs = kronfluence_scores(model, TRAIN, q, TOK, strategy=strategy, empirical_fisher=True).scores
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))


def test_frozen_parameters_are_left_out_of_every_gradient_method():
    """On a bridge with layer 0 and the unembedding frozen, and one trained weight's bias
    frozen: those are no maps (no bias column either), and grad-dot is autograd's over the rest."""
    model = hf_bridge("qwen2", vocab=len(TOK))
    frozen_bias = None
    for name, p in model.named_parameters():
        if ".layers.0." in name or "lm_head" in name:
            p.requires_grad_(False)
        if ".layers.1." in name and "q_proj" in name and name.endswith("bias"):
            p.requires_grad_(False)
            frozen_bias = p
    mods = find_modules(model)
    assert all(t.layer == 1 for t in mods) and "unembed" not in {t.label for t in mods}
    q1 = next(t for t in mods if t.label == "L1.attn.q_proj")
    assert not q1.bias and q1.d_in == 32 and frozen_bias is not None
    assert _tracked(model, mods) == {id(p) for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2
                                     and "embed" not in n} | \
        {id(p) for n, p in model.named_parameters() if p.requires_grad and "proj" in n and n.endswith("bias")}
    expected, _, _ = _autograd_scores(model, mods, TRAIN, QUERY)
    got = attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method="graddot", progress=False)
    torch.testing.assert_close(got.scores, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    for method in ("ekfac", "trak"):  # every gradient method scores over the same maps
        r = attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method=method, progress=False, projection_dim=16)
        assert r.settings["modules_tracked"] == got.settings["modules_tracked"] == [t.label for t in mods]


def test_a_model_with_nothing_trained_is_refused_clearly():
    model = lora_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trained linear maps.*requires_grad=False"):
        attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method="graddot", progress=False)
    # RepSim needs no gradient: it still runs
    assert attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method="repsim", progress=False).scores.shape == \
        (3, 10)
