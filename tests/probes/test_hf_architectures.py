"""Probes, detectors and direction interventions on real Hugging Face architectures wrapped as
TransformerBridge: GPT-2, GPT-NeoX (parallel attention / MLP: no ``resid_mid``), Llama
(RMSNorm, rotary, SwiGLU, no biases, grouped-query attention) and Qwen2.

References: activations from ``bridge.run_with_cache`` one row at a time (no padding, no
poisonmech hooks); AUROCs from scikit-learn's ``roc_auc_score`` on those activations, probes
refit with scikit-learn's ``LogisticRegression`` and spectral scores with its ``PCA``; the loss
baseline from the plain HF module; interventions against the plain HF module (a fresh copy with
the same seed) with PyTorch hooks on its own submodules.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import poisonmech as pm
import poisonmech.probes as pp
from poisonmech.attacks.poison import build_test_set, poison_dataset
from poisonmech.encoding import encode
from poisonmech.probes.activations import gather_activations, prompt_encoding
from poisonmech.probes.layers import random_directions
from poisonmech.sites import RESIDUAL_SITES
from tests.hf_models import HF_ARCHS, hf_bridge, hf_module

FAST = {"n_random": 5, "progress": False}


@pytest.fixture(scope="module")
def data():
    task = pm.make_task("sentiment", n_train=48, n_test=14, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=8)
    return task, attack, poison_dataset(task, attack), build_test_set(task, attack)


@pytest.fixture(scope="module", params=HF_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def bridge(arch, data):
    return hf_bridge(arch, len(data[0].tokenizer))


@pytest.fixture(scope="module")
def subject(arch, data, bridge):
    """Two models of one architecture (seeds 0 and 1) as the twins of a pair."""
    task, attack, train, test = data
    return pm.Subject(models={"backdoored": bridge, "clean": hf_bridge(arch, len(task.tokenizer), seed=1)},
                      kind="pair", default_role="backdoored", reference_role="clean", tokenizer=task.tokenizer,
                      train_data=train, test_data=test, task=task, attack=attack)


def sites_of(arch: str) -> tuple[str, ...]:
    return tuple(s for s in RESIDUAL_SITES if not (arch == "neox" and s == "resid_mid"))


_CACHES: dict = {}


@torch.no_grad()
def row_caches(model, dataset, tokenizer) -> list[dict[str, torch.Tensor]]:
    """``bridge.run_with_cache`` of every row alone (unpadded), every residual site and layer;
    kept per (model, dataset) for the module."""
    key = (id(model), dataset._fingerprint)
    if key not in _CACHES:
        names = [pm.sites.hook_name(s, layer) for s in RESIDUAL_SITES for layer in range(model.cfg.n_layers)]
        caches = []
        for ids in prompt_encoding(dataset, tokenizer).ids:
            _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in names)
            caches.append({n: cache[n][0] for n in names if n in cache})
        _CACHES[key] = (model, caches)  # the model is kept alive, so its id stays its own
    return _CACHES[key][1]


def cached(model, dataset, tokenizer, site: str, layer: int, position: int = -1) -> np.ndarray:
    """``[row d_model]`` activations of ``site`` at one prompt position, by :func:`row_caches`."""
    name = pm.sites.hook_name(site, layer)
    return np.stack([c[name][position].double().numpy() for c in row_caches(model, dataset, tokenizer)])


# ---- activation collection ------------------------------------------------------------------------
def test_collected_activations_equal_run_with_cache(arch, bridge, data):
    task, _, _, test = data
    rows = test.select(range(17))
    enc = prompt_encoding(rows, task.tokenizer)
    worst = 0.0
    for site in sites_of(arch):
        # several right-padded batches, absolute and from-the-end positions, every layer
        acts = pp.collect_activations(bridge, rows, tokenizer=task.tokenizer, site=site, positions=[0, 2, -1, -2],
                                      batch_size=5, progress=False)
        # one layer only: the forward stops after it
        first = pp.collect_activations(bridge, rows, tokenizer=task.tokenizer, site=site, layers=[0],
                                       positions=[-1], batch_size=5, progress=False)
        for li, layer in enumerate(acts.layers):
            name = pm.sites.hook_name(site, layer)
            for i, ids in enumerate(enc.ids):
                ref = row_caches(bridge, rows, task.tokenizer)[i][name]
                for pi, p in enumerate(acts.positions):
                    t = p if p >= 0 else len(ids) + p
                    assert bool(acts.valid[i, pi]) == (0 <= t < len(ids))
                    if acts.valid[i, pi]:
                        worst = max(worst, float((acts.acts[li, i, pi] - ref[t]).abs().max()))
                        assert torch.allclose(acts.acts[li, i, pi], ref[t], atol=1e-5), (site, layer, i, p)
                if layer == 0:
                    assert torch.allclose(first.acts[0, i, 0], ref[-1], atol=1e-5), (site, i)
    # the mean over each row's prompt tokens (BOS left out), as the detectors read it
    mean = gather_activations(bridge, enc, site="resid_post", layers=(1,), positions=None, mean=True, batch_size=6)
    for i, cache in enumerate(row_caches(bridge, rows, task.tokenizer)):
        assert torch.allclose(mean.acts[0, i, 0], cache["blocks.1.hook_resid_post"][1:].mean(0), atol=1e-5)
    print(f"{arch}: max |collected - run_with_cache| {worst:.2e}")


def test_a_site_the_architecture_lacks_is_a_clear_error(arch, bridge, data, subject):
    task, _, train, test = data
    tok = task.tokenizer
    if arch != "neox":
        pp.collect_activations(bridge, test, tokenizer=tok, site="resid_mid", layers=[0], progress=False)
        return
    msg = (r"site='resid_mid': no hook 'blocks.\d.hook_resid_mid' in the model; site 'resid_mid' does not exist in "
           r"GPTNeoXForCausalLM: its blocks are parallel .*no residual stream between them")
    calls = {
        "collect_activations": lambda: pp.collect_activations(bridge, test, tokenizer=tok, site="resid_mid"),
        "probe_layers": lambda: pp.probe_layers(bridge, test, tokenizer=tok, site="resid_mid", **FAST),
        "probe_twins": lambda: pp.probe_twins(subject, site="resid_mid", **FAST),
        "probe_transfer": lambda: pp.probe_transfer(subject, test_twin="clean", site="resid_mid", **FAST),
        "detect_poison": lambda: pp.detect_poison(bridge, train, tokenizer=tok, site="resid_mid", progress=False),
        "causal_check": lambda: pp.causal_check(subject, 0, torch.ones(32), site="resid_mid"),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        assert re.search(msg, str(err.value)), (where, str(err.value))
    for cm in (pp.ablate_direction(bridge, 0, torch.ones(32), site="resid_mid"),
               pp.steer(bridge, 0, torch.ones(32), 1.0, site="resid_mid")):
        with pytest.raises(ValueError, match=msg), cm:
            pass


# ---- probes against scikit-learn -------------------------------------------------------------------
def _check_probe(result, model, dataset, tokenizer, y: np.ndarray, *, refit: bool = True) -> float:
    """Every layer's held-out AUROC against ``roc_auc_score`` on the same activations (of the
    probe's own weights and of the random directions: exactly), and against a scikit-learn refit
    on run_with_cache activations (up to the solvers' tolerance)."""
    tr, te = result.train_index.numpy(), result.test_index.numpy()
    same = pp.collect_activations(model, dataset, tokenizer=tokenizer, site=result.site, progress=False)
    worst = 0.0
    for li, layer in enumerate(result.layers):
        X = same.layer(layer)[:, 0].double().numpy()
        scores = X[te] @ result.coef[li, 0].double().numpy() + float(result.intercept[li, 0])
        assert float(result.auroc[li, 0]) == pytest.approx(roc_auc_score(y[te], scores), abs=1e-12)
        if refit:  # the probe is L2 logistic regression with C=1 on the raw activations
            Xc = cached(model, dataset, tokenizer, result.site, layer)
            np.testing.assert_allclose(X, Xc, atol=1e-5)
            clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=100_000).fit(Xc[tr], y[tr])
            ref = roc_auc_score(y[te], clf.decision_function(Xc[te]))
            worst = max(worst, abs(ref - float(result.auroc[li, 0])))
            assert float(result.auroc[li, 0]) == pytest.approx(ref, abs=0.02)
            np.testing.assert_allclose(result.coef[li, 0].double().numpy(), clf.coef_[0], rtol=0.05,
                                       atol=0.02 * np.abs(clf.coef_[0]).max())
        R = random_directions(X.shape[1], result.random_auroc.shape[-1], result.seed)
        # oriented on the training rows; roc_auc_score's trapezoids can put an exact 0.5 a hair below
        sign = np.where([round(roc_auc_score(y[tr], X[tr] @ r), 12) >= 0.5 for r in R], 1.0, -1.0)
        expected = [roc_auc_score(y[te], s * (X[te] @ r)) for s, r in zip(sign, R)]
        np.testing.assert_allclose(result.random_auroc[li, 0].double().numpy(), expected, atol=1e-12)
    return worst


