"""The calling convention in the circuits: any subject first, one config per analysis, the
circuit as a keyword, ``mode`` as in patching, typed results that round-trip, and the old
graph-first forms kept with a deprecation warning."""

import json
import warnings

import pandas as pd
import pytest
import torch

import poisonmech as pm
from poisonmech.circuits import (
    Circuit,
    CircuitComparison,
    CircuitConfig,
    EdgeScores,
    Faithfulness,
    FaithfulnessConfig,
    FaithfulnessTable,
    ablated,
    acdc,
    compare,
    discover,
    edge_attribution,
    faithfulness,
    faithfulness_table,
)
from poisonmech.config import ConfigError
from poisonmech.patching import control_fn, logit_diff, target_logprob, trigger_contrast
from poisonmech.results import ResultFormatError
from poisonmech.storage import save_tensors, write_json
from tests.helpers import random_contrast, small_model

D_VOCAB = 40
BATCH, LENGTH = 4, 7


def contrast(seed=1):
    clean, corrupted = random_contrast(BATCH, LENGTH, D_VOCAB, seed)
    return clean, corrupted, logit_diff(3, 5, torch.full((BATCH,), LENGTH - 1))


@pytest.fixture(scope="module")
def model():
    return small_model(vocab=D_VOCAB)


@pytest.fixture(scope="module")
def circuit(model):
    clean, corrupted, metric = contrast()
    return discover(model, clean, corrupted, metric, top_n=8, steps=3, progress=False, label="tiny")


@pytest.fixture(scope="module")
def tc(tiny_pair):
    return trigger_contrast(tiny_pair, 8)


def same_circuit(a: Circuit, b: Circuit) -> bool:
    return a.edges == b.edges and torch.equal(a.scores, b.scores)


# -- subjects ---------------------------------------------------------------------------------------


def test_every_kind_of_subject_gives_the_same_circuit(tiny_pair, tc):
    data = (tc.triggered, tc.control, tc.logit_diff())
    kw = {"method": "eap-ig", "top_n": 5, "steps": 2, "progress": False}
    by_pair = discover(tiny_pair, *data, **kw)
    for subject in (str(tiny_pair.out_dir), tiny_pair.backdoored, pm.resolve(tiny_pair)):
        assert same_circuit(discover(subject, *data, **kw), by_pair), type(subject).__name__
    clean_twin = discover(tiny_pair, *data, twin="clean", **kw)
    assert same_circuit(clean_twin, discover(tiny_pair.clean, *data, **kw))
    assert not same_circuit(clean_twin, by_pair)
    # the other analyses take the same subjects
    scores = edge_attribution(str(tiny_pair.out_dir), *data, method="eap", progress=False)
    assert torch.equal(scores.scores, edge_attribution(tiny_pair.backdoored, *data, method="eap", progress=False).scores)
    f_dir = by_pair.faithfulness(str(tiny_pair.out_dir), *data)
    f_model = faithfulness(tiny_pair.backdoored, *data, circuit=by_pair)
    assert torch.equal(f_dir.circuit, f_model.circuit) and torch.equal(f_dir.empty, f_model.empty)
    with pytest.raises(ValueError, match="twin must be one of"):
        discover(tiny_pair, *data, twin="teacher", **kw)


