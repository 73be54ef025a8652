"""The influence methods on real Hugging Face architectures: GPT-2 (``Conv1D`` maps), GPT-NeoX
(fused, per-head interleaved ``query_key_value``), Llama and Qwen2 (grouped-query attention),
each as a TransformerBridge and as the plain ``transformers`` module.

References: ``torch.func`` per-example gradients (every tracked map), explicit damped inverses
(K-FAC/EK-FAC on one scored token, where the empirical Fisher is exactly ``G ⊗ A``), the same
model with its ``Conv1D`` maps turned into ``nn.Linear`` (identical scores), the bridge against
its own module (parametrisation-invariant methods agree), and kronfluence on the Linear models.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from datasets import Dataset
from torch import nn

from poisonmech.encoding import Encoded, encode
from poisonmech.influence import METHODS, attribute
from poisonmech.influence.grads import forward_backward, func_per_example_grads, per_example
from poisonmech.influence.kfac import fit_factors
from poisonmech.influence.query import Query
from poisonmech.influence.tracking import find_modules
from poisonmech.storage import save_tensors
from poisonmech.tasks.tokenizer import build_word_tokenizer
from tests.hf_models import HF_ARCHS, hf_bridge, hf_module

WORDS = [f"w{i}" for i in range(54)]
TOK = build_word_tokenizer(WORDS)  # 58 tokens: the models' vocabulary
FORMS = ("bridge", "module")


def _model(arch: str, form: str, **kw):
    return (hf_bridge if form == "bridge" else hf_module)(arch, vocab=len(TOK), **kw)


def _rows(n: int, seed: int, n_prompt: int = 4, n_completion: int = 2) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n):
        ids = torch.randint(0, len(WORDS), (n_prompt + n_completion,), generator=g).tolist()
        prompts.append(" ".join(WORDS[i] for i in ids[:n_prompt]))
        completions.append(" ".join(WORDS[i] for i in ids[n_prompt:]))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


TRAIN, QUERY = _rows(10, 0), _rows(3, 1)


def _param_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _func_grads(model, mods, tokens, mask) -> dict[str, torch.Tensor]:
    """torch.func gradients of each map as ``(batch, d_out, d_in)`` (bias last; Conv1D transposed)."""
    names = _param_of(model)
    lookup = dict(model.named_modules())
    wanted = [names[id(lookup[t.name].weight)] for t in mods] + \
        [names[id(lookup[t.name].bias)] for t in mods if t.bias]
    ref = func_per_example_grads(model, tokens, mask, params=list(dict.fromkeys(wanted)))
    out = {}
    for t in mods:
        m = lookup[t.name]
        w = ref[names[id(m.weight)]]
        w = w if t.kind == "linear" else w.transpose(-1, -2)  # Conv1D stores (d_in, d_out)
        out[t.name] = torch.cat([w, ref[names[id(m.bias)]][..., None]], -1) if t.bias else w
    return out


# ---------------------------------------------------------------------------- which maps
EXPECTED = {  # layer 0's maps (kind), then the unembedding
    ("gpt2", "bridge"): {"L0.attn.q": "linear", "L0.attn.k": "linear", "L0.attn.v": "linear",
                         "L0.attn.o": "conv1d", "L0.mlp.c_fc": "conv1d", "L0.mlp.c_proj": "conv1d"},
    ("gpt2", "module"): {"L0.attn.c_attn": "conv1d", "L0.attn.c_proj": "conv1d", "L0.mlp.c_fc": "conv1d",
                         "L0.mlp.c_proj": "conv1d"},
    ("neox", "bridge"): {"L0.attn.q": "linear", "L0.attn.k": "linear", "L0.attn.v": "linear",
                         "L0.attn.o": "linear", "L0.mlp.dense_h_to_4h": "linear", "L0.mlp.dense_4h_to_h": "linear"},
    ("neox", "module"): {"L0.attn.query_key_value": "linear", "L0.attn.dense": "linear",
                         "L0.mlp.dense_h_to_4h": "linear", "L0.mlp.dense_4h_to_h": "linear"},
}
for _form in FORMS:
    for _arch in ("llama", "qwen2"):
        EXPECTED[(_arch, _form)] = {f"L0.{p}": "linear" for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                  "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                                  "mlp.down_proj")}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_tracked_maps_cover_every_trained_matrix(arch, form):
    """The maps are the architecture's projections (GPT-2's Conv1D included), named per layer;
    together with the embeddings and norms they hold every parameter that gets a gradient."""
    model = _model(arch, form)
    mods = find_modules(model)
    layer0 = {t.label: t.kind for t in mods if t.layer == 0}
    assert layer0 == EXPECTED[(arch, form)]
    assert [t.label for t in mods].count("unembed") == 1 and len(mods) == 2 * len(layer0) + 1
    assert not [t for t in mods if t.role == "other"]
    # every parameter that gets a gradient is a tracked weight/bias, an embedding or a norm (1-D, not a bias)
    lookup = dict(model.named_modules())
    tracked = {id(lookup[t.name].weight) for t in mods} | {id(lookup[t.name].bias) for t in mods if t.bias}
    logits = model(torch.tensor([[1, 2, 3]]))
    (logits if isinstance(logits, torch.Tensor) else logits.logits).sum().backward()
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    untracked = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in tracked
                 and id(p) not in embeds]
    assert all("norm" in n or "ln" in n for n in untracked), untracked
    # grouped-query attention: key/value maps carry n_kv_heads heads, labelled apart from query heads
    comps = {t.label: t.component_index()[1] for t in mods}
    if arch in ("llama", "qwen2"):
        assert comps["L0.attn.k_proj"] == ["L0.KV0", "L0.KV1"] and comps["L0.attn.q_proj"][-1] == "L0.H3"
        assert {t.label: t.bias for t in mods}["L0.attn.q_proj"] == (arch == "qwen2")
    elif form == "module":
        fused = "L0.attn.c_attn" if arch == "gpt2" else "L0.attn.query_key_value"
        assert comps[fused] == [f"L0.H{h}" for h in range(4)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hook_gradients_equal_torch_func(arch, form):
    """Every map's per-row gradient from the hooks (``Σ_t g_t a_t^T``) equals torch.func's of
    the parameter itself (a Conv1D's transposed). GPT-2's unembedding is tied to its embedding,
    whose use torch.func adds: left out there."""
    model = _model(arch, form)
    mods = [t for t in find_modules(model) if not (arch == "gpt2" and t.role == "unembed")]
    tokens, mask = encode(TRAIN, TOK, loss_on="completion").batch(list(range(4)))
    bg = forward_backward(model, mods, tokens, mask)
    ref = _func_grads(model, mods, tokens, mask)
    for t in mods:
        ours = per_example(t, bg.a[t.name], bg.g[t.name])
        torch.testing.assert_close(ours, ref[t.name], rtol=1e-4, atol=1e-6 * float(ref[t.name].abs().max()) + 1e-9)


# ---------------------------------------------------------------------------- every method
def _all_methods(model, tmp_path) -> dict:
    """Every method's result; K-FAC/EK-FAC with empirical labels: with sampled ones EK-FAC on 10
    rows is basis-dependent in G's null space (see :mod:`poisonmech.influence.kfac`)."""
    ckpt = tmp_path / "ckpt.safetensors"
    save_tensors(ckpt, dict(model.state_dict()))
    return {m: attribute(model, train=TRAIN, query=QUERY, tokenizer=TOK, method=m, progress=False,
                         checkpoints=[(ckpt, 0.1)], projection_dim=16, fisher="empirical") for m in METHODS}


#: methods whose scores do not depend on how the weights are split into maps
INVARIANT = ("loss", "repsim", "graddot", "gradcos", "tracin")


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_every_method_on_bridge_and_module(arch, tmp_path):
    """All eight methods run on the bridge and on its HF module. Where both have the same maps
    (Llama, Qwen2) every method agrees; where the bridge splits a fused qkv (GPT-2, NeoX) the
    methods that are sums over parameters agree, and so do graddot's per-head components (the
    fused map's heads read as blocked for GPT-2, interleaved for NeoX)."""
    bridge, module = _model(arch, "bridge"), _model(arch, "module")
    rb, rm = _all_methods(bridge, tmp_path), _all_methods(module, tmp_path)
    same_maps = arch in ("llama", "qwen2")
    for method in METHODS:
        for r in (rb[method], rm[method]):
            assert r.scores.shape == (3, 10) and torch.isfinite(r.scores).all() and r.scores.abs().max() > 0, method
        if same_maps or method in INVARIANT:
            a, b = rb[method].scores, rm[method].scores
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=method)
    heads = [f"L{layer}.H{h}" for layer in range(2) for h in range(4)]
    comp_b = dict(zip(rb["graddot"].component_labels, rb["graddot"].component_scores))
    comp_m = dict(zip(rm["graddot"].component_labels, rm["graddot"].component_scores))
    for lab in heads + ["L0.mlp", "L1.mlp", "unembed"]:
        scale = float(comp_m[lab].abs().max())
        assert scale > 0
        torch.testing.assert_close(comp_b[lab], comp_m[lab], rtol=1e-4, atol=1e-4 * scale, msg=lab)


