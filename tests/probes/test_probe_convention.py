"""The calling convention in the probes package: every analysis takes any subject first (a Pair,
its run directory, a bare model with explicit data) and gives the same numbers; options are
one config (keywords or ``config=``); bad options name the field and what is allowed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import poisonmech.probes as pp
from poisonmech import sites
from poisonmech.config import ConfigError
from poisonmech.probes import (
    CausalCheck,
    CausalCheckConfig,
    DetectConfig,
    DetectionResult,
    ProbeComparison,
    ProbeConfig,
    ProbeResult,
    TransferResult,
)
from poisonmech.probes.result import LEGACY_FORMAT
from poisonmech.results import ResultFormatError
from poisonmech.storage import save_tensors, write_json
from poisonmech.train.pipeline import Between

FAST = {"n_random": 6, "progress": False}


def same_probe(a: ProbeResult, b: ProbeResult) -> None:
    for name in ("auroc", "accuracy", "random_auroc", "coef", "intercept", "train_index", "test_index",
                 "length_auroc"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True, msg=name)


def subjects(pair):
    """The same backdoored twin as a Pair, its run directory (a str) and a bare model."""
    return {"pair": pair, "run_dir": str(pair.out_dir), "model": pair.backdoored}


# ---- every analysis accepts every subject, with the same numbers --------------------------------
def test_probe_layers_any_subject(probe_pair):
    data = probe_pair.test_data
    ref = pp.probe_layers(probe_pair.backdoored, data, "is_triggered", tokenizer=probe_pair.tokenizer, **FAST)
    for kind, subject in subjects(probe_pair).items():
        r = pp.probe_layers(subject, data if kind == "model" else None, **FAST)
        same_probe(r, ref)
        assert r.name == ("model" if kind == "model" else "backdoored")
    clean = pp.probe_layers(probe_pair, twin="clean", **FAST)
    same_probe(clean, pp.probe_layers(probe_pair.clean, data, **FAST))
    assert clean.name == "clean"
    with pytest.raises(ValueError, match=r"twin must be one of \('backdoored', 'clean'\).*got 'poisoned'"):
        pp.probe_layers(probe_pair, twin="poisoned", **FAST)


def test_probe_twins_any_two_model_subject(probe_pair):
    ref = pp.probe_twins(probe_pair, **FAST)
    from_dir = pp.probe_twins(str(probe_pair.out_dir), **FAST)
    assert ref.names == from_dir.names == ("clean", "backdoored")
    for a, b in zip(ref.results, from_dir.results):
        same_probe(a, b)
    for role in ("clean", "backdoored"):
        same_probe(ref[role], pp.probe_layers(probe_pair.model(role), probe_pair.test_data, **FAST))
    # a before/after view: the same two models under their own role names
    between = Between(before=probe_pair.clean, after=probe_pair.backdoored, twin="backdoored", stage_before="a",
                      stage_after="b", index_before=0, index_after=1, stage_kind="sft", task=probe_pair.task,
                      attack=probe_pair.attack, tokenizer=probe_pair.tokenizer, train_data=probe_pair.train_data,
                      test_data=probe_pair.test_data, model_config=probe_pair.model_config,
                      train_config=probe_pair.train_config, metrics_before={}, metrics_after={})
    ba = pp.probe_twins(between, **FAST)
    assert ba.names == ("before", "after")
    same_probe(ba["before"], ref["clean"])
    same_probe(ba["after"], ref["backdoored"])
    with pytest.raises(ValueError, match="needs two models"):
        pp.probe_twins(probe_pair.backdoored, probe_pair.test_data, **FAST)


def test_probe_transfer_any_subject(probe_pair):
    data = probe_pair.test_data
    ref = pp.probe_transfer(probe_pair.backdoored, data, test_model=probe_pair.clean, **FAST)
    for subject in (probe_pair, str(probe_pair.out_dir)):
        t = pp.probe_transfer(subject, test_twin="clean", **FAST)
        same_probe(t.source, ref.source)
        same_probe(t.target, ref.target)
        assert (t.source.name, t.target.name) == ("backdoored", "clean")
    assert (ref.source.name, ref.target.name) == ("source", "target")
    with pytest.raises(ValueError, match="test_twin .* or test_model"):
        pp.probe_transfer(probe_pair, test_twin="clean", test_model=probe_pair.clean, **FAST)


@pytest.mark.parametrize("method", pp.DETECTORS)
def test_detect_poison_any_subject(probe_pair, method):
    kw = {"n_components": 3, "progress": False}
    ref = pp.detect_poison(probe_pair.backdoored, probe_pair.train_data, method, **kw)
    for kind, subject in subjects(probe_pair).items():
        d = pp.detect_poison(subject, probe_pair.train_data if kind == "model" else None, method=method, **kw)
        assert torch.equal(d.scores, ref.scores) and torch.equal(d.loss, ref.loss)
        many = pp.detect_poison_methods(subject, probe_pair.train_data if kind == "model" else None, **kw)
        assert torch.equal(many[method].scores, ref.scores)


def test_causal_check_any_subject(probe_pair):
    rows = probe_pair.test_data.select(range(24))
    d = torch.randn(probe_pair.backdoored.cfg.d_model, generator=torch.Generator().manual_seed(0))
    ref = pp.causal_check(probe_pair.backdoored, 0, d, task=probe_pair.task, attack=probe_pair.attack, test_data=rows,
                          tokenizer=probe_pair.tokenizer)
    for subject in (probe_pair, str(probe_pair.out_dir)):
        c = pp.causal_check(subject, 0, d, test_data=rows)
        assert c == ref
    with pytest.raises(ValueError, match=r"causal_check needs task.*pass task="):
        pp.causal_check(probe_pair.backdoored, 0, d)


def test_causal_check_old_form_warns_and_matches(probe_pair):
    rows = probe_pair.test_data.select(range(24))
    d = torch.randn(probe_pair.backdoored.cfg.d_model, generator=torch.Generator().manual_seed(1))
    new = pp.causal_check(probe_pair, 0, d, test_data=rows, intervention="steer", alpha=[1.5])
    with pytest.warns(DeprecationWarning, match=r"causal_check\(subject, layer, direction\)"):
        old = pp.causal_check(probe_pair.backdoored, probe_pair.task, probe_pair.attack, 0, d, test_data=rows,
                              tokenizer=probe_pair.tokenizer, intervention="steer", alpha=[1.5])
    assert old == new


def test_collect_and_interventions_any_subject(probe_pair):
    ref = pp.collect_activations(probe_pair.backdoored, probe_pair.test_data, progress=False)
    for subject in (probe_pair, str(probe_pair.out_dir)):
        a = pp.collect_activations(subject, progress=False)
        assert torch.equal(a.acts, ref.acts)
    with pytest.raises(ValueError, match=r"collect_activations needs test data.*pass dataset="):
        pp.collect_activations(probe_pair.backdoored)
    d = torch.ones(probe_pair.backdoored.cfg.d_model)
    with pp.ablate_direction(probe_pair, 0, d) as m:
        assert m is probe_pair.backdoored
    with pp.steer(probe_pair, 0, d, 1.0, twin="clean") as m:
        assert m is probe_pair.clean


def test_bare_model_needs_its_data(probe_pair):
    m = probe_pair.backdoored
    with pytest.raises(ValueError, match=r"probe_layers needs test data.*pass dataset="):
        pp.probe_layers(m, **FAST)
    with pytest.raises(ValueError, match=r"detect_poison needs train data.*pass train_data="):
        pp.detect_poison(m, progress=False)
    with pytest.raises(ValueError, match=r"probe_transfer needs test data"):
        pp.probe_transfer(m, test_model=probe_pair.clean, **FAST)


# ---- options: one config, keywords or config= ----------------------------------------------------
def test_config_and_keywords_are_the_same(probe_pair):
    cfg = ProbeConfig(n_random=6, seed=1, layers=[0], C=0.5)
    a = pp.probe_layers(probe_pair, config=cfg, progress=False)
    b = pp.probe_layers(probe_pair, n_random=6, seed=1, layers=[0], C=0.5, progress=False)
    same_probe(a, b)
    c = pp.probe_layers(probe_pair, config=cfg.replace(seed=7), seed=1, progress=False)  # keywords override
    same_probe(a, c)
    assert pp.probe_layers(probe_pair, config=cfg.to_dict(), progress=False).seed == 1  # its dict works too
    both = pp.probe_twins(probe_pair, config=cfg, progress=False)
    same_probe(both["backdoored"], a)
    det = DetectConfig(method="activation_clustering", n_components=3, reduce="pca")
    x = pp.detect_poison(probe_pair, config=det, progress=False)
    y = pp.detect_poison(probe_pair, method="activation_clustering", n_components=3, reduce="pca", progress=False)
    assert x.method == "activation_clustering" and torch.equal(x.scores, y.scores)
    rows = probe_pair.test_data.select(range(12))
    d = torch.ones(probe_pair.backdoored.cfg.d_model)
    cc = CausalCheckConfig(intervention="steer", alpha=(2.0, -2.0))
    assert pp.causal_check(probe_pair, 0, d, test_data=rows, config=cc) == \
        pp.causal_check(probe_pair, 0, d, test_data=rows, intervention="steer", alpha=[2.0, -2.0])
    assert ProbeConfig.from_dict(cfg.to_dict()) == cfg and cfg.fingerprint() != cfg.replace(seed=2).fingerprint()


def test_unknown_options_name_the_allowed_ones(probe_pair):
    with pytest.raises(ConfigError, match=r"probe_layers: unknown option 'n_randm'.*ProbeConfig.*n_random"):
        pp.probe_layers(probe_pair, n_randm=3)
    with pytest.raises(ConfigError, match=r"detect_poison: unknown option 'layers'.*DetectConfig.*layer"):
        pp.detect_poison(probe_pair, layers=0)
    with pytest.raises(ConfigError, match=r"causal_check: unknown option 'alfa'.*alpha"):
        pp.causal_check(probe_pair, 0, torch.ones(32), alfa=1.0)
    with pytest.raises(ConfigError, match=r"unknown field 'sites'.*allowed: site"):
        ProbeConfig.from_dict({"sites": "resid_post"})


@pytest.mark.parametrize("options, match", [
    ({"test_size": 1.5}, r"ProbeConfig\.test_size must be a number in \(0, 1\), got 1\.5"),
    ({"C": -1}, r"ProbeConfig\.C must be a number in \(0, inf\], got -1"),
    ({"n_random": -2}, r"ProbeConfig\.n_random must be an integer in \[0, inf\]"),
    ({"site": "attn_head"}, r"ProbeConfig\.site must be one of \('resid_pre', .*'mlp_out'\), got 'attn_head'"),
    ({"method": "svm"}, r"ProbeConfig\.method must be one of \('logistic', 'mean_diff'\)"),
    ({"positions": "first"}, r"ProbeConfig\.positions must be one of \('last', 'all'\)"),
    ({"layers": [-1]}, r"ProbeConfig\.layers must be a layer number >= 0"),
])
def test_out_of_range_names_field_and_range(probe_pair, options, match):
    with pytest.raises(ConfigError, match=match):
        pp.probe_layers(probe_pair, **options)


def test_other_configs_check_their_ranges():
    with pytest.raises(ConfigError, match=r"DetectConfig\.n_components must be an integer in \[1, inf\], got 0"):
        DetectConfig(n_components=0)
    with pytest.raises(ConfigError, match=r"DetectConfig\.position must be one of \('last', 'mean'\)"):
        DetectConfig(position="first")
    with pytest.raises(ConfigError, match=r"CausalCheckConfig\.intervention must be one of \('ablate', 'steer'\)"):
        CausalCheckConfig(intervention="patch")
    with pytest.raises(ConfigError, match=r"CausalCheckConfig\.alpha must be a finite number"):
        CausalCheckConfig(alpha=float("inf"))


def test_sites_come_from_the_registry():
    assert tuple(pp.SITES) == sites.RESIDUAL_SITES
    assert pp.SITES == {n: sites.SITES[n].hook_template() for n in sites.RESIDUAL_SITES}
    from poisonmech.probes.activations import hook_name

    assert hook_name("mlp_out", 1) == sites.hook_name("mlp_out", 1) == "blocks.1.hook_mlp_out"


# ---- activations collected once, reused for several contrasts ------------------------------------
def test_reused_activations_give_the_same_numbers(probe_pair):
    def collected(positions):
        return {role: pp.collect_activations(probe_pair, twin=role, positions=positions, progress=False)
                for role in ("clean", "backdoored")}

    some, every = collected([-1, 2]), collected("all")
    for acts, options in ((some, {}), (some, {"contrast": "near_miss"}), (some, {"balance_length": True}),
                          (some, {"positions": [2, -1]}), (every, {"positions": "all", "contrast": "near_miss"})):
        plain = pp.probe_twins(probe_pair, **options, **FAST)
        reused = pp.probe_twins(probe_pair, activations=acts, **options, **FAST)
        for a, b in zip(plain.results, reused.results):
            same_probe(a, b)
            assert a.positions == b.positions
        one = pp.probe_layers(probe_pair, activations=acts["backdoored"], **options, **FAST)
        same_probe(one, plain["backdoored"])
    with pytest.raises(ValueError, match=r"positions \[-1\] were not collected"):
        pp.probe_layers(probe_pair, activations=every["backdoored"], **FAST)
    acts = some
    with pytest.raises(ValueError, match=r"activations: expected 'mlp_out' activations"):
        pp.probe_layers(probe_pair, activations=acts["backdoored"], site="mlp_out", **FAST)
    with pytest.raises(ValueError, match="keyed by role"):
        pp.probe_twins(probe_pair, activations={"model": acts["clean"]}, **FAST)


# ---- results: one format mechanism --------------------------------------------------------------
def all_results(pair):
    r = pp.probe_layers(pair, **FAST)
    both = pp.probe_twins(pair, **FAST)
    t = pp.probe_transfer(pair, test_twin="clean", **FAST)
    d = pp.detect_poison(pair, progress=False)
    c = CausalCheck(before={"asr": 0.9, "clean_acc": 0.8}, after=({"asr": 0.1, "clean_acc": 0.79},),
                    settings=("ablate",), layers=(0,), site="resid_post")
    return {"probe": r, "comparison": both, "transfer": t, "detection": d, "causal": c}


def test_every_result_round_trips(probe_pair, tmp_path):
    results = all_results(probe_pair)
    for name, r in results.items():
        path = r.save(tmp_path / f"{name}.bin")
        back = type(r).load(path)
        assert back.to_frame().equals(r.to_frame()), name
        assert isinstance(r.to_frame(), pd.DataFrame) and isinstance(back.plot(), go.Figure)
        other = next(x for n, x in results.items() if n != name)
        with pytest.raises(ResultFormatError, match=f"not a {type(r).__name__}"):
            type(r).load(other.save(tmp_path / f"other_{name}.bin"))


def test_newer_or_foreign_files_are_refused(probe_pair, tmp_path):
    r = pp.detect_poison(probe_pair, progress=False)
    save_tensors(tmp_path / "new.st", {"scores": r.scores},
                 metadata={"poisonmech": json.dumps({"format": "poisonmech.probes.detection/99"})})
    with pytest.raises(ResultFormatError, match="newer poisonmech"):
        DetectionResult.load(tmp_path / "new.st")
    write_json(tmp_path / "foreign.json", {"hello": 1})
    with pytest.raises(ResultFormatError, match="not a poisonmech result file"):
        CausalCheck.load(tmp_path / "foreign.json")


def test_old_layout_files_still_load(probe_pair, tmp_path):
    """Files of the old "poisonmech.probes/1" layout (a separate "kind" key) load; another kind is refused."""
    d = pp.detect_poison(probe_pair, progress=False)
    tensors = {"scores": d.scores, "loss": d.loss, "class_index": d.class_index, "is_poison": d.is_poison}
    meta = {"format": LEGACY_FORMAT, "kind": "DetectionResult", "classes": list(d.classes),
            "class_stats": list(d.class_stats), "method": d.method, "site": d.site, "layer": d.layer,
            "position": d.position, "k": d.k}
    save_tensors(tmp_path / "det.st", tensors, metadata={"poisonmech": json.dumps(meta)})
    back = DetectionResult.load(tmp_path / "det.st")
    assert torch.equal(back.scores, d.scores) and back.k == d.k
    with pytest.raises(ResultFormatError, match="holds a 'DetectionResult' result.*not a ProbeResult"):
        ProbeResult.load(tmp_path / "det.st")
    c = {"format": LEGACY_FORMAT, "kind": "CausalCheck", "before": {"asr": 1.0}, "after": [{"asr": 0.5}],
         "settings": ["ablate"], "layers": [0], "site": "resid_post"}
    write_json(tmp_path / "c.json", c)
    assert CausalCheck.load(tmp_path / "c.json").after == ({"asr": 0.5},)
    for cls in (ProbeComparison, TransferResult):
        with pytest.raises(ResultFormatError):
            cls.load(tmp_path / "c.json")


def test_detection_ranking_metrics_follow_poisonmech_ranking(probe_pair):
    from poisonmech import ranking

    d = pp.detect_poison(probe_pair, progress=False)
    y = d.is_poison.numpy()
    assert d.poison_auroc() == ranking.auroc(d.scores.numpy(), y)
    assert d.precision_at() == ranking.precision_at_k(d.scores.numpy(), y, int(y.sum()))
    assert d.precision_at(10_000) == pytest.approx(y.mean())  # k beyond the rows: every row
    with pytest.raises(ValueError, match=r"precision_at: k must be an integer >= 1, got 0"):
        d.precision_at(0)
    clean = DetectionResult(**{**d.__dict__, "is_poison": torch.zeros_like(d.is_poison), "k": 0})
    assert np.isnan(clean.poison_auroc()) and np.isnan(clean.precision_at()) and np.isnan(clean.average_precision())
    assert d.top(3).tolist() == ranking.top_k(d.scores.numpy(), 3).tolist()
