"""probe_layers / probe_twins on the tiny pair; the fitting core against scikit-learn; bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from datasets import Dataset
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import poisonmech as pm
import poisonmech.probes as pp
from poisonmech.encoding import encode
from poisonmech.metrics import score_completions
from poisonmech.probes.activations import collect_activations
from poisonmech.probes.layers import fit_cells

FAST = {"n_random": 8, "progress": False}


def synthetic(n: int, d: int, seed: int, signal: float):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    X = rng.standard_normal((n, d))
    X[:, 0] += signal * y
    return torch.tensor(X, dtype=torch.float32), y


def test_fit_cells_matches_sklearn_on_same_features():
    Xtr, ytr = synthetic(200, 12, 0, 1.0)
    Xte, yte = synthetic(100, 12, 1, 1.0)
    acts = lambda X: X[None, :, None, :]  # noqa: E731  (layer batch pos d_model)
    valid = lambda X: torch.ones(len(X), 1, dtype=torch.bool)  # noqa: E731
    (fit,) = fit_cells(acts(Xtr), valid(Xtr), ytr, [(acts(Xte), valid(Xte), yte)], method="logistic", C=1.0,
                       standardize=True, n_random=5, seed=0, progress=False)
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, tol=1e-4)).fit(Xtr.double(), ytr)
    assert fit.auroc[0, 0] == pytest.approx(roc_auc_score(yte, ref.decision_function(Xte.double())), abs=1e-6)
    assert fit.accuracy[0, 0] == pytest.approx(ref.score(Xte.double(), yte), abs=1e-6)


def test_random_baseline_behaves():
    d = pp.random_directions(32, 50, seed=3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    np.testing.assert_array_equal(d, pp.random_directions(32, 50, seed=3))
    assert not np.allclose(d, pp.random_directions(32, 50, seed=4))
    # signal in one coordinate of 64: the probe finds it, random directions mostly miss it
    Xtr, ytr = synthetic(400, 64, 0, 2.0)
    Xte, yte = synthetic(400, 64, 1, 2.0)
    one = lambda X: (X[None, :, None, :], torch.ones(len(X), 1, dtype=torch.bool))  # noqa: E731
    (fit,) = fit_cells(*one(Xtr), ytr, [(*one(Xte), yte)], method="logistic", C=1.0, n_random=40, seed=0,
                       progress=False)
    r = fit.random_auroc[0, 0]
    assert fit.auroc[0, 0] > 0.85
    assert r.shape == (40,) and np.all((r >= 0) & (r <= 1))
    assert r.max() < fit.auroc[0, 0] and 0.4 < r.mean() < 0.7
    # pure-noise labels: neither the probe nor the best random direction is far above chance
    Xtr, ytr = synthetic(400, 16, 2, 0.0)
    Xte, yte = synthetic(400, 16, 3, 0.0)
    (fit,) = fit_cells(*one(Xtr), ytr, [(*one(Xte), yte)], method="logistic", C=1.0, n_random=20, seed=0,
                       progress=False)
    assert abs(fit.auroc[0, 0] - 0.5) < 0.1 and fit.random_auroc[0, 0].max() < 0.65


def test_probe_layers_on_probe_pair(probe_pair):
    data = probe_pair.test_data
    r = pp.probe_layers(probe_pair.backdoored, data, "is_triggered", name="backdoored", seed=1, **FAST)
    n_layers = probe_pair.backdoored.cfg.n_layers
    assert r.auroc.shape == (n_layers, 1) and r.random_auroc.shape == (n_layers, 1, 8)
    assert r.coef.shape == (n_layers, 1, probe_pair.backdoored.cfg.d_model)
    assert torch.all((r.auroc >= 0) & (r.auroc <= 1))
    torch.testing.assert_close(r.directions.norm(dim=-1), torch.ones(n_layers, 1))
    assert r.direction().shape == (probe_pair.backdoored.cfg.d_model,)
    # split by example: no base review on both sides
    base = np.asarray(data["base_id"])
    assert not set(base[r.train_index.numpy()]) & set(base[r.test_index.numpy()])
    assert len(r.train_index) + len(r.test_index) == len(data)
    frame = r.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == n_layers
    assert {"layer", "pos", "auroc", "accuracy", "random_auroc_best", "model"} <= set(frame.columns)
    assert isinstance(r.plot(), go.Figure)


@pytest.mark.parametrize("standardize", [False, True])
def test_probe_matches_sklearn_on_collected_features(probe_pair, standardize):
    m, data = probe_pair.backdoored, probe_pair.test_data
    r = pp.probe_layers(m, data, "is_triggered", C=0.3, standardize=standardize, **FAST)
    acts = collect_activations(m, data, layers=[0], progress=False).acts[0, :, 0].double().numpy()
    y = np.asarray(data["is_triggered"])
    tr, te = r.train_index.numpy(), r.test_index.numpy()
    ref = LogisticRegression(C=0.3, max_iter=10_000, tol=1e-10)
    ref = (make_pipeline(StandardScaler(), ref) if standardize else ref).fit(acts[tr], y[tr])
    assert r.auroc[0, 0].item() == pytest.approx(roc_auc_score(y[te], ref.decision_function(acts[te])), abs=1e-5)


def test_last_position_uses_real_length(probe_pair):
    """Right padding: 'last' is each row's own last prompt token, equal to running it alone."""
    m, data = probe_pair.backdoored, probe_pair.test_data.select(range(6))
    acts = collect_activations(m, data, site="resid_post", layers=[0], progress=False).acts[0, :, 0]
    for i in range(len(data)):
        enc = encode(data.select([i]).map(lambda r: {"completion": ""}), probe_pair.tokenizer, loss_on="completion",
                     add_eos=False)
        tokens, _ = enc.batch([0])
        _, cache = m.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        torch.testing.assert_close(acts[i], cache["blocks.0.hook_resid_post"][0, -1].float(), atol=1e-5, rtol=1e-5)


