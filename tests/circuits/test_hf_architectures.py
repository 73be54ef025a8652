"""Circuits on real Hugging Face architectures wrapped as TransformerBridge: GPT-2, GPT-NeoX
(parallel attention / MLP), Llama (RMSNorm, rotary, SwiGLU, no biases, grouped-query
attention: 4 query heads, 2 key/value heads) and Qwen2 (Llama with q/k/v biases).

The reference is the plain ``transformers`` module (a fresh copy with the same seed: no bridge,
no poisonmech code) run with PyTorch hooks on its own submodules: every destination's input
is moved there by hand (a head's slice of the q / k / v projection recomputed from the moved
residual stream, the MLP norm's input, the final norm's input), so one edge ``src->dst`` can be
moved by ``alpha * (out_clean(src) - out_corrupted(src))``. Its derivative in ``alpha`` at 0,
by autograd, is the EAP score of that edge; ``alpha = -1`` is exact patching of that edge alone.
"""

from __future__ import annotations

import re

import pytest
import torch

import poisonmech as pm
from poisonmech.circuits import Circuit, Graph, ablated, edge_attribution, rewired
from poisonmech.circuits.rewire import reference_activations
from poisonmech.patching import logit_diff
from tests.helpers import check_rewired_forward
from tests.hf_models import HF_ARCHS, hf_module

VOCAB = 60
N_HEADS, N_KV = 4, 2


@pytest.fixture(scope="module", params=HF_ARCHS)
def arch(request):
    return request.param


