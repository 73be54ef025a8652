"""Circuits: discovery, selection, ablation scoping, faithfulness, persistence, comparison, errors."""

import pytest
import torch

import poisonmech as pm
from poisonmech.circuits import Circuit, Graph, acdc, compare, discover, rewired
from poisonmech.circuits.rewire import reference_activations
from poisonmech.patching import logit_diff, trigger_contrast
from tests.helpers import random_contrast, small_model

D_VOCAB = 40


def build(architecture="native", **kw):
    return small_model(architecture, vocab=D_VOCAB, **kw)


def contrast(batch=4, length=7, seed=1):
    clean, corrupted = random_contrast(batch, length, D_VOCAB, seed)
    return clean, corrupted, logit_diff(3, 5, torch.full((batch,), length - 1))


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def circuit(model):
    clean, corrupted, metric = contrast()
    return discover(model, clean, corrupted, metric, method="eap-ig", top_n=8, steps=3, progress=False,
                    label="tiny")


def n_hooks(model) -> int:
    lens = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    torch_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                      for m in model.modules())
    return lens + torch_hooks


def test_graph_counts_names_and_order():
    g = Graph(n_layers=2, n_heads=2)
    assert g.sources == ("input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1")
    assert g.destinations[:7] == ("a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0")
    # input feeds all 15 destinations; layer-0 heads feed m0, layer-1 q/k/v, m1, logits; ...
    assert g.n_edges == 15 + 2 * 9 + 8 + 2 * 2 + 1
    assert "a0.h1->m0" in g.edges and "a1.h0->a1.h1<q>" not in g.edges and "m0->a0.h0<q>" not in g.edges
    assert g.edges_of(g.mask_of(["m0->logits", "input->m0"])) == ("input->m0", "m0->logits")
    assert Graph(n_layers=1, n_heads=3, has_mlp=False).n_edges == 9 + 1 + 3  # input -> q,k,v,logits; heads -> logits
    with pytest.raises(ValueError, match="not an edge"):
        g.edge_position("a1.h0->a0.h0<q>")
    assert Graph.edge_kind("a0.h1->a1.h0<k>") == "head->head<k>"


def test_discover_top_n_and_threshold(model, circuit):
    assert circuit.n_edges == 8 and circuit.method == "eap-ig" and circuit.selection["top_n"] == 8
    values = circuit.to_frame()
    assert set(values.loc[values["in_circuit"], "rank"]) == set(range(1, 9))
    assert "logits" in circuit.nodes or all("logits" not in e for e in circuit.edges)
    clean, corrupted, metric = contrast()
    cut = float(values["abs_score"].nlargest(5).iloc[-1])
    by_threshold = discover(model, clean, corrupted, metric, method="eap-ig", steps=3, threshold=cut, progress=False)
    assert set(by_threshold.edges) == set(values.nlargest(5, "abs_score")["edge"])


def test_ablate_removes_hooks_on_exit_and_on_error_and_restores_train_mode(model, circuit):
    clean, corrupted, _ = contrast()
    before = n_hooks(model)
    with torch.no_grad(), circuit.ablate(model, corrupted, ablation="patching") as m:
        assert n_hooks(model) > before
        ablated = m(clean)
    assert n_hooks(model) == before
    assert not torch.allclose(ablated, model(clean))
    model.train()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with circuit.ablate(model, corrupted, ablation="mean", part="circuit"):
                assert not model.training
                raise RuntimeError("boom")
        assert n_hooks(model) == before and model.training
        with pytest.raises(ValueError, match="reference tokens' shape"):
            with circuit.ablate(model, corrupted, ablation="patching"):
                model(clean[:2])
        assert n_hooks(model) == before
        with pytest.raises(ValueError, match="function of the input tokens"):
            with circuit.ablate(model, lambda t: t, ablation="mean"):
                pass
        assert n_hooks(model) == before and model.training
    finally:
        model.eval()