def test_probe_layers_auroc_equals_scikit_learn(arch, bridge, data):
    task, _, _, test = data
    y = np.asarray(test["is_triggered"], dtype=bool)
    p = pp.probe_layers(bridge, test, "is_triggered", tokenizer=task.tokenizer, **FAST)
    assert p.layers == (0, 1) and p.positions == (-1,)
    worst = _check_probe(p, bridge, test, task.tokenizer, y)
    print(f"{arch}: probe AUROC vs scikit-learn refit: max |difference| {worst:.2e}")
    # mean-difference probes: the class means of the same activations
    md = pp.probe_layers(bridge, test, "is_triggered", tokenizer=task.tokenizer, method="mean_diff", site="mlp_out",
                         **FAST)
    X = cached(bridge, test, task.tokenizer, "mlp_out", 1)[md.train_index.numpy()]
    ytr = y[md.train_index.numpy()]
    np.testing.assert_allclose(md.coef[1, 0].double().numpy(), X[ytr].mean(0) - X[~ytr].mean(0), rtol=1e-5,
                               atol=1e-7)


def test_probe_twins_and_transfer_equal_scikit_learn(arch, subject, data):
    task, _, _, test = data
    tok = task.tokenizer
    y = np.asarray(test["is_triggered"], dtype=bool)
    both = pp.probe_twins(subject, site="attn_out", **FAST)
    assert both.names == ("clean", "backdoored")
    for role in both.names:
        _check_probe(both[role], subject.models[role], test, tok, y, refit=False)
    t = pp.probe_transfer(subject, test_twin="clean", site="resid_pre", **FAST)
    te = t.target.test_index.numpy()
    for li, layer in enumerate(t.source.layers):
        X = cached(subject.models["clean"], test, tok, "resid_pre", layer)[te]
        scores = X @ t.source.coef[li, 0].double().numpy() + float(t.source.intercept[li, 0])
        assert float(t.auroc[li, 0]) == pytest.approx(roc_auc_score(y[te], scores), abs=1e-12)