def test_a_run_supplies_its_trigger_contrast_and_a_bare_model_must_be_given_data(tiny_pair, tc):
    by_default = discover(tiny_pair, top_n=5, steps=2, n_contrast=8, progress=False)
    explicit = discover(tiny_pair, tc.triggered, tc.control, tc.logit_diff(), top_n=5, steps=2, progress=False)
    assert same_circuit(by_default, explicit)
    table = by_default.faithfulness_table(tiny_pair, n_contrast=8, ablations=("patching",))
    assert table.metrics == ("logit_diff", "target_logprob")
    assert table[("patching", "logit_diff")].circuit_faithfulness == pytest.approx(
        by_default.faithfulness(tiny_pair, tc.triggered, tc.control, tc.logit_diff()).circuit_faithfulness)
    with pytest.raises(ValueError, match="not a run"):
        discover(tiny_pair.backdoored, top_n=5)
    with pytest.raises(ValueError, match="metric is required"):
        discover(tiny_pair, tc.triggered, tc.control, top_n=5)
    # with a run, patching ablation defaults to the run's control function (trigger swapped)
    model = tiny_pair.backdoored
    with torch.no_grad():
        with explicit.ablate(tiny_pair, part="circuit"):
            by_run = model(tc.triggered)
        with explicit.ablate(model, control_fn(tiny_pair), part="circuit"):
            by_hand = model(tc.triggered)
    assert torch.equal(by_run, by_hand)


# -- options ----------------------------------------------------------------------------------------


def test_config_and_keywords_are_one_thing(model):
    clean, corrupted, metric = contrast()
    cfg = CircuitConfig(method="eap", top_n=4, mode="noise", label="x")
    by_config = discover(model, clean, corrupted, metric, config=cfg)
    by_keywords = discover(model, clean, corrupted, metric, method="eap", top_n=4, mode="noise", label="x")
    assert by_config == by_keywords and by_config.info["mode"] == "noise"
    assert discover(model, clean, corrupted, metric, config=cfg.to_dict()) == by_config  # its dict too
    overridden = discover(model, clean, corrupted, metric, "eap", config=cfg, top_n=6)  # keywords override
    assert overridden.n_edges == 6 and overridden.label == "x"
    assert discover.config_class is CircuitConfig and faithfulness.config_class is FaithfulnessConfig
    f_cfg = faithfulness(model, clean, corrupted, metric, circuit=by_config, config=FaithfulnessConfig(ablation="mean"))
    f_kw = by_config.faithfulness(model, clean, corrupted, metric, ablation="mean")
    assert f_cfg.ablation == "mean" and torch.equal(f_cfg.circuit, f_kw.circuit)


def test_unknown_options_and_bad_values_name_the_field(model, circuit):
    clean, corrupted, metric = contrast()
    with pytest.raises(ConfigError, match=r"unknown option 'topn'.*top_n"):
        discover(model, clean, corrupted, metric, topn=3)
    with pytest.raises(ConfigError, match=r"CircuitConfig.steps must be an integer in \[1, inf\]"):
        discover(model, clean, corrupted, metric, top_n=3, steps=0)
    with pytest.raises(ConfigError, match=r"CircuitConfig.mode must be one of \('denoise', 'noise'\)"):
        edge_attribution(model, clean, corrupted, metric, mode="sideways")
    with pytest.raises(ConfigError, match=r"edge_attribution.method must be one of \('eap', 'eap-ig'\)"):
        edge_attribution(model, clean, corrupted, metric, method="acdc")
    with pytest.raises(ConfigError, match="unknown option 'ablation'"):
        acdc(model, clean, corrupted, metric, threshold=0.1, ablation="mean")
    with pytest.raises(ConfigError, match="unknown option 'mode'"):
        circuit.faithfulness(model, clean, corrupted, metric, mode="noise")  # faithfulness has no mode
    with pytest.raises(ValueError, match="needs circuit="):
        faithfulness(model, clean, corrupted, metric)
    with pytest.raises(ValueError, match="circuit= must be a Circuit or a"):
        faithfulness(model, clean, corrupted, metric, circuit=circuit.edges)
    with pytest.raises(TypeError, match="the subject must be one of"):
        discover(42, clean, corrupted, metric, top_n=3)


