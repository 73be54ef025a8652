"""Edge scores against independent references.

The reference is a hand-written forward of the native model from its raw torch modules (no
hooks, no poisonmech code) in which every destination's input is built explicitly, so one
edge ``src->dst`` can be moved by ``alpha * (out_clean(src) - out_corrupted(src))``. Its
derivative in ``alpha`` at 0, by autograd, is the EAP score of that edge; ``alpha = -1`` is
exact patching of that edge alone.
"""

import pytest
import torch
import torch.nn.functional as F

from poisonmech.circuits import Graph, edge_attribution, rewired
from poisonmech.circuits.rewire import reference_activations
from poisonmech.patching import logit_diff
from tests.helpers import check_rewired_forward, small_model

D_VOCAB = 40


@pytest.fixture(scope="module")
def model():
    return small_model(vocab=D_VOCAB)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, D_VOCAB, (4, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, D_VOCAB, (4,), generator=g)
    corrupted[:, 4] = torch.randint(0, D_VOCAB, (4,), generator=g)
    return clean, corrupted, logit_diff(3, 5, torch.full((4,), 6))


def manual_forward(model, tokens, edge=None, delta=None, alpha=None):
    """Logits and every source's output, with edge ``(src, dst)`` moved by ``alpha[b] * delta[b]``."""
    H = model.cfg.n_heads
    dh = model.cfg.d_model // H

    def params(name):
        return dict(model.get_submodule(name).original_component.named_parameters())

    def extra(dst):
        if edge is not None and edge[1] == dst:
            return alpha[:, None, None] * delta
        return 0.0

    B, S = tokens.shape
    x = params("embed")["weight"][tokens] + params("pos_embed")["weight"][torch.arange(S)]
    outs = {"input": x}
    resid = x
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    for layer in range(model.cfg.n_layers):
        ln1 = model.blocks[layer].ln1.original_component
        a = params(f"blocks.{layer}.attn")
        proj = {}
        for c in "qkv":
            w, b = a[f"{c}._original_component.weight"], a[f"{c}._original_component.bias"]
            proj[c] = [F.linear(ln1(resid + extra(f"a{layer}.h{h}<{c}>")), w, b)[..., h * dh:(h + 1) * dh]
                       for h in range(H)]
        w_o = a["o._original_component.weight"]
        attn_out = a["o._original_component.bias"]
        for h in range(H):
            scores = proj["q"][h] @ proj["k"][h].transpose(-1, -2) / dh**0.5
            pattern = scores.masked_fill(causal, float("-inf")).softmax(-1)
            out = (pattern @ proj["v"][h]) @ w_o[:, h * dh:(h + 1) * dh].T
            outs[f"a{layer}.h{h}"] = out
            attn_out = attn_out + out
        resid = resid + attn_out
        m = params(f"blocks.{layer}.mlp")
        hidden = model.blocks[layer].ln2.original_component(resid + extra(f"m{layer}"))
        mlp_out = F.linear(F.gelu(F.linear(hidden, m["fc_in._original_component.weight"],
                                           m["fc_in._original_component.bias"])),
                           m["fc_out._original_component.weight"], m["fc_out._original_component.bias"])
        outs[f"m{layer}"] = mlp_out
        resid = resid + mlp_out
    final = model.ln_final.original_component(resid + extra("logits"))
    return F.linear(final, params("unembed")["weight"]), outs


EDGES = ["input->a0.h1<k>", "input->a1.h0<v>", "a0.h0->a1.h1<q>", "a0.h1->m0", "m0->a1.h0<v>",
         "a1.h1->logits", "m1->logits", "a0.h0->logits"]


def test_manual_forward_matches_the_bridge(model, batch):
    clean, _, _ = batch
    with torch.no_grad():
        assert torch.allclose(manual_forward(model, clean)[0], model(clean), atol=1e-4)


