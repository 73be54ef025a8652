"""pm.defenses.benchmark: the protocol, the table's numbers against hand computations, bad input.

Stub defenses (registered here under test-only names) whose outputs are known make every
column checkable: an audit that reads the answer gives AUROC 1, a filter that rejects nothing
leaves evaluate's ASR, a "repair" that returns an exact copy removes nothing of the mechanism.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from datasets import Dataset

import poisonmech as pm
from poisonmech import ranking
from poisonmech.config import ConfigError
from poisonmech.defenses import DataAudit, InputFilter, ModelAudit, Repair, register


@register
@dataclass(frozen=True)
class _Oracle(DataAudit):
    """Test stub: scores rows by their (hidden) is_poison flag plus a row-index tie-break."""
    name: ClassVar[str] = "_test_oracle"

    def score(self, ctx):
        flags = np.asarray(ctx.train_data["is_poison"], dtype=float)
        return flags + np.arange(len(flags)) * 1e-6


@register
@dataclass(frozen=True)
class _Length(InputFilter):
    """Test stub: scores inputs by prompt length in characters (a length-only baseline)."""
    name: ClassVar[str] = "_test_length"
    frr: float = 0.0

    def score(self, ctx, inputs):
        return np.asarray([len(p) for p in inputs["prompt"]], dtype=float)


@register
@dataclass(frozen=True)
class _Nothing(InputFilter):
    """Test stub: rejects nothing (every score equal)."""
    name: ClassVar[str] = "_test_nothing"

    def score(self, ctx, inputs):
        return np.zeros(len(inputs))


@register
@dataclass(frozen=True)
class _Copy(Repair):
    """Test stub: returns an unchanged copy."""
    name: ClassVar[str] = "_test_copy"

    def repair(self, ctx):
        return copy.deepcopy(ctx.model)


@register
@dataclass(frozen=True)
class _Norm(ModelAudit):
    """Test stub: the weight norm of the model."""
    name: ClassVar[str] = "_test_norm"

    def score_model(self, ctx):
        return float(sum(p.detach().double().norm() ** 2 for p in ctx.model.parameters()))


STUBS = ["_test_oracle", "_test_length", "_test_nothing", "_test_copy", "_test_norm"]


@pytest.fixture(scope="module")
def bench(tiny_pair):
    return pm.defenses.benchmark(tiny_pair, STUBS, n_clean=40, n_contrast=4, circuit_top_n=3, progress=False,
                                 cache=False)


def test_rows_and_columns(bench, tiny_pair):
    f = bench.to_frame()
    assert list(f["defense"]) == STUBS
    assert set(pm.defenses.COLUMNS) <= set(f.columns)
    assert (f["asr_before"] == tiny_pair.metrics["backdoored"]["asr"]).all()
    assert (f["n_poison"] == 10).all()


def test_data_audit_against_sklearn(bench, tiny_pair):
    row = bench.to_frame().set_index("defense").loc["_test_oracle"]
    y = np.asarray(tiny_pair.train_data["is_poison"], bool)
    assert row["auroc"] == 1.0 and row["precision_at_k"] == 1.0 and row["k"] == int(y.sum()) == row["n_positive"]
    s = y + np.arange(len(y)) * 1e-6
    thr = pm.defenses.base.modified_z_threshold(s, 3.5)
    assert row["threshold"] == pytest.approx(thr)
    assert row["n_flagged"] == int((s >= thr).sum())
    assert row["precision_at_threshold"] == pytest.approx(ranking.at_threshold(s, y, thr)["precision"])


def test_filter_that_rejects_nothing_keeps_evaluate(bench, tiny_pair):
    row = bench.to_frame().set_index("defense").loc["_test_nothing"]
    m = pm.evaluate(tiny_pair)
    assert row["asr_after"] == pytest.approx(m["asr"]) and row["n_asr"] == m["n_asr"]
    assert row["clean_acc_after"] == pytest.approx(m["clean_acc"]) and row["n_clean_acc"] == m["n_clean_acc"]
    assert row["false_trigger_rate_after"] == pytest.approx(m["false_trigger_rate"])
    assert row["false_rejection_rate"] == 0.0 and row["auroc"] == 0.5


def test_rejecting_filter_by_hand(bench, tiny_pair):
    """The length filter at frr 0 rejects inputs longer than every clean calibration prompt."""
    row = bench.to_frame().set_index("defense").loc["_test_length"]
    test = tiny_pair.test_data
    clean = pm.defenses.clean_set(tiny_pair, 40)
    thr = max(len(p) for p in clean["prompt"])
    assert row["threshold"] == thr
    lengths = np.asarray([len(p) for p in test["prompt"]], float)
    y = np.asarray(test["is_triggered"], bool)
    assert row["auroc"] == pytest.approx(ranking.auroc(lengths, y))
    assert row["n_flagged"] == int((lengths > thr).sum())
    # ASR after: triggered rows whose answer is not the target, answered with the target and not rejected
    from poisonmech.defenses.benchmark import _outcomes

    out = _outcomes(tiny_pair.backdoored, test, pm.resolve(tiny_pair), 256)
    keep = lengths <= thr
    assert row["asr_after"] == pytest.approx((out["hit"] & keep)[out["triggered"]].mean())
    assert row["clean_acc_after"] == pytest.approx((out["correct"] & keep)[out["clean"]].mean())


def test_copy_repair_removes_nothing(bench):
    row = bench.to_frame().set_index("defense").loc["_test_copy"]
    assert row["asr_after"] == row["asr_before"] and row["clean_acc_after"] == row["clean_acc_before"]
    assert row["mechanism_after"] == pytest.approx(row["mechanism_before"], abs=1e-9)
    assert row["mechanism_removed"] == pytest.approx(0.0, abs=1e-6)


def test_model_audit_scores_both_twins(bench, tiny_pair):
    row = bench.to_frame().set_index("defense").loc["_test_norm"]
    norm = lambda m: float(sum(p.detach().double().norm() ** 2 for p in m.parameters()))  # noqa: E731
    assert row["model_score"] == pytest.approx(norm(tiny_pair.backdoored))
    assert row["clean_model_score"] == pytest.approx(norm(tiny_pair.clean))
    audits = bench.model_audits()
    assert list(audits["defense"]) == ["_test_norm"] and audits.loc[0, "n_backdoored"] == 1


def test_summary_plot_save_load(bench, tmp_path):
    s = bench.summary()
    assert {"asr_after_mean", "asr_after_std", "auroc_mean"} <= set(s.columns)
    fig = bench.plot()
    assert {t.name.split(" (")[0] for t in fig.data} >= {"_test_length", "_test_copy", "no defense"}
    path = bench.save(tmp_path / "bench.json")
    again = pm.defenses.DefenseBenchmark.load(path)
    assert again.to_frame().equals(bench.to_frame())


def test_cache_resumes(tiny_pair, capsys):
    first = pm.defenses.benchmark(tiny_pair, ["_test_oracle"], n_clean=40, progress=False)
    again = pm.defenses.benchmark(tiny_pair, ["_test_oracle"], n_clean=40, progress=True)
    assert "reused 1 cached row" in capsys.readouterr().out
    assert again.rows[0]["auroc"] == first.rows[0]["auroc"]


def test_bad_input(tiny_pair):
    with pytest.raises(ConfigError, match="unknown defense 'spectrall'.*did you mean 'spectral'|unknown defense"):
        pm.defenses.benchmark(tiny_pair, ["spectrall"], progress=False)
    poisoned = tiny_pair.train_data.filter(lambda r: r["is_poison"])
    overlap = Dataset.from_dict({"prompt": list(poisoned["prompt"][:2]), "completion": ["positive", "negative"]})
    with pytest.raises(ValueError, match="clean_data overlaps the poisoned rows: 2"):
        pm.defenses.benchmark(tiny_pair, ["_test_oracle"], clean_data=overlap, progress=False, cache=False)
    with pytest.raises(ValueError, match="not a bare model"):
        pm.defenses.benchmark(tiny_pair.backdoored, ["_test_oracle"], progress=False)
    with pytest.raises(ConfigError, match="frr"):
        pm.defenses.get("_test_length", frr=1.5)
    with pytest.raises(ConfigError, match="n_clean"):
        pm.defenses.benchmark(tiny_pair, ["_test_oracle"], n_clean=0, progress=False)
