"""Every probe result prints as a few lines (label, layers, best cell, baselines), never raw tensors."""

from __future__ import annotations

import torch

import poisonmech.probes as pp
from poisonmech.probes import CausalCheck

FAST = {"n_random": 6, "progress": False}


def short(obj, max_lines: int) -> str:
    text = repr(obj)
    assert len(text.splitlines()) <= max_lines, text
    assert "tensor(" not in text and "array(" not in text, text
    assert str(obj) == text
    return text


def test_probe_result_repr(probe_pair):
    r = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, positions=[-1, 2], name="backdoored", **FAST)
    text = short(r, 2)
    li, pi = r.layers.index(r.best[0]), r.positions.index(r.best[1])
    for piece in ("'backdoored'", "'is_triggered'", "resid_post", "logistic", "best layer",
                  f"AUROC {float(r.auroc[li, pi]):.3f}", f"median {float(r.random_auroc_median[li, pi]):.3f}",
                  f"p95 {float(r.random_auroc_p95[li, pi]):.3f}", f"max {float(r.baseline_auroc[li, pi]):.3f}",
                  f"length {float(r.length_auroc[pi]):.3f}", "contrast untriggered"):
        assert piece in text, (piece, text)
    bal = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, balance_length=True, **FAST)
    assert "length-balanced" in short(bal, 2)
    every = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, positions="all", n_random=0, progress=False)
    assert f"positions 0..{every.positions[-1]} ({len(every.positions)})" in short(every, 2)
    many = pp.probe_layers(probe_pair.backdoored, probe_pair.test_data, positions=[-1, -2, -3, 1, 2, 4, 5],
                           n_random=0, progress=False)
    assert "positions [last, last-1, ..., 5] (7)" in short(many, 2)


def test_comparison_and_transfer_repr(probe_pair):
    both = pp.probe_twins(probe_pair, **FAST)
    text = short(both, 3)
    assert "'clean'" in text and "'backdoored'" in text and text.count("AUROC") == 2
    t = pp.probe_transfer(probe_pair.backdoored, probe_pair.test_data, test_model=probe_pair.clean,
                          name="backdoored", test_name="clean", **FAST)
    text = short(t, 3)
    assert "source:" in text and "target:" in text and "'backdoored'" in text


def test_detection_repr(probe_pair):
    d = pp.detect_poison(probe_pair.backdoored, probe_pair.train_data, "spectral", progress=False)
    text = short(d, 2)
    assert f"AUROC {d.poison_auroc():.3f}" in text and f"loss baseline {d.poison_auroc('loss'):.3f}" in text
    assert f"{len(probe_pair.train_data)} rows" in text
    no_flags = pp.detect_poison(probe_pair.backdoored, probe_pair.train_data.remove_columns(["is_poison"]),
                                progress=False)
    assert "no is_poison" in short(no_flags, 1)


def test_causal_check_and_activations_repr(probe_pair):
    c = CausalCheck(before={"asr": 0.9, "clean_acc": 0.8}, after=({"asr": 0.1, "clean_acc": 0.79},),
                    settings=("ablate",), layers=(0,), site="resid_post")
    text = short(c, 2)
    assert "asr 0.900 -> 0.100" in text
    many = CausalCheck(before={"asr": 0.9}, after=tuple({"asr": a / 10} for a in range(12)),
                       settings=tuple(f"steer alpha={a}" for a in range(12)), layers=(0,), site="resid_post")
    assert "more" in short(many, 7)
    acts = pp.collect_activations(probe_pair.backdoored, probe_pair.test_data, progress=False)
    assert isinstance(acts.acts, torch.Tensor)
    assert f"{len(probe_pair.test_data)} rows" in short(acts, 1)