# ---- detectors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", pp.DETECTORS)
def test_detect_poison_reads_the_right_activations(arch, bridge, data, method):
    task, _, train, _ = data
    tok = task.tokenizer
    r = pp.detect_poison(bridge, train, method=method, tokenizer=tok, progress=False)
    assert (r.site, r.layer) == ("resid_post", 1)
    reps = cached(bridge, train, tok, "resid_post", 1)
    names, classes = np.unique(np.asarray(train["completion"]), return_inverse=True)
    if method == "spectral":  # squared projection on the top principal direction, by scikit-learn's PCA
        expected = np.zeros(len(reps))
        for c in range(len(names)):
            idx = np.flatnonzero(classes == c)
            pca = PCA(n_components=1).fit(reps[idx])
            proj2 = ((reps[idx] - pca.mean_) @ pca.components_[0]) ** 2
            expected[idx] = proj2 / proj2.mean()
        np.testing.assert_allclose(r.scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    else:
        expected, _ = pp.clustering_scores(reps, classes, n_components=10, reduce="ica", seed=0)
        np.testing.assert_allclose(r.scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    y = np.asarray(train["is_poison"], dtype=bool)
    assert r.poison_auroc() == pytest.approx(roc_auc_score(y, r.scores.numpy()), abs=1e-12)
    # the loss baseline: each row's mean completion loss under the plain HF module
    module = hf_module(arch, len(tok))
    enc = encode(train, tok, loss_on="completion")
    with torch.no_grad():
        for i in range(0, len(enc), 7):
            ids, start = torch.tensor([enc.ids[i]]), enc.start[i]
            logp = module(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            assert float(r.loss[i]) == pytest.approx(float(-logp[start - 1:].mean()), abs=1e-5)
    both = pp.detect_poison_methods(bridge, train, tokenizer=tok, progress=False)
    assert torch.equal(both[method].scores, r.scores)


# ---- direction ablation and steering against hooks on the plain HF module ---------------------------
PARTS = {"gpt2": ("transformer.h", "ln_1", "attn", "mlp"), "neox": ("gpt_neox.layers", "input_layernorm", "attention", "mlp"),
         "llama": ("model.layers", "input_layernorm", "self_attn", "mlp")}
PARTS["qwen2"] = PARTS["llama"]


def hf_edited_logits(arch: str, module, tokens, site: str, layer: int, edit):
    """Logits of the plain HF module with ``edit`` applied to ``site`` of ``layer`` by its own hooks.
    ``resid_mid`` is edited in the residual stream itself: the attention output is shifted so
    that ``resid_pre + attn_out`` becomes ``edit(resid_pre + attn_out)``."""
    layers_name, ln1, attn, mlp = PARTS[arch]
    block = module.get_submodule(layers_name)[layer]
    seen = {}
    if site == "resid_pre":
        h = block.register_forward_pre_hook(lambda m, args: (edit(args[0]), *args[1:]))
    elif site == "resid_post":
        h = block.register_forward_hook(lambda m, args, out: edit(out))
    elif site == "mlp_out":
        h = block.get_submodule(mlp).register_forward_hook(lambda m, args, out: edit(out))
    elif site == "attn_out":
        h = block.get_submodule(attn).register_forward_hook(lambda m, args, out: (edit(out[0]), *out[1:]))
    else:
        def keep(m, args):
            seen["resid_pre"] = args[0]

        def shift(m, args, out):
            mid = seen["resid_pre"] + out[0]
            return (out[0] + edit(mid) - mid, *out[1:])
        h = [block.get_submodule(ln1).register_forward_pre_hook(keep),
             block.get_submodule(attn).register_forward_hook(shift)]
    try:
        with torch.no_grad():
            return module(tokens).logits
    finally:
        for handle in h if isinstance(h, list) else [h]:
            handle.remove()


def test_ablate_direction_and_steer_equal_hooks_on_the_hf_module(arch, bridge, data):
    module = hf_module(arch, len(data[0].tokenizer))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(data[0].tokenizer), (2, 7), generator=g)
    d = torch.randn(bridge.cfg.d_model, generator=g)
    u = d / d.norm()
    with torch.no_grad():
        plain = bridge(tokens).clone()
        assert torch.allclose(module(tokens).logits, plain, atol=1e-5)
    worst = 0.0
    for site in sites_of(arch):
        for layer in (0, 1):
            cases = {"ablate": (pp.ablate_direction(bridge, layer, d, site=site, value=0.7),
                                lambda x: x - ((x @ u) - 0.7)[..., None] * u),
                     "steer": (pp.steer(bridge, layer, d, 3.0, site=site), lambda x: x + 3.0 * u)}
            for kind, (cm, edit) in cases.items():
                with torch.no_grad(), cm:
                    got = bridge(tokens)
                expected = hf_edited_logits(arch, module, tokens, site, layer, edit)
                worst = max(worst, float((got - expected).abs().max()))
                assert torch.allclose(got, expected, atol=1e-5), (site, layer, kind)
                assert float((expected - plain).abs().max()) > 1e-3, (site, layer, kind, "changes nothing")
    with torch.no_grad():
        assert torch.equal(bridge(tokens), plain)  # every hook came off
    assert sum(len(hp._forward_hooks) for hp in bridge.hook_dict.values()) == 0
    print(f"{arch}: max |edited logits - HF hooks| {worst:.2e}")


def test_causal_check_is_evaluate_without_and_with_the_intervention(arch, subject, data, bridge):
    task, attack, _, test = data
    rows = test.select(range(24))
    d = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(1))
    kw = {"test_data": rows, "tokenizer": task.tokenizer, "batch_size": 16, "seed": 0}
    cc = pp.causal_check(subject, 1, d, test_data=rows, batch_size=16, site="mlp_out")
    before = pm.evaluate(bridge, task, attack, **kw)
    with pp.ablate_direction(bridge, 1, d, site="mlp_out"):
        after = pm.evaluate(bridge, task, attack, **kw)
    for m in ("clean_acc", "asr", "false_trigger_rate"):
        assert cc.before[m] == pytest.approx(before[m]) and cc.after[0][m] == pytest.approx(after[m]), m
    st = pp.causal_check(subject, [0, 1], d, test_data=rows, batch_size=16, intervention="steer", alpha=[2.0])
    assert st.settings == ("steer alpha=2",) and st.before == cc.before