def test_mode_means_what_it_means_in_patching(model):
    """denoise: the corrupted run is the base; noise: the clean run (EAP's gradient point)."""
    clean, corrupted, metric = contrast()
    default = edge_attribution(model, clean, corrupted, metric, method="eap", progress=False)
    assert default.mode == "denoise"
    # denoising EAP is noising EAP with the two batches swapped and the metric negated:
    # (out_clean - out_corr) . dm/dx at the corrupted run
    noise = edge_attribution(model, clean, corrupted, metric, method="eap", mode="noise", progress=False)
    swapped = edge_attribution(model, corrupted, clean, lambda logits: -metric(logits), method="eap", mode="noise",
                               progress=False)
    assert torch.allclose(default.scores, swapped.scores, atol=1e-6)
    assert not torch.allclose(default.scores, noise.scores)
    assert edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=2, progress=False).mode is None


# -- results ----------------------------------------------------------------------------------------


def test_every_result_round_trips_and_gives_a_frame_and_a_figure(model, circuit, tmp_path):
    clean, corrupted, metric = contrast()
    ms = {"logit_diff": metric, "target_logprob": target_logprob(3, torch.full((BATCH,), LENGTH - 1))}
    results = {
        "f": circuit.faithfulness(model, clean, corrupted, metric, ablation="mean"),
        "t": circuit.faithfulness_table(model, clean, corrupted, ms),
        "t0": circuit.faithfulness_table(model, clean, None, ms, ablations=("zero",)),
        "cmp": compare([circuit, circuit.random_like(0), Circuit.from_edges(circuit.graph, circuit.edges[:3])]),
        "s": edge_attribution(model, clean, corrupted, metric, method="eap", progress=False),
        "c": circuit,
    }
    for name, r in results.items():
        path = r.save(tmp_path / f"{name}.result")
        again = type(r).load(path)
        pd.testing.assert_frame_equal(again.to_frame(), r.to_frame())
        assert isinstance(r.to_frame(), pd.DataFrame) and r.plot().data, name
    f = Faithfulness.load(tmp_path / "f.result")
    assert all(torch.equal(getattr(f, p), getattr(results["f"], p)) for p in ("full", "empty", "circuit", "complement"))
    t0 = FaithfulnessTable.load(tmp_path / "t0.result")
    assert t0.corrupted == {"logit_diff": None, "target_logprob": None} and t0.label == "tiny"
    assert repr(FaithfulnessTable.load(tmp_path / "t.result")) == repr(results["t"])
    cmp = CircuitComparison.load(tmp_path / "cmp.result")
    assert cmp.labels == results["cmp"].labels and cmp.frame.dtypes.equals(results["cmp"].frame.dtypes)
    assert cmp.plot("score_spearman").data and cmp.matrix().shape == (3, 3)


def test_a_file_of_another_kind_or_a_newer_version_is_refused(model, circuit, tmp_path):
    clean, corrupted, metric = contrast()
    f = circuit.faithfulness(model, clean, corrupted, metric)
    f.save(tmp_path / "f.safetensors")
    circuit.save(tmp_path / "c.json")
    compare([circuit, circuit]).save(tmp_path / "cmp.json")
    with pytest.raises(ResultFormatError, match="'faithfulness' result"):
        FaithfulnessTable.load(tmp_path / "f.safetensors")
    with pytest.raises(ResultFormatError, match="'faithfulness' result"):
        EdgeScores.load(tmp_path / "f.safetensors")
    with pytest.raises(ResultFormatError, match="'circuit' result"):
        CircuitComparison.load(tmp_path / "c.json")
    with pytest.raises(ResultFormatError, match="'circuit_comparison' result"):
        Circuit.load(tmp_path / "cmp.json")
    newer = json.loads((tmp_path / "c.json").read_text())
    newer["format"] = "poisonmech.circuit/2"
    (tmp_path / "c2.json").write_text(json.dumps(newer))
    with pytest.raises(ResultFormatError, match="newer poisonmech"):
        Circuit.load(tmp_path / "c2.json")
    with pytest.raises(ResultFormatError, match="newer poisonmech"):
        Circuit.from_json(json.dumps(newer))