def test_stopping_early_keeps_the_activations(probe_pair):
    """Reading layer 0 of a 2-layer model stops the forward after block 0: same values."""
    tok = probe_pair.tokenizer
    m = pm.build_model(pm.ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=64), len(tok), seed=0, tokenizer=tok)
    data = probe_pair.test_data.select(range(5))
    for site in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"):
        acts = collect_activations(m, data, site=site, layers=[0], positions=[0, -1], progress=False)
        name = f"blocks.0.hook_{site}"
        for i in range(len(data)):
            enc = encode(data.select([i]).map(lambda r: {"completion": ""}), tok, loss_on="completion", add_eos=False)
            tokens, _ = enc.batch([0])
            _, cache = m.run_with_cache(tokens, names_filter=name)
            torch.testing.assert_close(acts.acts[0, i, 1], cache[name][0, -1].float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(acts.acts[0, i, 0], cache[name][0, 0].float(), atol=1e-5, rtol=1e-5)


def test_public_names_resolve():
    assert all(getattr(pp, name) is not None for name in pp.__all__)
    with pytest.raises(AttributeError):
        pp.not_a_name  # noqa: B018


def test_positions_all_and_list(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    r = pp.probe_layers(m, data, positions=[-1, -2, 1], **FAST)
    assert r.positions == (-1, -2, 1) and r.auroc.shape == (1, 3)
    a = pp.probe_layers(m, data, positions="all", n_random=0, progress=False)
    longest = max(len(p.split()) for p in data["prompt"]) + 1  # word-level tokenizer + BOS
    assert a.positions == tuple(range(longest))
    assert (a.n_test[-1] < a.n_test[0]) or (a.n_test[-1] == a.n_test[0])
    assert a.random_auroc.shape[-1] == 0
    assert isinstance(a.plot(), go.Figure)


def test_probe_twins_share_the_split(probe_pair):
    both = pp.probe_twins(probe_pair, label="is_triggered", **FAST)
    assert both.names == ("clean", "backdoored")
    assert torch.equal(both["clean"].test_index, both["backdoored"].test_index)
    assert set(both.to_frame()["model"]) == {"clean", "backdoored"}
    assert isinstance(both.plot(), go.Figure)


def test_will_emit_target_agrees_with_evaluate(probe_pair):
    m, data, attack = probe_pair.backdoored, probe_pair.test_data, probe_pair.attack
    y = pp.will_emit_target(m, data, attack, probe_pair.tokenizer)
    rows = Dataset.from_dict({"prompt": list(data["prompt"]), "completion": [attack.target] * len(data)})
    ref = score_completions(m, encode(rows, probe_pair.tokenizer, loss_on="completion"))["exact"]
    np.testing.assert_array_equal(y, ref)
    trig = np.asarray(data["is_triggered"]) & (np.asarray(data["completion"]) != attack.target)
    assert y[trig].mean() == pytest.approx(pm.evaluate(m, probe_pair.task, attack, test_data=data,
                                                       tokenizer=probe_pair.tokenizer)["asr"])
    if 0 < y.sum() < len(y):
        r = pp.probe_layers(m, data, "will_emit_target", target=attack, **FAST)
        assert r.label == "will_emit_target"


# ---- bad input ---------------------------------------------------------------------------------
def test_label_errors(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    with pytest.raises(ValueError, match=r"label='nope'.*allowed.*is_triggered"):
        pp.probe_layers(m, data, "nope", **FAST)
    with pytest.raises(ValueError, match=r"'completion' is not binary.*allowed"):
        pp.probe_layers(m, data, "completion", **FAST)
    const = data.map(lambda r: {"flag": False})
    with pytest.raises(ValueError, match=r"'flag' is constant"):
        pp.probe_layers(m, const, "flag", **FAST)
    with pytest.raises(ValueError, match="target"):
        pp.probe_layers(m, data, "will_emit_target", **FAST)


def test_site_and_layer_errors(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    with pytest.raises(ValueError, match=r"site must be one of .*resid_post"):
        pp.probe_layers(m, data, site="resid", **FAST)
    with pytest.raises(ValueError, match=r"layers 0\.\.0, got 3"):
        pp.probe_layers(m, data, layers=[3], **FAST)
    attn_only = pm.build_model(pm.ModelConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=64, attn_only=True),
                               len(probe_pair.tokenizer), seed=0, tokenizer=probe_pair.tokenizer)
    with pytest.raises(ValueError, match=r"site='mlp_out'.*no hook 'blocks.0.hook_mlp_out'"):
        pp.probe_layers(attn_only, data, site="mlp_out", **FAST)


def test_split_leaving_a_class_empty(probe_pair):
    m, data = probe_pair.backdoored, probe_pair.test_data
    y = np.zeros(len(data), bool)
    y[0] = True  # one positive row: one side of any split lacks it
    with pytest.raises(ValueError, match=r"split: the (train|test) side has no rows with custom=True"):
        pp.probe_layers(m, data, y, **FAST)
    with pytest.raises(ValueError, match="test_size"):
        pp.probe_layers(m, data, test_size=1.5, **FAST)


def test_nan_activations_name_the_layer(probe_pair):
    cfg = pm.ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=64)
    m = pm.build_model(cfg, len(probe_pair.tokenizer), seed=0, tokenizer=probe_pair.tokenizer)
    with torch.no_grad():
        for p in m.blocks[1].mlp.parameters():  # layer 1's MLP only: layer 0 stays finite
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"activations at layer 1 .*NaN/inf"):
        pp.probe_layers(m, probe_pair.test_data, **FAST)
