"""Result objects: save/load round trips (safetensors + JSON, no pickle) and transfer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import poisonmech.probes as pp
from poisonmech.probes import ProbeComparison, ProbeResult, TransferResult
from poisonmech.results import ResultFormatError

FAST = {"n_random": 6, "progress": False}


def assert_same(a: ProbeResult, b: ProbeResult) -> None:
    for f in dataclasses.fields(ProbeResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) and x.dtype == y.dtype, f.name
        else:
            assert x == y, f.name


def test_probe_result_round_trip(probe_pair, tmp_path):
    r = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, positions=[-1, 2], name="backdoored", **FAST)
    r.save(tmp_path / "probe.safetensors")
    back = ProbeResult.load(tmp_path / "probe.safetensors")
    assert_same(r, back)
    assert back.to_frame().equals(r.to_frame())
    both = pp.probe_twins(probe_pair, **FAST)
    both.save(tmp_path / "both.safetensors")
    again = ProbeComparison.load(tmp_path / "both.safetensors")
    for a, b in zip(both.results, again.results):
        assert_same(a, b)
    with pytest.raises(ResultFormatError, match=r"'probes.comparison' result .*not a ProbeResult"):
        ProbeResult.load(tmp_path / "both.safetensors")
    assert not list(tmp_path.glob("*.pkl"))


def test_transfer_to_the_same_model_reproduces_the_probe(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    t = pp.probe_transfer(m, data, test_model=m, **FAST)
    plain = pp.probe_layers(m, data, **FAST)
    torch.testing.assert_close(t.source_auroc, plain.auroc)
    torch.testing.assert_close(t.auroc, plain.auroc)  # same rows, same activations
    torch.testing.assert_close(t.target.random_auroc, plain.random_auroc)
    assert torch.equal(t.target.test_index, plain.test_index)


def test_transfer_across_twins_and_data(probe_pair, tmp_path):
    data = probe_pair.test_data
    twin = pp.probe_transfer(probe_pair.backdoored, data, test_model=probe_pair.clean, name="backdoored",
                             test_name="clean", **FAST)
    assert torch.equal(twin.source.coef, twin.target.coef)
    assert set(twin.to_frame()["evaluated_on"]) == {"source", "target"}
    # near-miss contrast -> real trigger, on one model
    near = data.filter(lambda r: not r["is_triggered"])
    trig = data.filter(lambda r: not r["is_near_miss"])
    cross = pp.probe_transfer(probe_pair.backdoored, near, "is_near_miss", test_data=trig, test_label="is_triggered",
                              **FAST)
    assert cross.target.label == "is_triggered" and int(cross.target.n_test[0]) == len(trig)
    assert np.all((cross.auroc.numpy() >= 0) & (cross.auroc.numpy() <= 1))
    cross.save(tmp_path / "t.safetensors")
    back = TransferResult.load(tmp_path / "t.safetensors")
    assert_same(back.target, cross.target)
    cross.plot()
    with pytest.raises(ValueError, match="test_model .* test_data"):
        pp.probe_transfer(probe_pair.backdoored, data, **FAST)
