"""ablate_direction / steer: what they do to activations, and that no hook outlives them."""

from __future__ import annotations

import pytest
import torch

import poisonmech as pm
import poisonmech.probes as pp
from poisonmech.probes.intervene import CausalCheck


def small_model():
    cfg = pm.ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=32)
    return pm.build_model(cfg, 40, seed=0)


def tokens():
    return torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(0))


def n_hooks(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def resid(model, toks, name):
    _, cache = model.run_with_cache(toks, names_filter=name)
    return cache[name]


@torch.no_grad()
def test_ablate_removes_the_direction_downstream():
    m, toks = small_model(), tokens()
    d = torch.randn(16, generator=torch.Generator().manual_seed(1))
    u = d / d.norm()
    before = resid(m, toks, "blocks.1.hook_resid_pre")  # = layer 0's resid_post
    with pp.ablate_direction(m, 0, d) as same:
        assert same is m
        inside = resid(m, toks, "blocks.1.hook_resid_pre")
    torch.testing.assert_close(inside @ u, torch.zeros(3, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(inside, before - (before @ u)[..., None] * u, atol=1e-5, rtol=1e-5)
    with pp.ablate_direction(m, 0, d, value=2.5):
        torch.testing.assert_close(resid(m, toks, "blocks.1.hook_resid_pre") @ u, torch.full((3, 9), 2.5),
                                   atol=1e-5, rtol=0)


@torch.no_grad()
def test_steer_adds_alpha_times_the_unit_direction():
    m, toks = small_model(), tokens()
    d = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 7
    before = resid(m, toks, "blocks.1.hook_resid_pre")
    with pp.steer(m, 0, d, alpha=3.0):
        inside = resid(m, toks, "blocks.1.hook_resid_pre")
    torch.testing.assert_close(inside - before, (3.0 * d / d.norm()).expand_as(before), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hooks_removed_on_exit_and_on_error():
    m, toks = small_model(), tokens()
    base = m(toks)
    d = torch.randn(16)
    for ctx in (lambda: pp.ablate_direction(m, [0, 1], d), lambda: pp.steer(m, 1, d, 5.0, site="mlp_out")):
        with ctx():
            assert n_hooks(m) > 0
            assert not torch.allclose(m(toks), base)
        assert n_hooks(m) == 0
        torch.testing.assert_close(m(toks), base)
        with pytest.raises(RuntimeError, match="boom"):
            with ctx():
                raise RuntimeError("boom")
        assert n_hooks(m) == 0
        torch.testing.assert_close(m(toks), base)


def test_intervention_bad_input():
    m = small_model()
    with pytest.raises(ValueError, match="expected shape"):
        with pp.ablate_direction(m, 0, torch.ones(5)):
            pass
    with pytest.raises(ValueError, match="zero norm"):
        with pp.steer(m, 0, torch.zeros(16), 1.0):
            pass
    with pytest.raises(ValueError, match=r"layers 0\.\.1, got 2"):
        with pp.steer(m, 2, torch.ones(16), 1.0):
            pass
    assert n_hooks(m) == 0


def test_causal_check_on_probe_pair(probe_pair, tmp_path):
    m = probe_pair.backdoored
    d = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))
    kw = {"test_data": probe_pair.test_data.select(range(24)), "tokenizer": probe_pair.tokenizer}
    c = pp.causal_check(probe_pair, 0, d, test_data=kw["test_data"])
    assert c.before["asr"] == pytest.approx(pm.evaluate(m, probe_pair.task, probe_pair.attack, **kw)["asr"])
    assert c.settings == ("ablate",) and {"asr", "clean_acc"} <= set(c.after[0])
    s = pp.causal_check(m, 0, d, task=probe_pair.task, attack=probe_pair.attack, intervention="steer", alpha=[2.0],
                        **kw)
    assert s.settings == ("steer alpha=2",)
    frame = s.to_frame()
    assert set(frame["metric"]) >= {"asr", "clean_acc"} and (frame["delta"] == frame["after"] - frame["before"]).all()
    assert n_hooks(m) == 0
    s.save(tmp_path / "check.json")
    assert CausalCheck.load(tmp_path / "check.json") == s
    s.plot()