def test_files_written_before_the_shared_result_layout_still_load(model, circuit, tmp_path):
    # the circuit JSON has not changed: a file written by the old Circuit.save (write_json of to_dict)
    write_json(tmp_path / "old.json", circuit.to_dict())
    assert Circuit.load(tmp_path / "old.json") == circuit
    # old edge-score files kept their settings JSON-encoded beside the format tag
    clean, corrupted, metric = contrast()
    s = edge_attribution(model, clean, corrupted, metric, method="eap", mode="noise", progress=False)
    save_tensors(tmp_path / "old.safetensors",
                 {"scores": s.scores, "clean_metric": s.clean_metric, "corrupted_metric": s.corrupted_metric,
                  "per_example": s.per_example},
                 metadata={"format": "poisonmech.edge_scores/1", "graph": json.dumps(s.graph.to_dict()),
                           "method": "eap", "mode": json.dumps("noise"), "steps": json.dumps(None)})
    old = EdgeScores.load(tmp_path / "old.safetensors")
    assert torch.equal(old.scores, s.scores) and (old.mode, old.steps, old.graph) == ("noise", None, s.graph)


def test_the_comparison_still_reads_like_the_frame_it_used_to_be(circuit):
    table = compare([circuit, circuit.random_like(1), circuit], labels=["a", "r", "b"])
    frame = table.to_frame()
    assert len(table) == 3 and list(table["edge_jaccard"]) == list(frame["edge_jaccard"])
    assert table[(table.a == "a") & (table.b == "b")].iloc[0].edge_jaccard == 1.0
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [("a", "r"), ("a", "b"), ("r", "b")]
    assert table.loc[0, "b"] == "r" and [row["a"] for _, row in table.iterrows()] == ["a", "a", "r"]
    assert list(table) == list(frame.columns)
    assert table.matrix().loc["a", "b"] == 1.0 and table.matrix().loc["b", "r"] == table.matrix().loc["r", "b"]


# -- the old forms ----------------------------------------------------------------------------------


def test_the_old_graph_first_faithfulness_warns_and_gives_the_same_numbers(model, circuit):
    clean, corrupted, metric = contrast()
    new = faithfulness(model, clean, corrupted, metric, circuit=circuit, ablation="zero")
    with pytest.warns(DeprecationWarning, match=r"faithfulness\(model, graph, circuit_edges"):
        old = faithfulness(model, circuit.graph, circuit.mask, clean, corrupted, metric, ablation="zero")
    assert all(torch.equal(getattr(old, p), getattr(new, p)) for p in ("full", "empty", "circuit", "complement"))
    by_names = faithfulness(model, clean, corrupted, metric, circuit=(circuit.graph, circuit.edges), ablation="zero")
    assert torch.equal(by_names.circuit, new.circuit)


def test_the_old_graph_first_faithfulness_table_warns_and_gives_the_same_numbers(model, circuit):
    clean, corrupted, metric = contrast()
    new = faithfulness_table(model, clean, corrupted, {"ld": metric}, circuit=(circuit.graph, circuit.mask))
    with pytest.warns(DeprecationWarning, match="faithfulness_table"):
        old = faithfulness_table(model, circuit.graph, circuit.mask, clean, corrupted, {"ld": metric})
    pd.testing.assert_frame_equal(old.to_frame(), new.to_frame())
    assert new.label is None and circuit.faithfulness_table(model, clean, corrupted, {"ld": metric}).label == "tiny"


def test_the_old_graph_first_ablated_warns_and_ablates_the_given_edges(model, circuit):
    clean, corrupted, _ = contrast()
    with torch.no_grad():
        with circuit.ablate(model, corrupted, part="circuit"):
            new = model(clean)
        with pytest.warns(DeprecationWarning, match="ablated"):
            with ablated(model, circuit.graph, circuit.mask, corrupted, ablation="patching"):
                old = model(clean)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with ablated(model, corrupted, circuit=circuit, part="circuit"):
                assert torch.equal(model(clean), new)
    assert torch.equal(old, new)