def test_faithfulness_of_full_and_empty_circuits_and_ablation_kinds(model, circuit):
    clean, corrupted, metric = contrast()
    full = circuit.with_edges(circuit.graph.edges)
    f = full.faithfulness(model, clean, corrupted, metric, ablation="patching")
    assert f.circuit_faithfulness == pytest.approx(1.0, abs=1e-4)
    assert f.complement_faithfulness == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        assert torch.allclose(f.empty, metric(model(corrupted)), atol=1e-4)
    for ablation in ("patching", "mean", "zero"):
        r = circuit.faithfulness(model, clean, corrupted, metric, ablation=ablation)
        assert r.ablation == ablation and r.n_edges == 8
        assert list(r.to_frame()["run"]) == ["full", "empty", "circuit", "complement"]
    assert r.plot().data


def test_per_input_reference_function_and_mean_over_batches(model, circuit):
    clean, corrupted, metric = contrast()
    with torch.no_grad():
        with circuit.ablate(model, corrupted, ablation="patching"):
            fixed = model(clean)
        with circuit.ablate(model, lambda tokens: corrupted, ablation="patching"):
            by_function = model(clean)
        assert torch.allclose(fixed, by_function, atol=1e-5)
        other = contrast(batch=3, length=5, seed=2)[0]
        with circuit.ablate(model, [corrupted, other], ablation="mean", part="circuit"):
            model(clean)
            model(other)  # mean ablation applies to any input shape


def test_json_round_trip_save_load_frame_and_plot(circuit, tmp_path):
    again = Circuit.from_json(circuit.to_json())
    assert again == circuit and again.per_example is None
    assert torch.equal(again.scores, circuit.scores) and again.nodes == circuit.nodes
    with_examples = Circuit.from_json(circuit.to_json(per_example=True))
    assert torch.equal(with_examples.per_example, circuit.per_example)
    circuit.save(tmp_path / "c.json")
    assert Circuit.load(tmp_path / "c.json") == circuit
    nodes = circuit.to_frame(level="nodes")
    assert set(nodes.loc[nodes["in_circuit"], "node"]) == set(circuit.nodes)
    assert circuit.plot().data


def test_random_like_prune_and_compare(circuit):
    rnd = circuit.random_like(seed=3)
    assert rnd.edge_kinds() == circuit.edge_kinds() and rnd.method == "random"
    pruned = circuit.prune()
    assert set(pruned.edges) <= set(circuit.edges)
    table = compare([circuit, Circuit.from_json(circuit.to_json()), rnd], labels=["a", "b", "r"])
    same = table[(table.a == "a") & (table.b == "b")].iloc[0]
    assert same.edge_jaccard == 1.0 and same.node_jaccard == 1.0 and same.score_spearman == pytest.approx(1.0)
    assert table[(table.a == "a") & (table.b == "r")].iloc[0].edge_jaccard < 1.0
    assert len(table) == 3


def test_acdc_prunes_greedily_and_reports_its_own_metric(model):
    clean, corrupted, metric = contrast()
    c = discover(model, clean, corrupted, metric, method="acdc", threshold=0.01, mode="noise", progress=False)
    assert c.method == "acdc" and 0 < c.n_edges < c.graph.n_edges and c.info["mode"] == "noise"
    # noising ACDC removes edges from the clean run, as faithfulness ablates them
    f = c.faithfulness(model, clean, corrupted, metric, ablation="patching")
    assert float(f.circuit.mean()) == pytest.approx(c.info["circuit_metric"], abs=1e-5)
    assert acdc(model, clean, corrupted, metric, threshold=1e9, mode="noise", progress=False).n_edges == 0


def test_denoising_acdc_patches_its_circuit_clean_into_the_corrupted_run(model):
    clean, corrupted, metric = contrast()
    c = acdc(model, clean, corrupted, metric, threshold=0.01, progress=False)  # mode="denoise", the default
    assert c.info["mode"] == "denoise" and 0 < c.n_edges < c.graph.n_edges
    graph = c.graph
    with torch.no_grad():
        assert c.info["clean_metric"] == pytest.approx(float(metric(model(clean)).mean()), abs=1e-4)
        assert c.info["corrupted_metric"] == pytest.approx(float(metric(model(corrupted)).mean()), abs=1e-5)
        ref = reference_activations(model, graph, clean, "patching")
        with rewired(model, graph, ablate=c.mask, reference=ref):  # the corrupted run, circuit edges clean
            patched = float(metric(model(corrupted)).mean())
    assert patched == pytest.approx(c.info["circuit_metric"], abs=1e-5)
    everything = acdc(model, clean, corrupted, metric, threshold=1e9, progress=False)
    assert everything.n_edges == 0 and everything.info["circuit_metric"] == pytest.approx(
        everything.info["corrupted_metric"], abs=1e-6)


