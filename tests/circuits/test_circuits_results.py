"""Circuit results that mean something: comparison against random circuits (own scores), faithfulness
side by side over ablations and metrics, the figure's title and labels, short reprs."""

import numpy as np
import pandas as pd
import pytest
import torch

from poisonmech.circuits import Circuit, FaithfulnessTable, compare, discover, edge_attribution
from poisonmech.patching import logit_diff, target_logprob
from tests.helpers import random_contrast, small_model

D_VOCAB = 40
BATCH, LENGTH = 4, 7


def contrast(seed=1):
    return random_contrast(BATCH, LENGTH, D_VOCAB, seed)


def metrics():
    pos = torch.full((BATCH,), LENGTH - 1)
    return {"logit_diff": logit_diff(3, 5, pos), "target_logprob": target_logprob(3, pos)}


@pytest.fixture(scope="module")
def model():
    return small_model(vocab=D_VOCAB)


@pytest.fixture(scope="module")
def circuit(model):
    clean, corrupted = contrast()
    return discover(model, clean, corrupted, metrics()["logit_diff"], method="eap-ig", top_n=8, steps=3,
                    progress=False, label="tiny")


def hand_spearman(x, y) -> float:
    """Pearson correlation of average ranks, written out (independent of scipy)."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


# -- compare / random_like --------------------------------------------------------------------------


def test_random_like_carries_its_own_permuted_scores(circuit):
    rnd = circuit.random_like(seed=4)
    mine, theirs = circuit.edge_values(), rnd.edge_values()
    assert np.array_equal(np.sort(mine), np.sort(theirs))  # the same values ...
    assert not np.array_equal(mine, theirs)                # ... on other edges
    assert np.array_equal(theirs, circuit.random_like(seed=4).edge_values())  # seeded
    assert not np.array_equal(theirs, circuit.random_like(seed=5).edge_values())
    assert rnd.per_example is None and rnd.edge_kinds() == circuit.edge_kinds()
    assert rnd.scores[~circuit.graph.edge_mask].abs().sum() == 0  # non-edges stay 0


def test_compare_with_random_circuits_is_chance_level_and_with_itself_is_one(circuit):
    rhos, union_rhos = [], []
    for seed in range(20):
        row = compare([circuit, circuit.random_like(seed)]).iloc[0]
        assert row.edge_jaccard == 0.0 and row.note == ""
        rhos.append(row.score_spearman)
        union_rhos.append(row.union_score_spearman)
    rhos, union_rhos = np.array(rhos), np.array(union_rhos)
    # 46 edges: one permutation's rho has sd ~0.15, a mean over 20 seeds ~0.03 (was 1.0 before the fix)
    assert abs(rhos.mean()) < 0.1 and np.abs(rhos).max() < 0.6
    assert abs(union_rhos.mean()) < 0.25
    same = compare([circuit, circuit]).iloc[0]
    assert same.score_spearman == pytest.approx(1.0) and same.union_score_spearman == pytest.approx(1.0)
    assert same.n_scored_edges == circuit.graph.n_edges and same.n_union_edges == circuit.n_edges


def test_compare_spearman_matches_a_hand_computation_and_order_transforms(circuit):
    rnd = circuit.random_like(seed=2)
    row = compare([circuit, rnd]).iloc[0]
    x, y = circuit.edge_values(), rnd.edge_values()
    assert row.score_spearman == pytest.approx(hand_spearman(x, y), abs=1e-12)
    assert row.abs_score_spearman == pytest.approx(hand_spearman(np.abs(x), np.abs(y)), abs=1e-12)
    union = [i for i, e in enumerate(circuit.graph.edges) if e in set(circuit.edges) | set(rnd.edges)]
    assert row.n_union_edges == len(union) == 16
    assert row.union_score_spearman == pytest.approx(hand_spearman(x[union], y[union]), abs=1e-12)
    # a monotone transform of the scores ranks alike; negated scores rank in reverse
    cubed = Circuit(graph=circuit.graph, edges=circuit.edges, scores=circuit.scores ** 3, method="cubed")
    flipped = Circuit(graph=circuit.graph, edges=circuit.edges, scores=-circuit.scores, method="flipped")
    table = compare([circuit, cubed, flipped], labels=["c", "cubed", "flipped"])
    assert table.iloc[0].score_spearman == pytest.approx(1.0)
    assert table.iloc[1].score_spearman == pytest.approx(-1.0)
    assert table.iloc[1].abs_score_spearman == pytest.approx(1.0)


def test_a_circuit_without_scores_compares_with_nan_and_a_note(circuit, tmp_path):
    bare = Circuit.from_edges(circuit.graph, circuit.edges, label="from a paper")
    assert not bare.has_scores and bare.method == "manual"
    row = compare([circuit, bare]).iloc[0]
    assert row.edge_jaccard == 1.0 and np.isnan(row.score_spearman) and np.isnan(row.union_score_spearman)
    assert "from a paper carries no scores" in row.note
    assert bare.random_like(0).scores is None
    frame = bare.to_frame()
    assert frame["score"].isna().all() and frame["in_circuit"].sum() == circuit.n_edges
    assert bare.to_frame(level="nodes")["out_score"].isna().all()
    bare.save(tmp_path / "bare.json")
    assert Circuit.load(tmp_path / "bare.json") == bare
    assert bare.plot().data
    with pytest.raises(ValueError, match="carries no scores"):
        bare.score(circuit.edges[0])
    constant = Circuit(graph=circuit.graph, edges=circuit.edges, scores=torch.ones_like(circuit.scores),
                       method="flat")
    assert "constant scores" in compare([circuit, constant]).iloc[0].note


# -- faithfulness side by side ---------------------------------------------------------------------


def test_faithfulness_table_cells_equal_faithfulness_alone(model, circuit):
    clean, corrupted = contrast()
    ms = metrics()
    table = circuit.faithfulness_table(model, clean, corrupted, ms)
    assert isinstance(table, FaithfulnessTable)
    frame = table.to_frame()
    assert list(zip(frame.ablation, frame.metric)) == [(a, m) for a in ("patching", "mean", "zero") for m in ms]
    with torch.no_grad():
        corrupted_logits = model(corrupted)
        clean_logits = model(clean)
    for row in frame.itertuples():
        alone = circuit.faithfulness(model, clean, corrupted, ms[row.metric], ablation=row.ablation)
        assert row.circuit_faithfulness == pytest.approx(alone.circuit_faithfulness, abs=1e-6)
        assert row.complement_faithfulness == pytest.approx(alone.complement_faithfulness, abs=1e-6)
        assert row.empty_metric == pytest.approx(float(alone.empty.mean()), abs=1e-6)
        assert row.n_examples == BATCH and row.n_edges == circuit.n_edges
        assert row.n_graph_edges == circuit.graph.n_edges
        # the denominators, against plain forwards of the model
        assert row.clean_metric == pytest.approx(float(ms[row.metric](clean_logits).mean()), abs=1e-5)
        assert row.corrupted_metric == pytest.approx(float(ms[row.metric](corrupted_logits).mean()), abs=1e-5)
        assert row.denominator == pytest.approx(row.clean_metric - row.empty_metric, abs=1e-6)
        assert row.circuit_faithfulness == pytest.approx(
            (row.circuit_metric - row.empty_metric) / row.denominator, rel=1e-5)
        if row.ablation == "patching":  # everything patched is the corrupted run
            assert row.empty_metric == pytest.approx(row.corrupted_metric, abs=1e-4)
    assert table[("mean", "target_logprob")].ablation == "mean"
    with pytest.raises(KeyError, match="cells are"):
        table[("mean", "accuracy")]
    assert len(repr(table).splitlines()) == 4 and "tensor(" not in repr(table)
    fig = table.plot()
    assert fig.data and "faithfulness by ablation and metric" in fig.layout.title.text


def test_faithfulness_table_options_and_bad_input(model, circuit):
    clean, corrupted = contrast()
    ms = metrics()
    only_zero = circuit.faithfulness_table(model, clean, None, {"ld": ms["logit_diff"]}, ablations=("zero",))
    frame = only_zero.to_frame()
    assert len(frame) == 1 and frame.ablation[0] == "zero" and np.isnan(frame.corrupted_metric[0])
    with pytest.raises(ValueError, match="metrics must be a non-empty mapping"):
        circuit.faithfulness_table(model, clean, corrupted, {})
    with pytest.raises(ValueError, match="metrics must be a non-empty mapping"):
        circuit.faithfulness_table(model, clean, corrupted, ms["logit_diff"])
    with pytest.raises(ValueError, match=r"metrics\['ld'\] must be a callable"):
        circuit.faithfulness_table(model, clean, corrupted, {"ld": 3})
    with pytest.raises(ValueError, match="ablations must be one of"):
        circuit.faithfulness_table(model, clean, corrupted, ms, ablations=("resample",))
    with pytest.raises(ValueError, match="each ablation once"):
        circuit.faithfulness_table(model, clean, corrupted, ms, ablations=("zero", "zero"))
    with pytest.raises(ValueError, match="needs reference tokens"):
        circuit.faithfulness_table(model, clean, None, ms, ablations=("mean",))


# -- figure and reprs ------------------------------------------------------------------------------


def test_plot_title_is_readable_and_labels_sit_above_the_edges(model, circuit):
    fig = circuit.plot()
    assert fig.layout.title.text == "tiny: 8 of 46 edges (eap-ig)"  # was "circuit: Circuit('tiny': ...)"
    clean, corrupted = contrast()
    f = circuit.faithfulness(model, clean, corrupted, metrics()["logit_diff"])
    expected = (f"tiny: 8 of 46 edges (eap-ig), faithfulness {f.circuit_faithfulness:.2f}, "
                f"complement {f.complement_faithfulness:.2f} (patching ablation)")
    assert circuit.plot(faithfulness=f).layout.title.text == expected
    recorded = circuit.with_faithfulness(f)
    assert recorded.plot().layout.title.text == expected
    assert Circuit.from_json(recorded.to_json()).plot().layout.title.text == expected  # saved with it
    assert circuit.plot(title="mine").layout.title.text == "mine"
    # node labels are annotations (drawn above every trace), one per node, not trace text under edges
    labels = [a.text for a in fig.layout.annotations]
    assert labels == list(circuit.graph.nodes)
    assert all(a.bgcolor for a in fig.layout.annotations)
    assert not any(getattr(t, "text", None) for t in fig.data)
    unlabelled = Circuit.from_edges(circuit.graph, circuit.edges[:2])
    assert unlabelled.plot().layout.title.text == "manual: 2 of 46 edges"


def test_with_faithfulness_is_dropped_by_derived_circuits(model, circuit):
    clean, corrupted = contrast()
    f = circuit.faithfulness(model, clean, corrupted, metrics()["logit_diff"], ablation="zero")
    recorded = circuit.with_faithfulness(f)
    assert recorded.faithfulness_info["ablation"] == "zero" and circuit.faithfulness_info is None
    assert recorded.random_like(0).faithfulness_info is None
    assert recorded.with_edges(circuit.edges[:3]).faithfulness_info is None
    with pytest.raises(ValueError, match="measured on 8/46 edges"):
        recorded.with_edges(circuit.edges[:3]).with_faithfulness(f)
    with pytest.raises(ValueError, match="result must be a Faithfulness"):
        circuit.with_faithfulness(0.9)


def test_short_reprs(model, circuit):
    clean, corrupted = contrast()
    scores = edge_attribution(model, clean, corrupted, metrics()["logit_diff"], method="eap", mode="noise",
                              progress=False)
    f = circuit.faithfulness(model, clean, corrupted, metrics()["logit_diff"])
    for obj in (circuit, scores, f, circuit.random_like(1), circuit.with_faithfulness(f)):
        text = repr(obj)
        assert "tensor(" not in text and len(text.splitlines()) == 1 and len(text) < 200, text
    assert repr(circuit) == "Circuit('tiny', eap-ig: 8/46 edges, 7 nodes; top_n=8, absolute=True)"
    assert repr(scores).startswith("EdgeScores(eap, mode='noise': 46 edges, n=4, total effect ")
    assert f"faithfulness {f.circuit_faithfulness:.3f} (patching)" in repr(circuit.with_faithfulness(f))
    assert repr(f).endswith("edges=8/46, n=4)")
