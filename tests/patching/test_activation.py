"""Exact patching against transformer_lens.patching and against our own hooked reference path."""

import pytest
import torch
from transformer_lens import patching as tlp

import poisonmech as pm
from poisonmech.patching import PatchResult, activation_patch, cross_model_patch, logit_diff
from tests.helpers import small_model

TL_SWEEPS = [
    ("resid_pre", True, tlp.get_act_patch_resid_pre),
    ("attn_head", True, tlp.get_act_patch_attn_head_out_by_pos),
    ("attn_head", False, tlp.get_act_patch_attn_head_out_all_pos),
    ("mlp_out", True, tlp.get_act_patch_mlp_out),
    ("attn_out", True, tlp.get_act_patch_attn_out),
]


@pytest.mark.parametrize("arch", ["native", "gpt2"])
@pytest.mark.parametrize("site, by_position, tl_fn", TL_SWEEPS)
@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_matches_transformer_lens_per_example(arch, site, by_position, tl_fn, mode, tokens):
    model = small_model(arch)
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 4, 5]))  # positions differ per example
    base, src = (corrupted, clean) if mode == "denoise" else (clean, corrupted)
    _, src_cache = model.run_with_cache(src)
    ref = tl_fn(model, base, src_cache, metric, reduce="none").values
    ours = activation_patch(model, clean, corrupted, metric, site=site, by_position=by_position, mode=mode,
                            progress=False)
    assert ours.method == "exact-fast"
    assert ours.values.shape == ref.shape
    torch.testing.assert_close(ours.values, ref.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch, extra", [("native", {}), ("gpt2", {}), ("native", {"attn_only": True}),
                                         ("native", {"normalization_type": "RMS"})])
@pytest.mark.parametrize("by_position", [True, False])
def test_fast_engine_equals_stacked_hooks_on_every_site(arch, extra, by_position, tokens):
    model = small_model(arch, **extra)
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 3, 5]))
    for site in pm.patching.SITES:
        if extra.get("attn_only") and site in ("resid_mid", "mlp_out"):
            continue
        fast = activation_patch(model, clean, corrupted, metric, site=site, by_position=by_position,
                                backend="fast", progress=False)
        hooks = activation_patch(model, clean, corrupted, metric, site=site, by_position=by_position,
                                 backend="hooks", progress=False)
        torch.testing.assert_close(fast.values, hooks.values, atol=1e-4, rtol=0, msg=site)


def test_a_plain_callable_metric_reading_every_position(tokens):
    model = small_model()
    clean, corrupted = tokens

    def metric(logits):  # not a PositionalMetric: the engine must compute every position
        return logits[:, :, 3].mean(1)

    for site in ("resid_pre", "k", "mlp_out"):
        fast = activation_patch(model, clean, corrupted, metric, site=site, by_position=True, backend="fast", progress=False)
        hooks = activation_patch(model, clean, corrupted, metric, site=site, by_position=True, backend="hooks",
                                 progress=False)
        torch.testing.assert_close(fast.values, hooks.values, atol=1e-4, rtol=0)


def test_rotary_model_falls_back_to_hooks_with_a_warning(tokens):
    model = small_model(positional_embedding_type="rotary")
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 6, 6]))
    with pytest.warns(UserWarning, match="using stacked hooked forwards"):
        r = activation_patch(model, clean, corrupted, metric, site="resid_pre", by_position=True, progress=False)
    assert r.method == "exact-hooks"
    with pytest.raises(ValueError, match="backend='fast' cannot reproduce"):
        activation_patch(model, clean, corrupted, metric, site="resid_pre", backend="fast", progress=False)


def test_bad_input_is_named(tokens):
    model = small_model()
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 6, 6]))
    with pytest.raises(ValueError, match="site must be one of"):
        activation_patch(model, clean, corrupted, metric, site="embed")
    with pytest.raises(ValueError, match="same shape"):
        activation_patch(model, clean, corrupted[:, :5], metric)
    with pytest.raises(ValueError, match="mode must be one of"):
        activation_patch(model, clean, corrupted, metric, mode="both")
    with pytest.raises(ValueError, match=r"\[batch=3\] tensor\) or one scalar"):
        activation_patch(model, clean, corrupted, lambda lg: lg.sum(-1), progress=False)
    with pytest.raises(ValueError, match="does not exist in an attention-only model"):
        activation_patch(small_model(attn_only=True), clean, corrupted, metric, site="mlp_out")


def test_training_mode_is_restored_and_no_hooks_stay(tokens):
    model = small_model()
    model.train()
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 6, 6]))
    activation_patch(model, clean, corrupted, metric, site="attn_head", backend="hooks", progress=False)
    assert model.training

    def exploding(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        activation_patch(model, clean, corrupted, exploding, site="attn_head", backend="hooks", progress=False)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    assert model.training


def test_result_frame_plot_and_round_trip(tmp_path, tokens):
    model = small_model()
    clean, corrupted = tokens
    r = activation_patch(model, clean, corrupted, logit_diff(5, 6, torch.tensor([6, 6, 6])), site="attn_head",
                         by_position=True, progress=False)
    frame = r.to_frame()
    assert list(frame.columns[:4]) == ["site", "layer", "pos", "head"] and len(frame) == 2 * 7 * 2
    assert len(r.to_frame(per_example=True)) == 2 * 7 * 2 * 3
    torch.testing.assert_close(r.normalized[..., 0], (r.values[..., 0] - r.baseline[0]) / (r.reference[0] - r.baseline[0]))
    assert r.plot().data
    r.save(tmp_path / "r.safetensors")
    back = PatchResult.load(tmp_path / "r.safetensors")
    assert back.axes == r.axes and torch.equal(back.values, r.values) and back.site == "attn_head"


def test_cross_model_patch_matches_a_hand_hooked_swap(tiny_pair):
    tok = tiny_pair.tokenizer
    prompts = [r["prompt"] for r in tiny_pair.test_data if r["is_triggered"]][:4]
    ids = [tok(p)["input_ids"] for p in prompts]
    width = min(len(i) for i in ids)
    tokens = torch.tensor([i[:width] for i in ids])
    metric = logit_diff(tok.convert_tokens_to_ids("negative"), tok.convert_tokens_to_ids("positive"),
                        torch.full((4,), width - 1))
    r = cross_model_patch(tiny_pair, tokens, metric, site="attn_head", progress=False)
    _, donor = tiny_pair.clean.run_with_cache(tokens)

    def swap(z, hook):
        z = z.clone()
        z[:, :, 1] = donor["blocks.0.attn.hook_z"][:, :, 1]
        return z

    by_hand = metric(tiny_pair.backdoored.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", swap)]))
    torch.testing.assert_close(r.values[0, 1], by_hand, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.baseline, metric(tiny_pair.backdoored(tokens)), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.reference, metric(tiny_pair.clean(tokens)), atol=1e-5, rtol=0)
    assert r.roles == ("backdoored", "clean") and r.mode == "denoise"
    with pytest.raises(ValueError, match="direction must be one of"):
        cross_model_patch(tiny_pair, tokens, metric, direction="sideways")


def test_tokens_on_different_devices_get_a_clear_error(tokens):
    from poisonmech.patching import activation_patch, logit_diff

    model = small_model()
    clean, corrupted = tokens
    metric = logit_diff(1, 2, [6, 6, 6])
    with pytest.raises(ValueError, match="different devices"):
        activation_patch(model, clean, corrupted.to("meta"), metric, site="resid_pre")
