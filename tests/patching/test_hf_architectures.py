"""Exact and attribution patching on real Hugging Face architectures wrapped as TransformerBridge
(GPT-2; GPT-NeoX: parallel residual, partial rotary; Llama: RMSNorm, rotary, SwiGLU, no biases,
grouped-query attention; Qwen2: Llama with q/k/v biases), against TransformerLens' own patching.

The models are tiny and random, with their weights redrawn at unit scale: at HF's init scale
(std 0.02) attention is nearly uniform and a wrong query / key patch would still agree with
the reference to 1e-4, so the test could not fail.
"""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp
from transformer_lens.tools.analysis import attribution_patching as tl_atp

import poisonmech as pm
from poisonmech.patching import activation_patch, attribution_patch, cross_model_patch, logit_diff
from poisonmech.sites import SITES, hook_name, missing_site, site_heads
from poisonmech.subject import Subject
from poisonmech.tasks.tokenizer import build_word_tokenizer
from tests.hf_models import HF_ARCHS, hf_module

VOCAB, T = 60, 5
POSITIONS = torch.tensor([4, 2, 3])  # the metric reads a different position per example
TOL = 1e-4
_BRIDGES: dict[tuple[str, int], object] = {}


def sharp_bridge(arch: str, seed: int = 0):
    """``hf_module(arch)`` with every weight redrawn at unit scale (norm gains near 1), wrapped."""
    key = (arch, seed)
    if key not in _BRIDGES:
        module = hf_module(arch, VOCAB, seed=seed)
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.ndim == 2:  # projections and embeddings: ~unit-variance outputs
                    p.copy_(1.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                elif "norm" in name or ".ln" in name:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                else:  # biases
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        _BRIDGES[key] = pm.wrap_hf_model(module)
    return _BRIDGES[key]


def contrast(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (3, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, VOCAB, (3,), generator=g)
    return clean, corrupted


def metric():
    return logit_diff(5, 6, POSITIONS)


def _all_positions(act, index, src):
    act[:] = src
    return act


def tl_reference(model, site: str, by_position: bool, base, src_cache, fn, from_pos: int = 0):
    """``transformer_lens.patching`` on ``model`` for one of our sites, in our grid layout.

    By position, TL patches only the cells at positions ``>= from_pos``; the others hold the
    unpatched metric. With ``contrast()``'s runs, which agree before position 2, a patch
    there copies an activation onto itself, so that is TL's value too (and ours must match
    it), at a fraction of TL's one forward per cell.

    ``resid_mid`` goes through ``hook_attn_out`` with source ``attn_out + (src_mid - base_mid)``:
    TransformerLens 4 bridges alias ``hook_resid_mid`` to the MLP norm's input, so patching
    it there would not change the residual stream carried past the MLP (see
    ``test_resid_mid_alias_only_reaches_the_mlp``); at the attention output the same
    patch reaches both, as in a HookedTransformer.
    """
    g = tlp.generic_activation_patch
    act, cache = {"attn_head": "z"}.get(site, site), src_cache
    L = model.cfg.n_layers
    if site == "resid_mid":
        _, base_cache = model.run_with_cache(base)
        act = "attn_out"
        cache = {hook_name("attn_out", layer): base_cache[hook_name("attn_out", layer)]
                 + src_cache[hook_name("resid_mid", layer)] - base_cache[hook_name("resid_mid", layer)]
                 for layer in range(L)}
    per_head = SITES[site].per_head
    if not by_position:
        if site == "pattern":
            return tlp.get_act_patch_attn_head_pattern_all_pos(model, base, cache, fn, reduce="none").values
        setter, axes = (tlp.layer_head_vector_patch_setter, ("layer", "head")) if per_head else \
            (_all_positions, ("layer",))
        return g(model, base, cache, fn, patch_setter=setter, activation_name=act, index_axis_names=axes,
                 reduce="none").values
    heads = range(site_heads(model, site)) if per_head else [None]
    cells = [(layer, pos, head) for layer in range(L) for pos in range(from_pos, base.shape[1]) for head in heads]
    if site == "pattern":  # TL's pattern cells are (layer, head, dest)
        rows, setter = [(c[0], c[2], c[1]) for c in cells], tlp.layer_head_pos_pattern_patch_setter
    elif per_head:
        rows, setter = cells, tlp.layer_pos_head_vector_patch_setter
    else:
        rows, setter = [c[:2] for c in cells], tlp.layer_pos_patch_setter
    index = pd.DataFrame(rows, columns=[f"a{i}" for i in range(len(rows[0]))])
    values = g(model, base, cache, fn, patch_setter=setter, activation_name=act, index_df=index,
               reduce="none").values  # [cell batch]
    with torch.no_grad():
        baseline = fn(model(base)).float()
    shape = (L, base.shape[1]) + ((len(heads),) if per_head else ())
    out = baseline.expand(*shape, -1).clone()
    for (layer, pos, head), v in zip(cells, values):
        out[(layer, pos) + ((head,) if per_head else ())] = v
    return out


def sites_of(model) -> list[str]:
    return [s for s in SITES if missing_site(model, s) is None]


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_every_site_matches_transformer_lens(arch):
    """Every site the architecture has, by position or not, both modes, the fast engine and
    the stacked hooked forwards: equal to transformer_lens.patching within 1e-4. ``auto``
    takes the fast engine on all four (checked on every site; it is the same pass as
    ``fast`` once chosen). To keep the file fast, the noising direction (the same code with
    the two runs swapped) runs every site with the engine and the hooked path on the sites
    where it has its own code (resid_mid through attn_out, grouped keys, patterns)."""
    model = sharp_bridge(arch)
    clean, corrupted = contrast()
    m = metric()
    for mode in ("denoise", "noise"):
        base, src = (corrupted, clean) if mode == "denoise" else (clean, corrupted)
        _, src_cache = model.run_with_cache(src)
        for site in sites_of(model):
            for by_position in (False, True):
                if mode == "noise" and by_position and site not in ("k", "pattern"):
                    continue  # keeps the file fast: noise only swaps the two runs' roles
                ref = tl_reference(model, site, by_position, base, src_cache, m, from_pos=2).float()
                assert ref.std() > 0.05, f"{site}: the reference does not move; the test could not fail"
                backends = ("fast", "hooks", "auto") if mode == "denoise" and not by_position else \
                    ("fast", "hooks") if mode == "denoise" or site in ("resid_mid", "k", "pattern") else ("fast",)
                for backend in backends:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")  # auto must not fall back on these
                        r = activation_patch(model, clean, corrupted, m, site=site, by_position=by_position,
                                             mode=mode, backend=backend, progress=False)
                    assert r.method == ("exact-hooks" if backend == "hooks" else "exact-fast")
                    assert r.values.shape == ref.shape, (site, backend)
                    err = float((r.values - ref).abs().max())
                    assert err < TOL, (arch, site, by_position, mode, backend, err)


def test_a_metric_reading_every_position_on_grouped_rotary_heads():
    """A plain callable metric (no positions): the engine computes every position's logits."""
    model = sharp_bridge("qwen2")
    clean, corrupted = contrast()

    def fn(logits):
        return logits[:, :, 3].mean(1) - logits[:, -1, 7]

    _, src_cache = model.run_with_cache(clean)
    for site in ("resid_mid", "k", "v"):
        ref = tl_reference(model, site, True, corrupted, src_cache, fn, from_pos=2).float()
        r = activation_patch(model, clean, corrupted, fn, site=site, by_position=True, backend="fast", progress=False)
        torch.testing.assert_close(r.values, ref, atol=TOL, rtol=0)


def test_grouped_key_value_sites_have_one_cell_per_kv_head():
    model = sharp_bridge("llama")
    clean, corrupted = contrast()
    for site, heads in (("q", 4), ("k", 2), ("v", 2), ("attn_head", 4), ("pattern", 4)):
        r = activation_patch(model, clean, corrupted, metric(), site=site, by_position=True, progress=False)
        assert r.axes == ("layer", "pos", "head") and r.values.shape == (2, T, heads, 3), site


def test_resid_mid_alias_only_reaches_the_mlp():
    """Why the reference patches resid_mid through attn_out: on a TransformerLens 4 bridge an
    edit of hook_resid_mid reaches the MLP but not the residual stream carried past it."""
    model = sharp_bridge("llama")
    clean, _ = contrast()
    d = torch.randn(model.cfg.d_model)
    seen = {}

    def keeper(name):
        def keep(x, hook):
            seen[name] = x.detach().clone()
        return keep

    with torch.no_grad():
        model.run_with_hooks(clean, fwd_hooks=[("blocks.0.hook_resid_mid", lambda x, hook: x + d)] +
                             [(name, keeper(name)) for name in ("blocks.0.hook_resid_post", "blocks.0.hook_mlp_out")])
        _, plain = model.run_with_cache(clean)
    carried = seen["blocks.0.hook_resid_post"] - seen["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(carried, plain["blocks.0.hook_resid_mid"], atol=1e-5, rtol=0)  # edit not carried
    assert (seen["blocks.0.hook_mlp_out"] - plain["blocks.0.hook_mlp_out"]).abs().max() > 1e-3  # but the MLP saw it


def test_sites_an_architecture_lacks_are_named():
    model = sharp_bridge("neox")
    clean, corrupted = contrast()
    for backend in ("auto", "hooks", "fast"):
        with pytest.raises(ValueError, match=r"site 'resid_mid' does not exist in GPTNeoXForCausalLM.*parallel"):
            activation_patch(model, clean, corrupted, metric(), site="resid_mid", backend=backend, progress=False)
    with pytest.raises(ValueError, match=r"site 'resid_mid' does not exist in GPTNeoXForCausalLM"):
        attribution_patch(model, clean, corrupted, metric(), site="resid_mid")
    subject = Subject(models={"backdoored": model, "clean": sharp_bridge("neox", seed=1)}, kind="pair",
                      default_role="backdoored", reference_role="clean")
    with pytest.raises(ValueError, match=r"site 'resid_mid' does not exist in GPTNeoXForCausalLM"):
        cross_model_patch(subject, clean, metric(), site="resid_mid", progress=False)
    assert sites_of(model) == [s for s in SITES if s != "resid_mid"]
    assert all(sites_of(sharp_bridge(a)) == list(SITES) for a in ("gpt2", "llama", "qwen2"))


def test_an_unsupported_rotary_convention_is_refused_before_the_engine_and_patched_with_hooks():
    """Adjacent-pair rotary (GLM / ERNIE): the bridge itself follows the flag; the engine
    rotates halves, so it refuses (fast: an error naming the architecture and why; auto: a
    warning, then stacked hooked forwards equal to TransformerLens)."""
    module = hf_module("llama", VOCAB, seed=3)
    model = pm.wrap_hf_model(module)
    model.cfg.rotary_adjacent_pairs = True
    clean, corrupted = contrast()
    with pytest.raises(ValueError, match=r"backend='fast' cannot reproduce .*LlamaForCausalLM.*adjacent pairs"):
        activation_patch(model, clean, corrupted, metric(), site="k", backend="fast", progress=False)
    with pytest.warns(UserWarning, match="adjacent pairs.*using stacked hooked forwards"):
        r = activation_patch(model, clean, corrupted, metric(), site="k", by_position=True, progress=False)
    assert r.method == "exact-hooks"
    _, src_cache = model.run_with_cache(clean)
    ref = tl_reference(model, "k", True, corrupted, src_cache, metric(), from_pos=2).float()
    torch.testing.assert_close(r.values, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_cross_model_patch_between_two_seeds_matches_transformer_lens(arch):
    a, b = sharp_bridge(arch, seed=0), sharp_bridge(arch, seed=1)
    subject = Subject(models={"backdoored": a, "clean": b}, kind="pair", default_role="backdoored",
                      reference_role="clean")
    tokens, _ = contrast()
    cases = {"denoise": (("k", True), ("attn_head", False)), "noise": (("resid_pre", True), ("v", False))}
    for mode, (receiver, donor) in (("denoise", (a, b)), ("noise", (b, a))):
        _, donor_cache = donor.run_with_cache(tokens)
        for site, by_position in cases[mode]:
            ref = tl_reference(receiver, site, by_position, tokens, donor_cache, metric()).float()
            r = cross_model_patch(subject, tokens, metric(), site=site, by_position=by_position, mode=mode,
                                  progress=False)
            assert r.method == "exact-fast"
            torch.testing.assert_close(r.values, ref, atol=TOL, rtol=0, msg=f"{arch} {site} {mode}")


def test_results_label_positions_with_the_tokenizers_strings():
    tok = build_word_tokenizer([f"w{i}" for i in range(VOCAB - 4)])
    model = sharp_bridge("llama")
    clean, corrupted = contrast()
    subject = pm.resolve(model, tokenizer=tok)
    want = tuple(tok.convert_ids_to_tokens(corrupted[0].tolist()))
    exact = activation_patch(subject, clean, corrupted, metric(), site="resid_pre", by_position=True, progress=False)
    approx = attribution_patch(subject, clean, corrupted, metric(), site="resid_pre", by_position=True)
    assert exact.str_tokens == want and approx.str_tokens == want
    assert list(exact.to_frame()["token"][:T]) == list(want)


# ---------------------------------------------------------------------- attribution patching
def _grad_reference(model, site: str, base, src, m) -> torch.Tensor:
    """``(src - base) . d metric / d act`` per example, by position, from TransformerLens'
    own gradient capture (backward hooks on the bridge: ``cache_activation_and_gradient``)
    of the batch's summed metric (examples are independent, so each row's gradient is its
    own metric's). ``resid_mid``'s gradient is the one at ``hook_attn_out`` (the carried
    residual; the bridge's ``hook_resid_mid`` is the MLP input only)."""
    L = model.cfg.n_layers
    act_site, grad_site = site, "attn_out" if site == "resid_mid" else site
    # hook_embed too: without a cached point upstream of them, the backward hooks of the
    # converted head hooks (hook_z, hook_q ...) never fire and TL reports no gradient there
    names = sorted({hook_name(s, layer) for layer in range(L) for s in {act_site, grad_site}}) + ["hook_embed"]
    fn = lambda logits: m(logits).sum()  # noqa: E731
    b = tl_atp.cache_activation_and_gradient(model, base, fn, names_filter=names)
    s = tl_atp.cache_activation_and_gradient(model, src, fn, names_filter=names, compute_gradient=False)
    layers = []
    for layer in range(L):
        a, gname = hook_name(act_site, layer), hook_name(grad_site, layer)
        term = (s.activations[a] - b.activations[a]) * b.gradients[gname]
        layers.append(term.sum(-1).transpose(1, 2) if site == "pattern" else term.sum(-1))  # pattern: [n dest H]
    return torch.stack(layers).movedim(1, -1)  # [layer pos (head) batch]


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_attribution_equals_transformer_lens_gradients_on_every_site(arch):
    model = sharp_bridge(arch)
    clean, corrupted = contrast()
    m = metric()
    for site in sites_of(model):
        r = attribution_patch(model, clean, corrupted, m, site=site, by_position=True, qk_fix=False)
        ref = _grad_reference(model, site, corrupted, clean, m)
        assert ref.abs().max() > 1e-2, site
        torch.testing.assert_close(r.effect, ref.float(), atol=TOL, rtol=1e-4, msg=f"{arch} {site}")
        flat = attribution_patch(model, clean, corrupted, m, site=site, by_position=False, qk_fix=False)
        torch.testing.assert_close(flat.effect, ref.sum(1).float(), atol=TOL, rtol=1e-4, msg=f"{arch} {site} all pos")


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_attribution_node_scores_equal_transformer_lens_attribution_patch(arch):
    """TransformerLens' own attribution patching (node granularity: each head's hook_z and
    each MLP's output per position, averaged over the batch) is the same estimate."""
    model = sharp_bridge(arch)
    clean, corrupted = contrast()
    last = torch.full((3,), T - 1)
    m = logit_diff(5, 6, last)
    tl = tl_atp.attribution_patch(model, clean, corrupted, lambda lg: lg[0, -1, 5] - lg[0, -1, 6]).node_scores
    heads = attribution_patch(model, clean, corrupted, m, site="attn_head", by_position=True).effect.mean(-1)
    mlps = attribution_patch(model, clean, corrupted, m, site="mlp_out", by_position=True).effect.mean(-1)
    n_checked = 0
    for node, score in tl.items():
        if node.kind == "attn_head_out":
            ours = heads[node.layer, node.position, node.head]
        elif node.kind == "mlp_out":
            ours = mlps[node.layer, node.position]
        else:
            continue
        assert abs(float(ours) - score) < TOL * (1 + abs(score)), (arch, node, float(ours), score)
        n_checked += 1
    assert n_checked == model.cfg.n_layers * T * (model.cfg.n_heads + 1)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_qk_fix_is_the_exact_pattern_change_times_the_pattern_gradient(arch):
    """AtP*'s query / key estimate is ``(pattern after the patch - pattern) . d metric / d pattern``
    with the patched pattern exact: here the patched pattern comes from a real hooked run of
    the bridge (rotary, grouped keys and all) and the gradient from TransformerLens' capture."""
    model = sharp_bridge(arch)
    clean, corrupted = contrast()
    m = metric()
    L = model.cfg.n_layers
    names = [hook_name("pattern", layer) for layer in range(L)] + ["hook_embed"]
    grads = tl_atp.cache_activation_and_gradient(model, corrupted, lambda lg: m(lg).sum(), names_filter=names).gradients
    _, src_cache = model.run_with_cache(clean)
    _, base_cache = model.run_with_cache(corrupted)
    for site in ("q", "k"):
        r = attribution_patch(model, clean, corrupted, m, site=site, by_position=True, qk_fix=True)
        assert r.method == "attribution-qkfix"
        ref = torch.zeros_like(r.values)
        for layer in range(L):
            pname, name = hook_name("pattern", layer), hook_name(site, layer)
            for pos in range(2, T):  # before position 2 the runs agree: the patch changes nothing (ref 0)
                for head in range(r.values.shape[2]):
                    seen = {}

                    def patch(act, hook, pos=pos, head=head):
                        act = act.clone()
                        act[:, pos, head] = src_cache[hook.name][:, pos, head]
                        return act

                    def keep(act, hook, seen=seen):
                        seen["p"] = act.detach().clone()

                    with torch.no_grad():
                        model.run_with_hooks(corrupted, fwd_hooks=[(name, patch), (pname, keep)])
                    dP = seen["p"] - base_cache[pname]
                    ref[layer, pos, head] = (dP * grads[pname]).sum((1, 2, 3))
        assert ref.abs().max() > 1e-2
        torch.testing.assert_close(r.effect, ref, atol=TOL, rtol=1e-4, msg=f"{arch} {site}")