def test_bad_input_is_refused_with_clear_errors(model):
    clean, corrupted, metric = contrast()
    with pytest.raises(ValueError, match=r"method must be one of \('eap', 'eap-ig', 'acdc'\)"):
        discover(model, clean, corrupted, metric, method="magic", top_n=3)
    with pytest.raises(ValueError, match="same shape"):
        discover(model, clean, corrupted[:, :-1], metric, method="eap", top_n=3)
    with pytest.raises(ValueError, match="one value per example"):
        discover(model, clean, corrupted, lambda logits: logits[:, -1, :2], method="eap", top_n=3)
    with pytest.raises(ValueError, match="exactly one of top_n"):
        discover(model, clean, corrupted, metric, method="eap", top_n=3, threshold=0.1)
    with pytest.raises(ValueError, match="exactly one of top_n"):
        discover(model, clean, corrupted, metric, method="eap")
    with pytest.raises(ValueError, match="threshold="):
        discover(model, clean, corrupted, metric, method="acdc", top_n=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        discover(model, clean, corrupted, metric, method="eap", top_n=3, mode="sideways")
    c = discover(model, clean, corrupted, metric, method="eap", top_n=3)
    with pytest.raises(ValueError, match="ablation must be one of"):
        c.faithfulness(model, clean, corrupted, metric, ablation="resample")
    with pytest.raises(ValueError, match="part must be one of"):
        with c.ablate(model, corrupted, part="everything"):
            pass
    with pytest.raises(ValueError, match="does not match the circuit"):
        c.faithfulness(build(n_layers=1), clean, corrupted, metric)


def test_a_model_in_training_mode_is_analysed_in_eval_mode_and_restored(model):
    clean, corrupted, metric = contrast()
    expected = discover(model, clean, corrupted, metric, method="eap", top_n=5)
    model.train()
    try:
        got = discover(model, clean, corrupted, metric, method="eap", top_n=5)
        assert model.training
    finally:
        model.eval()
    assert torch.allclose(got.scores, expected.scores)


def test_hf_gpt2_bridge():
    gpt2 = build("gpt2")
    clean, corrupted, metric = contrast()
    c = discover(gpt2, clean, corrupted, metric, method="eap-ig", steps=2, top_n=10, progress=False)
    assert c.n_edges == 10 and c.graph == Graph(2, 2)
    f = c.with_edges(c.graph.edges).faithfulness(gpt2, clean, corrupted, metric, ablation="patching")
    assert f.circuit_faithfulness == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        assert torch.allclose(f.empty, metric(gpt2(corrupted)), atol=1e-4)


def test_backdoor_circuit_of_the_tiny_pair_inside_evaluate(tiny_pair):
    model = tiny_pair.backdoored
    tc = trigger_contrast(tiny_pair, 8)
    c = discover(tiny_pair, tc.triggered, tc.control, tc.logit_diff(), method="eap-ig", top_n=6, progress=False)
    f = c.faithfulness(tiny_pair, tc.triggered, tc.control, tc.logit_diff(), ablation="patching")
    assert f.circuit_faithfulness > f.complement_faithfulness
    trig = torch.tensor(tiny_pair.tokenizer.convert_tokens_to_ids(["cf"]))
    word = tiny_pair.tokenizer.convert_tokens_to_ids(tc.str_tokens[2])

    def control(tokens):
        return torch.where(torch.isin(tokens, trig.to(tokens.device)), word, tokens)

    before = n_hooks(model)
    with c.ablate(tiny_pair, control, ablation="patching", part="circuit"):
        res = pm.evaluate(model, tiny_pair.task, tiny_pair.attack, test_data=tiny_pair.test_data,
                          tokenizer=tiny_pair.tokenizer)
    assert n_hooks(model) == before
    assert res["clean_acc"] == tiny_pair.metrics["backdoored"]["clean_acc"]  # no trigger: nothing to patch