def spread(module, seed: int = 0):
    """Re-draw the weights at unit scale (matrices ~ N(0, 1/d_model), biases ~ N(0, 0.1), norm gains
    ~ 1 + N(0, 0.1)), seeded: at the configs' default 0.02 init a random tiny model's MLPs and
    late heads barely move the logits, so a wrong edge would hide under any tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (4.0 if "emb" in name or "wte" in name
                                                                                   or "wpe" in name else 1.0))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return module


def spread_module(arch: str, **kw):
    return spread(hf_module(arch, VOCAB, **kw))


@pytest.fixture(scope="module")
def bridge(arch):
    return pm.wrap_hf_model(spread_module(arch))


@pytest.fixture(scope="module")
def ref(arch):
    return Reference(arch, spread_module(arch))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(1, VOCAB, (3, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(1, VOCAB, (3,), generator=g)
    corrupted[:, 3] = torch.randint(1, VOCAB, (3,), generator=g)
    return clean, corrupted, logit_diff(3, 5, torch.full((3,), 5))


# ---- the reference: the HF module with hooks on its own submodules ---------------------------------
PARTS = {  # layers, ln1, ln2, projections (q, k, v or a joint one), attention output, MLP, final norm
    "gpt2": ("transformer.h", "ln_1", "ln_2", {"qkv": "attn.c_attn"}, "attn.c_proj", "mlp", "transformer.ln_f"),
    "neox": ("gpt_neox.layers", "input_layernorm", "post_attention_layernorm", {"qkv": "attention.query_key_value"},
             "attention.dense", "mlp", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "input_layernorm", "post_attention_layernorm",
              {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}, "self_attn.o_proj", "mlp",
              "model.norm"),
}
PARTS["qwen2"] = PARTS["llama"]


class Reference:
    """Forward of the plain HF module in which one destination's input is moved by a vector."""

    def __init__(self, arch: str, module):
        self.arch, self.m = arch, module
        cfg = module.config
        self.D = cfg.hidden_size
        self.H = cfg.num_attention_heads
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        self.dh = self.D // self.H
        layers, self.ln1, self.ln2, self.proj, self.o, self.mlp, final = PARTS[arch]
        self.layers = module.get_submodule(layers)
        self.final = module.get_submodule(final)

    def kv_name(self, layer: int, c: str, i: int) -> str:
        """Destination name of k / v input ``i`` (a head, or a key/value group under GQA)."""
        return f"a{layer}.g{i}<{c}>" if self.KV != self.H else f"a{layer}.h{i}<{c}>"

    def _slot(self, c: str, i: int) -> tuple[str, slice]:
        """Which projection module computes head (or group) ``i``'s ``c`` and where in its output."""
        dh, D = self.dh, self.D
        if self.arch == "gpt2":  # c_attn: [q | k | v], heads contiguous in each
            lo = {"q": 0, "k": D, "v": 2 * D}[c] + i * dh
            return "qkv", slice(lo, lo + dh)
        if self.arch == "neox":  # query_key_value: per head [q_h | k_h | v_h]
            lo = i * 3 * dh + {"q": 0, "k": dh, "v": 2 * dh}[c]
            return "qkv", slice(lo, lo + dh)
        return c, slice(i * dh, (i + 1) * dh)  # separate q_proj, k_proj (kv heads), v_proj

    def head_out(self, layer: int, z: torch.Tensor, h: int) -> torch.Tensor:
        o = self.layers[layer].get_submodule(self.o)
        zs = z[..., h * self.dh:(h + 1) * self.dh]
        w = o.weight
        return zs @ (w[h * self.dh:(h + 1) * self.dh] if self.arch == "gpt2" else w[:, h * self.dh:(h + 1) * self.dh].T)

    def b_O(self, layer: int):
        return self.layers[layer].get_submodule(self.o).bias

    def logits_of_resid(self, resid: torch.Tensor) -> torch.Tensor:
        """The unembedding of a final residual stream (final norm, then the output embedding)."""
        return self.m.get_output_embeddings()(self.final(resid))

    def run(self, tokens: torch.Tensor, dst: str | None = None, vec: torch.Tensor | None = None):
        """Logits and every source's output; with ``dst``, ``vec`` is added to that destination's input."""
        outs: dict[str, torch.Tensor] = {}
        resid_pre: dict[int, torch.Tensor] = {}
        self.inputs = {}  # what each node reads: "a{l}" (the heads' q / k / v), "m{l}", "logits"
        handles = []
        info = pm.circuits.graph.parse_name(dst) if dst is not None else None

        def first_input(args, kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def record(key):
            def hook(mod, args):
                self.inputs[key] = args[0]
            return hook

        def record_input(mod, args, kwargs):
            outs["input"] = first_input(args, kwargs)

        handles.append(self.layers[0].register_forward_pre_hook(record_input, with_kwargs=True))
        for layer, block in enumerate(self.layers):
            def pre_ln1(mod, args, layer=layer):
                resid_pre[layer] = self.inputs[f"a{layer}"] = args[0]
            handles.append(block.get_submodule(self.ln1).register_forward_pre_hook(pre_ln1))
            handles.append(block.get_submodule(self.ln2).register_forward_pre_hook(record(f"m{layer}")))

            def pre_o(mod, args, layer=layer):
                for h in range(self.H):
                    outs[f"a{layer}.h{h}"] = self.head_out(layer, args[0], h)
            handles.append(block.get_submodule(self.o).register_forward_pre_hook(pre_o))

            def post_mlp(mod, args, out, layer=layer):
                outs[f"m{layer}"] = out
            handles.append(block.get_submodule(self.mlp).register_forward_hook(post_mlp))

            if info is not None and info.kind == "head" and info.layer == layer:
                i = info.head if info.head is not None else info.group
                which, sl = self._slot(info.channel, i)
                proj = block.get_submodule(self.proj[which])
                ln1 = block.get_submodule(self.ln1)

                def moved_proj(mod, args, out, layer=layer, sl=sl, ln1=ln1):
                    rebuilt = mod.forward(ln1.forward(resid_pre[layer] + vec))  # .forward: no hooks
                    out = out.clone()
                    out[..., sl] = rebuilt[..., sl]
                    return out
                handles.append(proj.register_forward_hook(moved_proj))
            if info is not None and info.kind == "mlp" and info.layer == layer:
                handles.append(block.get_submodule(self.ln2).register_forward_pre_hook(
                    lambda mod, args: (args[0] + vec, *args[1:])))
        handles.append(self.final.register_forward_pre_hook(record("logits")))
        if info is not None and info.kind == "logits":
            handles.append(self.final.register_forward_pre_hook(lambda mod, args: (args[0] + vec, *args[1:])))
        try:
            logits = self.m(tokens).logits
        finally:
            for h in handles:
                h.remove()
        return logits, outs

    def edges(self) -> list[str]:
        """Edges of every kind to check (k / v inputs by the model's own granularity)."""
        kv = self.kv_name
        out = ["input->a0.h1<q>", f"input->{kv(0, 'k', 1)}", f"input->{kv(0, 'v', 0)}", "input->m0",
               f"a0.h0->{kv(1, 'v', 1)}", "a0.h2->a1.h3<q>", f"m0->{kv(1, 'k', 0)}", "m0->m1", "a0.h3->m1",
               "a1.h2->logits", "m1->logits", "input->logits"]
        if self.arch != "neox":
            out.append("a0.h1->m0")  # no such edge in a parallel block
        return out


def moved(ref: Reference, tokens, edge: str, delta: torch.Tensor, alpha: torch.Tensor):
    src, dst = edge.split("->")
    return ref.run(tokens, dst, alpha[:, None, None] * delta[src])[0]


def sources(ref: Reference, tokens):
    with torch.no_grad():
        return ref.run(tokens)[1]


# ---- the graph follows the architecture --------------------------------------------------------------
def test_graph_follows_the_architecture(arch, bridge):
    g = Graph.from_model(bridge)
    assert g.parallel == (arch == "neox")
    assert g.n_kv_heads == (N_KV if arch in ("llama", "qwen2") else None) and g.n_heads == N_HEADS
    if arch == "neox":  # the MLP reads the block's input: no edge from the layer's own heads
        assert not any(e.startswith("a0.") and e.endswith("->m0") for e in g.edges)
        assert "a0.h1->m1" in g.edges and "m0->a1.h0<q>" in g.edges and "input->m0" in g.edges
        with pytest.raises(ValueError, match="not an edge"):
            g.edge_position("a0.h1->m0")
    else:
        assert "a0.h1->m0" in g.edges
    if g.grouped:  # queries per head, keys and values per group of 2 query heads
        assert [d for d in g.destinations if d.startswith("a1.")] == [
            "a1.h0<q>", "a1.h1<q>", "a1.h2<q>", "a1.h3<q>", "a1.g0<k>", "a1.g1<k>", "a1.g0<v>", "a1.g1<v>"]
        assert g.dst_nodes("a1.g1<k>") == ("a1.h2", "a1.h3") and g.dst_nodes("a1.h1<q>") == ("a1.h1",)
        assert not any(re.fullmatch(r"a\d+\.h\d+<[kv]>", d) for d in g.destinations)
    n_dst_layer = N_HEADS + 2 * g.kv_heads + 1
    assert g.n_dst == 2 * n_dst_layer + 1 and g.n_src == 1 + 2 * (N_HEADS + 1)
    again = Graph.from_dict(g.to_dict())
    assert again == g and again.edges == g.edges
    assert ("n_kv_heads" in g.to_dict()) == g.grouped and ("parallel" in g.to_dict()) == g.parallel


def test_reference_forward_matches_the_bridge(bridge, ref, batch):
    clean, _, _ = batch
    with torch.no_grad():
        ours, _ = ref.run(clean)
        assert torch.allclose(ours, bridge(clean), atol=1e-5)
        # moving nothing (a zero vector) through every destination changes nothing
        for e in ref.edges():
            src, dst = e.split("->")
            assert torch.allclose(ref.run(clean, dst, torch.zeros(1, 1, ref.D))[0], ours, atol=1e-5), e


def test_sources_sum_to_the_residual_stream_and_match_the_reference(bridge, ref, batch):
    clean, _, _ = batch
    graph = Graph.from_model(bridge)
    acts, _ = pm.circuits.rewire.source_activations(bridge, graph, clean)
    outs = sources(ref, clean)
    for i, name in enumerate(graph.sources):
        assert torch.allclose(acts[:, :, i], outs[name], atol=1e-5), name
    # the final residual stream is the sources plus the attention output biases
    biases = sum((ref.b_O(l) for l in range(2) if ref.b_O(l) is not None), torch.zeros(ref.D))
    with torch.no_grad():
        assert torch.allclose(ref.logits_of_resid(acts.sum(2) + biases), bridge(clean), atol=1e-4)


# ---- rewired forwards ------------------------------------------------------------------------------
def test_rewired_forward_is_exact_and_full_ablation_is_the_corrupted_run(bridge, batch):
    clean, corrupted, _ = batch
    # one wrong edge (a0's heads into m0 in a parallel block, or a missing one) would break this
    check_rewired_forward(bridge, clean, corrupted)


def test_ablating_every_edge_into_a_destination_gives_its_corrupted_input(bridge, ref, batch):
    """The graph's incoming edges of each destination are exactly what it reads: ablating all of
    them must give the input it has in the corrupted run, by the reference (an extra edge, e.g.
    a layer's heads into its own MLP in a parallel block, or a missing one, breaks this)."""
    clean, corrupted, _ = batch
    graph = Graph.from_model(bridge)
    acts = reference_activations(bridge, graph, corrupted, "patching")
    with torch.no_grad():
        ref.run(clean)
        reads_clean = dict(ref.inputs)
        ref.run(corrupted)
        reads_corr = dict(ref.inputs)
        for j, dst in enumerate(graph.destinations):
            node = dst.split(".g")[0].split(".h")[0] if dst.startswith("a") else dst
            expected = ref.run(clean, dst, reads_corr[node] - reads_clean[node])[0]
            only = torch.zeros_like(graph.edge_mask)
            only[:, j] = graph.edge_mask[:, j]
            with rewired(bridge, graph, ablate=only, reference=acts):
                got = bridge(clean)
            assert torch.allclose(got, expected, atol=1e-4), dst


def test_patching_one_edge_equals_the_reference_with_that_edge_moved(bridge, ref, batch):
    clean, corrupted, _ = batch
    graph = Graph.from_model(bridge)
    acts = reference_activations(bridge, graph, corrupted, "patching")
    out_clean, out_corr = sources(ref, clean), sources(ref, corrupted)
    delta = {k: out_clean[k] - out_corr[k] for k in out_clean}
    worst = 0.0
    with torch.no_grad():
        for edge in ref.edges():
            expected = moved(ref, clean, edge, delta, -torch.ones(clean.shape[0]))
            with rewired(bridge, graph, ablate=graph.mask_of([edge]), reference=acts):
                got = bridge(clean)
            worst = max(worst, float((got - expected).abs().max()))
            assert torch.allclose(got, expected, atol=1e-4), edge
            assert not torch.allclose(expected, bridge(clean), atol=1e-6), f"{edge}: the edge changes nothing"
    print(f"max |patched logits - reference|: {worst:.2e}")


# ---- EAP / EAP-IG against autograd through the reference ---------------------------------------------
@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_eap_scores_equal_autograd_derivative_of_the_reference(bridge, ref, batch, mode):
    clean, corrupted, metric = batch
    scores = edge_attribution(bridge, clean, corrupted, metric, method="eap", mode=mode, progress=False)
    graph = scores.graph
    out_clean, out_corr = sources(ref, clean), sources(ref, corrupted)
    delta = {k: out_clean[k] - out_corr[k] for k in out_clean}
    base = clean if mode == "noise" else corrupted
    worst, scale = 0.0, float(scores.per_example.abs().max())
    for edge in ref.edges():
        alpha = torch.zeros(clean.shape[0], requires_grad=True)
        (expected,) = torch.autograd.grad(metric(moved(ref, base, edge, delta, alpha)).sum(), alpha)
        i, j = graph.edge_position(edge)
        worst = max(worst, float((scores.per_example[:, i, j] - expected).abs().max()))
        assert torch.allclose(scores.per_example[:, i, j], expected, rtol=1e-3, atol=1e-4 * scale), edge
    print(f"max |EAP - reference| ({mode}): {worst:.2e} (largest score {scale:.3g})")
    # node view: a node's out_score is the sum of its outgoing edges' scores
    nodes = scores.circuit(top_n=5).to_frame(level="nodes").set_index("node")
    assert nodes.loc["m0", "out_score"] == pytest.approx(float(scores.scores[graph.src_index["m0"]].sum()), abs=1e-5)


def test_eap_ig_is_complete(bridge, batch):
    clean, corrupted, metric = batch
    # every edge leaving the embeddings is a complete cut: their scores add up to the total effect
    # as steps grow; the right Riemann sum's error is first order (measured: 1.3-2.5% of the largest
    # effect at 40 steps, twice that at 20), so two step counts extrapolate (Richardson) to the limit
    sums = {}
    for steps in (10, 20):
        ig = edge_attribution(bridge, clean, corrupted, metric, method="eap-ig", steps=steps, progress=False)
        sums[steps] = ig.per_example[:, 0].sum(-1)
    total = ig.clean_metric - ig.corrupted_metric
    scale = float(total.abs().max())
    assert float((sums[20] - total).abs().max()) <= 0.07 * scale
    limit = 2 * sums[20] - sums[10]
    print(f"EAP-IG completeness: 20 steps {float((sums[20] - total).abs().max()) / scale:.2%}, "
          f"extrapolated {float((limit - total).abs().max()) / scale:.3%} of the largest effect")
    assert float((limit - total).abs().max()) <= 0.005 * scale


# ---- discover, faithfulness, ablation, ACDC, compare ---------------------------------------------------
@pytest.fixture(scope="module")
def found(bridge, batch):
    """One circuit per method (discovered once per architecture: ACDC runs a forward per edge)."""
    clean, corrupted, metric = batch
    out = {m: pm.circuits.discover(bridge, clean, corrupted, metric, method=m, top_n=12, progress=False, label=m)
           for m in ("eap", "eap-ig")}
    out["acdc-noise"] = pm.circuits.discover(bridge, clean, corrupted, metric, method="acdc", threshold=0.1,
                                             mode="noise", progress=False, label="acdc-noise")
    return out


@pytest.fixture(scope="module")
def small(arch):
    """The same architecture with 2 query heads (and 1 key/value head under GQA): denoising ACDC
    tries every edge, one forward each."""
    return pm.wrap_hf_model(spread_module(arch, n_heads=2, n_kv_heads=1))


def test_discover_runs_with_every_method(bridge, batch, found):
    clean, corrupted, metric = batch
    assert {c.method for c in found.values()} == set(pm.circuits.METHODS)
    for name, c in found.items():
        assert c.graph == Graph.from_model(bridge), name
        assert set(c.edges) <= set(c.graph.edges) and (c.method == "acdc" or c.n_edges == 12), name
        f = c.faithfulness(bridge, clean, corrupted, metric)
        assert torch.isfinite(f.circuit).all() and torch.isfinite(f.complement).all(), name
        assert c.plot().data and len(c.to_frame(level="nodes")) == len(c.graph.nodes), name
        assert set(c.prune().edges) <= set(c.edges), name
        assert Circuit.from_json(c.to_json()) == c, name
    c = found["eap-ig"]
    table = c.faithfulness_table(bridge, clean, corrupted, {"metric": metric})
    for ablation in table.ablations:
        one = c.faithfulness(bridge, clean, corrupted, metric, ablation=ablation)
        assert torch.allclose(table[(ablation, "metric")].circuit, one.circuit, atol=1e-6), ablation


def test_faithfulness_of_the_full_and_the_empty_graph(bridge, ref, batch):
    clean, corrupted, metric = batch
    graph = Graph.from_model(bridge)
    full, empty = Circuit.from_edges(graph, graph.edges), Circuit.from_edges(graph, [])
    with torch.no_grad():
        m_clean = metric(ref.run(clean)[0])
        m_corr = metric(ref.run(corrupted)[0])
        outs = ref.run(corrupted)[1]
    # with every edge ablated each input is what the ablated sources carry plus the output biases
    biases = sum((ref.b_O(l) for l in range(2) if ref.b_O(l) is not None), torch.zeros(ref.D))
    mean_in = sum(outs[n].mean(dim=(0, 1)) for n in graph.sources) + biases
    with torch.no_grad():
        fully_ablated = {"patching": m_corr,
                         "zero": metric(ref.logits_of_resid(biases.expand(*clean.shape, -1))),
                         "mean": metric(ref.logits_of_resid(mean_in.expand(*clean.shape, -1)))}
    for ablation, expected_empty in fully_ablated.items():
        f_full = full.faithfulness(bridge, clean, corrupted, metric, ablation=ablation)
        f_empty = empty.faithfulness(bridge, clean, corrupted, metric, ablation=ablation)
        assert torch.allclose(f_full.full, m_clean, atol=1e-5) and torch.allclose(f_full.circuit, m_clean, atol=1e-5)
        assert f_full.circuit_faithfulness == pytest.approx(1.0, abs=1e-4), ablation
        assert torch.allclose(f_empty.circuit, expected_empty, atol=1e-4), ablation
        assert torch.allclose(f_empty.empty, expected_empty, atol=1e-4), ablation
        assert f_empty.circuit_faithfulness == pytest.approx(0.0, abs=1e-4), ablation
        assert f_empty.complement_faithfulness == pytest.approx(1.0, abs=1e-4), ablation


def _hooks_attached(model) -> int:
    return (sum(len(hp._forward_hooks) + len(hp._forward_pre_hooks) for hp in model.hook_dict.values())
            + len(model._forward_pre_hooks) + len(model._forward_hooks))


def test_ablate_context_manager_matches_faithfulness_and_restores_the_model(bridge, batch):
    clean, corrupted, metric = batch
    c = pm.circuits.discover(bridge, clean, corrupted, metric, method="eap", top_n=10, progress=False)
    f = c.faithfulness(bridge, clean, corrupted, metric)
    with torch.no_grad():
        before = bridge(clean).clone()
    state = {k: v.clone() for k, v in bridge.state_dict().items()}
    bridge.train()
    try:
        with torch.no_grad():
            with c.ablate(bridge, corrupted, part="complement") as m:
                assert not m.training
                assert torch.allclose(metric(m(clean)), f.circuit, atol=1e-5)
            with c.ablate(bridge, corrupted, part="circuit") as m:
                assert torch.allclose(metric(m(clean)), f.complement, atol=1e-5)
            # patching inside evaluate-like loops: the reference made from each input batch
            with c.ablate(bridge, lambda t: corrupted[: len(t)], part="complement") as m:
                assert torch.allclose(metric(m(clean)), f.circuit, atol=1e-5)
            with c.ablate(bridge, [corrupted, corrupted[:2, :4]], ablation="mean"):
                assert torch.isfinite(bridge(clean[:2, :5])).all()  # mean ablation: any input shape
            with pytest.raises(RuntimeError, match="boom"), c.ablate(bridge, ablation="zero"):
                raise RuntimeError("boom")
        assert bridge.training
    finally:
        bridge.eval()
    assert _hooks_attached(bridge) == 0
    with torch.no_grad():
        assert torch.equal(bridge(clean), before)
    assert all(torch.equal(v, state[k]) for k, v in bridge.state_dict().items())


@pytest.mark.parametrize("mode", ["noise", "denoise"])
def test_acdc_first_decision_and_circuit_metric(bridge, small, ref, batch, found, mode):
    clean, corrupted, metric = batch
    if mode == "noise":
        c = found["acdc-noise"]
    else:
        bridge = small
        c = pm.circuits.acdc(bridge, clean, corrupted, metric, threshold=0.05, mode=mode, progress=False)
        assert c.graph == Graph.from_model(small) and c.info["n_forwards"] == c.graph.n_edges + 2
    assert c.info["mode"] == mode
    if mode == "noise":
        # the first edge tried is the latest source into the logits; its score is the metric
        # change of patching that edge alone, by the reference
        out_clean, out_corr = sources(ref, clean), sources(ref, corrupted)
        delta = {k: out_clean[k] - out_corr[k] for k in out_clean}
        with torch.no_grad():
            one = float(metric(moved(ref, clean, "m1->logits", delta, -torch.ones(3))).mean())
            full = float(metric(ref.run(clean)[0]).mean())
        assert c.score("m1->logits") == pytest.approx(full - one, abs=1e-4)
        f = c.faithfulness(bridge, clean, corrupted, metric)  # the clean run, outside edges corrupted
        assert c.info["circuit_metric"] == pytest.approx(float(f.circuit.mean()), abs=1e-4)
    else:
        # the corrupted run with the circuit's edges patched to their clean values
        with torch.no_grad(), ablated(bridge, clean, circuit=c, part="circuit") as m:
            value = float(metric(m(corrupted)).mean())
        assert c.info["circuit_metric"] == pytest.approx(value, abs=1e-4)
    with torch.no_grad():
        assert c.info["clean_metric"] == pytest.approx(float(metric(bridge(clean)).mean()), abs=1e-4)


def test_compare_across_methods(found):
    cs = list(found.values())
    table = pm.circuits.compare(cs).to_frame()
    assert len(table) == len(cs) * (len(cs) - 1) // 2 and table["edge_jaccard"].between(0, 1).all()
    same = pm.circuits.compare([cs[0], cs[0].with_edges(cs[0].edges, label="copy")]).to_frame()
    assert same["edge_jaccard"].iloc[0] == 1.0 and same["node_jaccard"].iloc[0] == 1.0


def test_a_key_value_group_edge_reaches_exactly_the_heads_of_its_group(bridge, batch):
    clean, corrupted, _ = batch
    graph = Graph.from_model(bridge)
    kv = "a1.g1<k>" if graph.grouped else "a1.h1<k>"
    acts = reference_activations(bridge, graph, corrupted, "patching")
    patterns = []

    def keep(t, hook):
        patterns.append(t.detach().clone())

    with torch.no_grad():
        for ablate in (None, graph.mask_of([f"input->{kv}"])):
            with rewired(bridge, graph, ablate=ablate, reference=acts), \
                    bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", keep)]):
                bridge(clean)
    changed = (patterns[0] - patterns[1]).abs().amax(dim=(0, 2, 3)) > 1e-6  # per head
    heads = [int(n.split(".h")[1]) for n in graph.dst_nodes(kv)]
    assert changed.nonzero().flatten().tolist() == heads
    assert heads == ([2, 3] if graph.grouped else [1])


# ---- a graph that does not describe the model is refused, naming the architecture ---------------------
def test_a_graph_that_does_not_match_the_model_is_a_clear_error(arch, bridge, batch):
    clean, corrupted, metric = batch
    g = Graph.from_model(bridge)
    wrong_blocks = Graph(g.n_layers, g.n_heads, True, g.n_kv_heads, not g.parallel)
    name = type(bridge.original_model).__name__
    with pytest.raises(ValueError, match=rf"{name}'s MLP input differs.*parallel_attn_mlp"):
        edge_attribution(bridge, clean, corrupted, metric, method="eap", graph=wrong_blocks, progress=False)
    wrong_kv = Graph(g.n_layers, g.n_heads, True, 1 if g.grouped else 2, g.parallel)
    with pytest.raises(ValueError, match=rf"{name}'s W_K has \d heads per layer, the graph \d k-inputs"):
        edge_attribution(bridge, clean, corrupted, metric, method="eap", graph=wrong_kv, progress=False)