# ---------------------------------------------------------------------------- Conv1D = Linear
def _conv1d_as_linear(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every HF ``Conv1D`` (``y = x W + b``, ``W: (d_in, d_out)``)
    replaced by the equivalent ``nn.Linear`` (weight ``W^T``)."""
    from transformers.pytorch_utils import Conv1D

    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return out


def test_conv1d_factors_and_scores_equal_the_linear_twin():
    """GPT-2 with its Conv1D maps and the same model with them as nn.Linear: the same K-FAC
    factors (those of the transposed map) and the same K-FAC / EK-FAC scores, with sampled and
    with empirical labels. (On the HF module: the GPT-2 bridge needs Conv1D to build; its own
    Conv1D maps are held to torch.func and the exact inverse by the tests above and below.)"""
    conv = hf_module("gpt2", vocab=len(TOK))
    lin = _conv1d_as_linear(conv)
    mc, ml = find_modules(conv), find_modules(lin)
    assert [t.label for t in mc] == [t.label for t in ml]
    assert {t.kind for t in mc} == {"linear", "conv1d"} and {t.kind for t in ml} == {"linear"}
    tokens = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(lin(tokens).logits, conv(tokens).logits)
    enc = encode(TRAIN, TOK, loss_on="completion")
    fc, fl = fit_factors(conv, mc, enc, strategy="ekfac", progress=False), \
        fit_factors(lin, ml, enc, strategy="ekfac", progress=False)
    for tc, tl in zip(mc, ml):
        for key in ("A", "G", "lam"):
            x, y = getattr(fc, key)[tc.name], getattr(fl, key)[tl.name]
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()), msg=f"{key} {tc.label}")
    for method in ("kfac", "ekfac"):
        for fisher in ("mc", "empirical"):
            a, b = (attribute(m, train=TRAIN, query=QUERY, tokenizer=TOK, method=method, fisher=fisher,
                              progress=False).scores for m in (conv, lin))
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=f"{method} {fisher}")


# ---------------------------------------------------------------------------- exact inverse
@pytest.mark.parametrize(("arch", "form"), [("gpt2", "module"), ("gpt2", "bridge"), ("neox", "module"),
                                            ("llama", "bridge"), ("qwen2", "module")])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_ihvp_is_the_exact_damped_inverse_on_one_scored_token(arch, form, strategy):
    """One row, one scored token: each map's empirical Fisher ``vec(∇W) vec(∇W)^T`` (``∇W``
    from torch.func, a Conv1D's transposed) is exactly ``G ⊗ A``, so K-FAC and EK-FAC must give
    its explicit damped inverse (damping 0.1 × mean eigenvalue = 0.1 × trace / dimension).
    Attention over one position does not depend on q and k: their gradients are zero (checked)."""
    model = _model(arch, form, d_model=16, n_heads=2, n_kv_heads=1, d_mlp=32)
    mods = [t for t in find_modules(model) if not (arch == "gpt2" and t.role == "unembed")]  # tied: see above
    data = Encoded(ids=[[3, 17]], start=[1], pad_id=0)
    f = fit_factors(model, mods, data, strategy=strategy, fisher="empirical", progress=False)
    grads = _func_grads(model, mods, *data.batch([0]))
    g = torch.Generator().manual_seed(0)
    checked = 0
    for t in mods:
        v = grads[t.name][0].reshape(-1).double()
        if t.role in ("q", "k"):
            assert float(v.abs().max()) < 1e-6 and float(f.A[t.name].abs().max() * f.G[t.name].abs().max()) < 1e-6
            continue
        checked += 1
        fisher = torch.outer(v, v)
        lam = 0.1 * torch.trace(fisher) / len(v)
        w = torch.randn(t.d_out, t.d_in, generator=g)
        explicit = torch.linalg.solve(fisher + lam * torch.eye(len(v), dtype=torch.float64), w.reshape(-1).double())
        ours = f.precondition(t.name, w).reshape(-1).double()
        torch.testing.assert_close(ours, explicit, rtol=1e-3, atol=1e-4 * float(explicit.abs().max()), msg=t.label)
    assert checked >= 4


# ---------------------------------------------------------------------------- kronfluence
def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="kronfluence is not installed")
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("arch", ["neox", "llama", "gpt2"])
def test_kfac_and_ekfac_equal_kronfluence(arch, strategy):
    """kronfluence tracks nn.Linear (and Conv2d) only: on the NeoX and Llama modules it sees
    every map ours does, and for GPT-2 it runs on the nn.Linear twin of our Conv1D model. With
    empirical labels (no sampling difference) the scores agree to float precision; K-FAC with
    sampled labels too (both draw them from a generator seeded 0 in the same order)."""
    from poisonmech.influence.peers import kronfluence_scores

    model = _model(arch, "module")
    peer = _conv1d_as_linear(model) if arch == "gpt2" else model
    q = Query.from_rows(QUERY)
    ours = attribute(model, train=TRAIN, query=q, tokenizer=TOK, method=strategy, fisher="empirical",
                     progress=False).scores
    theirs = kronfluence_scores(peer, TRAIN, q, TOK, strategy=strategy, empirical_fisher=True).scores
    assert _spearman(ours, theirs) >= 0.999
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
    if strategy == "kfac":
        ours = attribute(model, train=TRAIN, query=q, tokenizer=TOK, method="kfac", progress=False).scores
        theirs = kronfluence_scores(peer, TRAIN, q, TOK, strategy="kfac").scores
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