def test_rewired_forward_is_exact_and_full_ablation_is_the_corrupted_run(model, batch):
    clean, corrupted, _ = batch
    check_rewired_forward(model, clean, corrupted)


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_eap_scores_equal_autograd_derivative_of_manually_rewired_forward(model, batch, mode):
    clean, corrupted, metric = batch
    scores = edge_attribution(model, clean, corrupted, metric, method="eap", mode=mode, progress=False)
    graph = scores.graph
    with torch.no_grad():
        _, out_clean = manual_forward(model, clean)
        _, out_corr = manual_forward(model, corrupted)
    base = clean if mode == "noise" else corrupted
    for edge in EDGES:
        src, dst = edge.split("->")
        alpha = torch.zeros(clean.shape[0], requires_grad=True)
        logits, _ = manual_forward(model, base, (src, dst), out_clean[src] - out_corr[src], alpha)
        (expected,) = torch.autograd.grad(metric(logits).sum(), alpha)
        i, j = graph.edge_position(edge)
        assert torch.allclose(scores.per_example[:, i, j], expected, rtol=1e-3, atol=1e-4), edge
        assert scores.score(edge) == pytest.approx(float(expected.mean()), rel=1e-3, abs=1e-4)


def test_patching_one_edge_equals_the_manual_forward_with_that_edge_moved(model, batch):
    clean, corrupted, metric = batch
    graph = Graph.from_model(model)
    ref = reference_activations(model, graph, corrupted, "patching")
    with torch.no_grad():
        _, out_clean = manual_forward(model, clean)
        _, out_corr = manual_forward(model, corrupted)
        for edge in EDGES:
            src, dst = edge.split("->")
            expected, _ = manual_forward(model, clean, (src, dst), out_clean[src] - out_corr[src],
                                         -torch.ones(clean.shape[0]))
            with rewired(model, graph, ablate=graph.mask_of([edge]), reference=ref):
                got = model(clean)
            assert torch.allclose(got, expected, atol=1e-4), edge


def test_eap_ig_with_many_steps_is_complete_and_with_one_step_is_eap(model, batch):
    clean, corrupted, metric = batch
    ig = edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=100, progress=False)
    total = ig.clean_metric - ig.corrupted_metric
    out_of_input = ig.per_example[:, 0].sum(-1)  # every edge leaving the embeddings
    assert torch.allclose(out_of_input, total, rtol=0.03, atol=0.03 * float(total.abs().max()))
    one = edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=1, progress=False)
    eap = edge_attribution(model, clean, corrupted, metric, method="eap", mode="noise", progress=False)
    assert torch.allclose(one.scores, eap.scores, atol=1e-5)  # one step: the gradient at the clean run
    assert one.steps == 1 and one.mode is None and eap.mode == "noise" and eap.steps is None
    # the default mode is "denoise" (as in patching): the gradient at the corrupted run
    assert edge_attribution(model, clean, corrupted, metric, method="eap", progress=False).mode == "denoise"


def test_edge_scores_frame_plot_save_load(model, batch, tmp_path):
    clean, corrupted, metric = batch
    s = edge_attribution(model, clean, corrupted, metric, method="eap", progress=False)
    frame = s.to_frame()
    assert len(frame) == s.graph.n_edges
    assert {"edge", "src", "dst", "channel", "kind", "score"} <= set(frame.columns)
    per = s.to_frame(per_example=True)
    assert len(per) == s.graph.n_edges * clean.shape[0]
    assert per.groupby("edge", sort=False)["score"].mean().to_numpy() == pytest.approx(frame["score"].to_numpy(),
                                                                                        abs=1e-5)
    assert s.plot().data
    s.save(tmp_path / "scores.safetensors")
    again = type(s).load(tmp_path / "scores.safetensors")
    assert torch.equal(again.scores, s.scores) and torch.equal(again.per_example, s.per_example)
    assert (again.graph, again.method, again.mode, again.steps) == (s.graph, "eap", "denoise", None)
