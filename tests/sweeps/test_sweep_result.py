"""Sweep as a result: to_frame / plot / save / load on a synthetic sweep (no training)."""

import json

import plotly.graph_objects as go
import pytest

import poisonmech as pm
from poisonmech.results import ResultFormatError
from poisonmech.storage import write_json
from poisonmech.sweeps import RunRecord, RunSpec, Sweep, load_sweep
from poisonmech.sweeps.spec import DONE, FAILED


def _spec(count: int, seed: int) -> RunSpec:
    return RunSpec(task={"kind": "sentiment", "n_train": 96, "n_test": 12, "seed": 0},
                   attack=pm.Backdoor(trigger="cf", poison_count=count, seed=seed).to_dict(),
                   model=pm.ModelConfig(n_layers=1, d_model=32, n_heads=2).to_dict(),
                   train={k: v for k, v in pm.TrainConfig(epochs=1, seed=seed).to_dict().items() if k != "device"},
                   analyses=("patching",))


def _sweep(tmp_path) -> Sweep:
    runs = []
    for count in (0, 4, 8):
        for seed in (0, 1):
            spec = _spec(count, seed)
            asr = min(1.0, count / 8 + 0.05 * seed)
            # keys sorted, as in the DONE.json files load_sweep reads
            runs.append(RunRecord(name=spec.name, spec=spec, status="done",
                                  metrics={"backdoored": {"asr": asr, "clean_acc": 0.9},
                                           "clean": {"asr": 0.02, "clean_acc": 0.9}},
                                  analyses={"patching": {"gap": float("nan"), "patching_top_head": "L0H1"}},
                                  error=None, n_poison=count))
    bad = _spec(500, 0)
    runs.append(RunRecord(name=bad.name, spec=bad, status="failed", metrics={}, analyses={},
                          error="ValueError: too many", n_poison=None))
    return Sweep(out_dir=tmp_path / "sweep", runs=tuple(runs))


def test_to_frame_and_plot(tmp_path):
    sw = _sweep(tmp_path)
    f = sw.to_frame()
    assert {"run", "status", "twin", "metric", "value", "n_poison", "seed", "poison_count"} <= set(f.columns)
    assert len(f[(f["metric"] == "asr") & (f["twin"] == "backdoored")]) == 6
    assert f[f["status"] == "failed"]["value"].tolist() == ["ValueError: too many"]
    fig = sw.plot()
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data if t.name]
    assert names == ["backdoored", "clean"]
    assert list(fig.data[1].x) == [0.5, 4.0, 8.0]  # count 0 drawn at 0.5 on the log axis
    assert isinstance(sw.plot("clean_acc", group="seed"), go.Figure)
    assert isinstance(sw.plot("no_such_metric"), go.Figure)
    assert isinstance(Sweep(out_dir=tmp_path, runs=()).plot(), go.Figure)


def test_save_load_round_trip_with_a_checked_format(tmp_path):
    sw = _sweep(tmp_path)
    path = sw.save(tmp_path / "sweep_result.json")
    assert json.loads(path.read_text())["format"] == "poisonmech.sweep_result/1"
    back = Sweep.load(path)
    assert back.out_dir == sw.out_dir and [r.name for r in back.runs] == [r.name for r in sw.runs]
    assert back.runs[1].spec == sw.runs[1].spec and back.runs[-1].error == "ValueError: too many"
    a, b = sw.to_frame(), back.to_frame()
    assert a.drop(columns="value").equals(b.drop(columns="value"))
    assert [str(v) for v in a["value"]] == [str(v) for v in b["value"]]  # NaN summaries survive
    other = write_json(tmp_path / "other.json", {"format": "poisonmech.patch_result/1"}) or tmp_path / "other.json"
    with pytest.raises(ResultFormatError, match="not a Sweep"):
        Sweep.load(other)
    newer = json.loads(path.read_text())
    newer["format"] = "poisonmech.sweep_result/99"
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(ResultFormatError, match="newer poisonmech"):
        Sweep.load(tmp_path / "newer.json")
    with pytest.raises(FileNotFoundError):
        Sweep.load(tmp_path / "missing.json")


def test_load_reads_a_sweep_directory_as_load_sweep_does(tmp_path):
    sw = _sweep(tmp_path)
    out = tmp_path / "sweep"
    write_json(out / "sweep.json", {"format": "poisonmech.sweep/1", "runs": {r.name: r.spec.to_dict() for r in sw.runs}})
    for r in sw.runs:
        rec = {"status": r.status, "spec": r.spec.to_dict()}
        if r.status == "done":
            write_json(out / "runs" / r.name / DONE, {**rec, "metrics": r.metrics, "analyses": r.analyses,
                                                      "n_poison": r.n_poison})
        else:
            write_json(out / "runs" / r.name / FAILED, {**rec, "error": r.error})
    direct = load_sweep(out)
    for loaded in (Sweep.load(out), Sweep.load(out / "sweep.json")):
        assert [(r.name, r.status, r.n_poison) for r in loaded.runs] == [(r.name, r.status, r.n_poison)
                                                                         for r in direct.runs]
    assert sorted(r.name for r in direct.runs) == sorted(r.name for r in sw.runs)
