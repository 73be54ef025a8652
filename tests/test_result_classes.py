"""Every result class: save / load round trip (the format checked), a tidy DataFrame and a
plotly figure. ``result_classes()`` finds every ``Result`` subclass the packages export; the
test fails when one has no builder here."""

from __future__ import annotations

import inspect

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import poisonmech as pm
from poisonmech.results import Result, ResultFormatError, write_result

PACKAGES = (pm.patching, pm.circuits, pm.probes, pm.influence, pm.sweeps, pm.defenses)


def result_classes() -> set[str]:
    out = set()
    for mod in PACKAGES:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) and issubclass(obj, Result) and obj is not Result:
                out.add(name)
    return out


@pytest.fixture(scope="module")
def built(tiny_pair, tmp_path_factory):
    """One of each result, from the tiny pair (the sweep is synthetic: no training)."""
    pair = tiny_pair
    tc = pm.patching.trigger_contrast(pair, 4, check=False)
    metric = tc.logit_diff()
    c = pm.circuits.discover(pair, tc.triggered, tc.control, metric, top_n=3, progress=False)
    c2 = pm.circuits.discover(pair, tc.triggered, tc.control, metric, method="eap", top_n=3, progress=False)
    faith = c.faithfulness(pair, tc.triggered, tc.control, metric)
    probe = pm.probes.probe_layers(pair, n_random=3, progress=False)
    inf = pm.influence.attribute(pair, method="graddot", progress=False)
    retrains = pm.influence.subset_retrains(pair, n_subsets=3, cache=False, progress=False)
    from tests.sweeps.test_sweep_result import _sweep

    return {
        "PatchResult": pm.patching.activation_patch(pair, tc.triggered, tc.control, metric, site="attn_head",
                                                    progress=False),
        "Circuit": c,
        "EdgeScores": pm.circuits.edge_attribution(pair, tc.triggered, tc.control, metric, progress=False),
        "Faithfulness": faith,
        "FaithfulnessTable": c.faithfulness_table(pair, tc.triggered, tc.control, {"ld": metric}),
        "CircuitComparison": pm.circuits.compare([c, c2], labels=["eap-ig", "eap"]),
        "ProbeResult": probe,
        "ProbeComparison": pm.probes.probe_twins(pair, n_random=3, progress=False),
        "TransferResult": pm.probes.probe_transfer(pair, test_twin="clean", n_random=2, progress=False),
        "DetectionResult": pm.probes.detect_poison(pair, method="spectral", progress=False),
        "CausalCheck": pm.probes.causal_check(pair, probe.best_layer, probe.direction()),
        "InfluenceResult": inf,
        "SubsetRetrains": retrains,
        "LDSResult": pm.influence.linear_datamodeling_score(retrains, inf, n_bootstrap=3),
        "RetrainResult": pm.influence.retrain_without(pair, list(pair.train_data["example_id"][:2]), cache=False,
                                                      progress=False),
        "Sweep": _sweep(tmp_path_factory.mktemp("sweep")),
        "DefenseBenchmark": pm.defenses.benchmark(pair, ["loss", "strip"], n_clean=20, progress=False, cache=False),
    }


def test_every_result_class_has_a_builder(built):
    assert result_classes() == set(built), f"no builder for {sorted(result_classes() - set(built))}"


@pytest.mark.parametrize("name", sorted(result_classes()))
def test_round_trip_frame_and_figure(name, built, tmp_path):
    r = built[name]
    cls = type(r)
    frame = r.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    assert isinstance(r.plot(), go.Figure)
    suffix = ".json" if name in ("Circuit", "CircuitComparison", "CausalCheck", "Sweep", "RetrainResult",
                                 "LDSResult", "SubsetRetrains", "DefenseBenchmark") else ".safetensors"
    path = tmp_path / f"r{suffix}"
    r.save(path)
    back = cls.load(path)
    assert type(back) is cls
    pd.testing.assert_frame_equal(back.to_frame().reset_index(drop=True), frame.reset_index(drop=True),
                                  check_exact=False, rtol=1e-6, atol=1e-8)
    # a file of another kind is refused by name
    other = write_result(tmp_path / f"other{suffix}", "not_a_result", 1, {"x": 1},
                         {"t": torch.zeros(1)} if suffix == ".safetensors" else None)
    with pytest.raises((ResultFormatError, ValueError), match="not_a_result|not a|holds"):
        cls.load(other)
