"""The calling convention, checked for every public analysis of patching, circuits, probes
and influence: each takes a Pair, a pipeline stage, a run directory and a bare model in the
first position, with the same keyword meanings.

A run gives an analysis its own data where the analysis defaults to it; a bare model gets the
same data passed explicitly, and must then give the same numbers as its run. Analyses that need
two models (patching between the twins, probing both) or a run's task and training recipe
(retraining) refuse a bare model with an error naming what is missing.

``public_analyses()`` finds every public function whose first parameter is ``subject``; the
test fails when one is missing from ``CALLS``, so a new analysis is checked from the start.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
import torch

import poisonmech as pm
from poisonmech.influence import backdoor_query

AREAS = (pm.patching, pm.circuits, pm.probes, pm.influence)


def public_analyses() -> set[str]:
    out = set()
    for mod in AREAS:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj) and not inspect.isclass(obj):
                params = list(inspect.signature(obj).parameters)
                if params and params[0] == "subject":
                    out.add(f"{mod.__name__.split('.')[-1]}.{name}")
    return out


@dataclass
class Data:
    """A run's data, passed explicitly to a bare model (and to runs where tokens are needed)."""

    run: Any  # the Pair the data come from
    clean: torch.Tensor
    corrupted: torch.Tensor
    metric: Any
    tok: Any
    test: Any
    train: Any
    direction: torch.Tensor
    circuit: Any
    near: Any  # test rows without the trigger (near misses vs the rest)
    trig: Any  # test rows that are not near misses (triggered vs the rest)

    @classmethod
    def of(cls, run) -> Data:
        tc = pm.patching.trigger_contrast(run, 4, check=False)
        metric = tc.logit_diff()
        g = torch.Generator().manual_seed(0)
        direction = torch.randn(run.backdoored.cfg.d_model, generator=g)
        circuit = pm.circuits.discover(run.backdoored, tc.triggered, tc.control, metric, top_n=3, progress=False)
        test = run.test_data
        return cls(run, tc.triggered, tc.control, metric, run.tokenizer, test, run.train_data,
                   direction / direction.norm(), circuit, test.filter(lambda r: not r["is_triggered"]),
                   test.filter(lambda r: not r["is_near_miss"]))

    def eval_on(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model(self.clean)


def _logits_under(cm, d: Data) -> torch.Tensor:
    with cm as model:
        return d.eval_on(model if isinstance(model, torch.nn.Module) else d.run.backdoored)


# name -> (call on a run subject, call on the bare model with explicit data | None when refused)
CALLS: dict[str, tuple] = {
    "patching.activation_patch": (
        lambda s, d: pm.patching.activation_patch(s, d.clean, d.corrupted, d.metric, site="resid_pre", progress=False),
        lambda m, d: pm.patching.activation_patch(m, d.clean, d.corrupted, d.metric, site="resid_pre", progress=False)),
    "patching.causal_trace": (
        lambda s, d: pm.patching.causal_trace(s, d.clean, (1, 2), samples=2, progress=False),
        lambda m, d: pm.patching.causal_trace(m, d.clean, (1, 2), samples=2, progress=False)),
    "patching.attribution_patch": (
        lambda s, d: pm.patching.attribution_patch(s, d.clean, d.corrupted, d.metric, site="attn_head"),
        lambda m, d: pm.patching.attribution_patch(m, d.clean, d.corrupted, d.metric, site="attn_head")),
    "patching.cross_model_patch": (
        lambda s, d: pm.patching.cross_model_patch(s, d.clean, d.metric, site="resid_pre", progress=False), None),
    "patching.trigger_contrast": (lambda s, d: pm.patching.trigger_contrast(s, 4, check=False).triggered, None),
    "patching.control_fn": (lambda s, d: pm.patching.control_fn(s)(d.clean), None),
    "patching.neutral_words": (lambda s, d: pm.patching.neutral_words(s), None),
    "circuits.discover": (
        lambda s, d: pm.circuits.discover(s, d.clean, d.corrupted, d.metric, method="eap-ig", top_n=3,
                                          progress=False).edges,
        lambda m, d: pm.circuits.discover(m, d.clean, d.corrupted, d.metric, method="eap-ig", top_n=3,
                                          progress=False).edges),
    "circuits.edge_attribution": (
        lambda s, d: pm.circuits.edge_attribution(s, d.clean, d.corrupted, d.metric, method="eap", progress=False).scores,
        lambda m, d: pm.circuits.edge_attribution(m, d.clean, d.corrupted, d.metric, method="eap", progress=False).scores),
    "circuits.acdc": (
        lambda s, d: pm.circuits.acdc(s, d.clean, d.corrupted, d.metric, threshold=0.05, progress=False).edges,
        lambda m, d: pm.circuits.acdc(m, d.clean, d.corrupted, d.metric, threshold=0.05, progress=False).edges),
    "circuits.faithfulness": (
        lambda s, d: pm.circuits.faithfulness(s, d.clean, d.corrupted, d.metric, circuit=d.circuit).to_frame(),
        lambda m, d: pm.circuits.faithfulness(m, d.clean, d.corrupted, d.metric, circuit=d.circuit).to_frame()),
    "circuits.faithfulness_table": (
        lambda s, d: pm.circuits.faithfulness_table(s, d.clean, d.corrupted, {"ld": d.metric},
                                                    circuit=d.circuit).to_frame(),
        lambda m, d: pm.circuits.faithfulness_table(m, d.clean, d.corrupted, {"ld": d.metric},
                                                    circuit=d.circuit).to_frame()),
    "circuits.ablated": (
        lambda s, d: _logits_under(pm.circuits.ablated(s, d.corrupted, circuit=d.circuit, part="circuit"), d),
        lambda m, d: _logits_under(pm.circuits.ablated(m, d.corrupted, circuit=d.circuit, part="circuit"), d)),
    "probes.probe_layers": (
        lambda s, d: pm.probes.probe_layers(s, label="is_triggered", n_random=3, progress=False).auroc,
        lambda m, d: pm.probes.probe_layers(m, d.test, "is_triggered", tokenizer=d.tok, n_random=3,
                                            progress=False).auroc),
    "probes.probe_twins": (lambda s, d: pm.probes.probe_twins(s, n_random=3, progress=False).to_frame(), None),
    "probes.probe_transfer": (
        lambda s, d: pm.probes.probe_transfer(s, d.near, "is_near_miss", test_data=d.trig, test_label="is_triggered",
                                              n_random=2, progress=False).auroc,
        lambda m, d: pm.probes.probe_transfer(m, d.near, "is_near_miss", test_data=d.trig, test_label="is_triggered",
                                              tokenizer=d.tok, n_random=2, progress=False).auroc),
    "probes.collect_activations": (
        lambda s, d: pm.probes.collect_activations(s, progress=False).acts,
        lambda m, d: pm.probes.collect_activations(m, d.test, tokenizer=d.tok, progress=False).acts),
    "probes.detect_poison": (
        lambda s, d: pm.probes.detect_poison(s, method="spectral", progress=False).scores,
        lambda m, d: pm.probes.detect_poison(m, d.train, "spectral", tokenizer=d.tok, progress=False).scores),
    "probes.detect_poison_methods": (
        lambda s, d: pm.probes.detect_poison_methods(s, methods=("spectral",), progress=False)["spectral"].scores,
        lambda m, d: pm.probes.detect_poison_methods(m, d.train, ("spectral",), tokenizer=d.tok,
                                                     progress=False)["spectral"].scores),
    "probes.causal_check": (
        lambda s, d: pm.probes.causal_check(s, 0, d.direction).to_frame(),
        lambda m, d: pm.probes.causal_check(m, 0, d.direction, task=d.run.task, attack=d.run.attack,
                                            test_data=d.test, tokenizer=d.tok).to_frame()),
    "probes.ablate_direction": (
        lambda s, d: _logits_under(pm.probes.ablate_direction(s, 0, d.direction), d),
        lambda m, d: _logits_under(pm.probes.ablate_direction(m, 0, d.direction), d)),
    "probes.steer": (
        lambda s, d: _logits_under(pm.probes.steer(s, 0, d.direction, 2.0), d),
        lambda m, d: _logits_under(pm.probes.steer(m, 0, d.direction, 2.0), d)),
    "influence.attribute": (
        lambda s, d: pm.influence.attribute(s, method="graddot", progress=False).scores,
        lambda m, d: pm.influence.attribute(m, d.train, backdoor_query(d.run), "graddot", tokenizer=d.tok,
                                            progress=False).scores),
    "influence.backdoor_query": (lambda s, d: backdoor_query(s).rows.to_pandas(), None),
    "influence.subset_retrains": (
        lambda s, d: pm.influence.subset_retrains(s, n_subsets=3, cache=False, progress=False).measurements, None),
    "influence.linear_datamodeling_score": (
        lambda s, d: pm.influence.linear_datamodeling_score(
            s, pm.influence.attribute(s, method="loss", progress=False), n_subsets=3, n_bootstrap=3, cache=False,
            progress=False).to_frame(), None),
    "influence.retrain_without": (
        lambda s, d: pm.influence.retrain_without(s, list(d.train["example_id"][:2]), cache=False,
                                                  progress=False).to_frame(), None),
    "influence.train_on_subset": (
        lambda s, d: pm.influence.train_on_subset(s, list(d.train["example_id"][:50]), progress=False).state_dict(),
        None),
}
#: analyses that retrain the twin from its run's recipe: a pipeline stage is refused (its
#: recipe is the pipeline's), as is a bare model
RETRAINS = {"influence.subset_retrains", "influence.linear_datamodeling_score", "influence.retrain_without",
            "influence.train_on_subset"}


def _plain(x):
    if hasattr(x, "to_frame") and not isinstance(x, pd.DataFrame):
        x = x.to_frame()  # a result: compared by its table
    if isinstance(x, pd.DataFrame):
        return x.reset_index(drop=True)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def assert_same(a, b) -> None:
    a, b = _plain(a), _plain(b)
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert a == b


def test_every_public_analysis_is_checked():
    found = public_analyses()
    assert found == set(CALLS), (f"analyses without a convention check: {sorted(found - set(CALLS))}; "
                                 f"checks of no public analysis: {sorted(set(CALLS) - found)}")


@pytest.fixture(scope="module")
def runs(tiny_pair, tiny_pipeline):
    stage = tiny_pipeline[0]
    return {"pair": (tiny_pair, Data.of(tiny_pair)), "stage": (stage, Data.of(stage))}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_subject_kind_in_the_first_position(name, runs):
    on_run, on_model = CALLS[name]
    pair, d = runs["pair"]
    first = on_run(pair, d)
    assert_same(on_run(str(pair.out_dir), d), first)  # a run directory is its Pair
    if on_model is None:
        with pytest.raises(ValueError, match=r"needs|pass"):
            on_run(pair.backdoored, d)
    else:
        assert_same(on_model(pair.backdoored, d), first)  # a bare model with the run's data
    stage, ds = runs["stage"]
    if name in RETRAINS:
        with pytest.raises(ValueError, match="not supported|pipeline"):
            on_run(stage, ds)
    else:
        got = on_run(stage, ds)
        if on_model is not None:
            assert_same(on_model(stage.backdoored, ds), got)
