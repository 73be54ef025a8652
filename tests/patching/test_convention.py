"""The calling convention in patching: any subject first, one config per analysis (keywords or
``config=``), deprecated aliases, batch-scalar metrics and the result's checked file format."""

import dataclasses

import pytest
import torch
from transformer_lens import patching as tlp

import poisonmech as pm
from poisonmech.config import ConfigError
from poisonmech.patching import (
    AttributionConfig,
    CrossModelPatchConfig,
    PatchConfig,
    PatchResult,
    activation_patch,
    attribution_patch,
    control_fn,
    cross_model_patch,
    logit_diff,
    neutral_words,
    trigger_contrast,
)
from poisonmech.results import ResultFormatError
from poisonmech.train.pipeline import Between
from tests.helpers import small_model


def _tc(pair):
    return trigger_contrast(pair, n=6)


def _between(pair) -> Between:
    """The backdoored twin 'before' (the clean twin's weights) and 'after' a stage, by hand."""
    return Between(before=pair.clean, after=pair.backdoored, twin="backdoored", stage_before="stage_0_sft",
                   stage_after="stage_1_sft", index_before=0, index_after=1, stage_kind="sft", task=pair.task,
                   attack=pair.attack, tokenizer=pair.tokenizer, train_data=pair.train_data, test_data=pair.test_data,
                   model_config=pair.model_config, train_config=pair.train_config,
                   metrics_before=pair.metrics["clean"], metrics_after=pair.metrics["backdoored"])


# ------------------------------------------------------------------------------ subjects
def test_every_kind_of_subject_gives_the_same_activation_patch(tiny_pair):
    tc = _tc(tiny_pair)
    metric = tc.logit_diff()
    kw = dict(site="attn_head", by_position=True, progress=False)
    ref = activation_patch(tiny_pair.backdoored, tc.triggered, tc.control, metric, **kw)
    for subject in (tiny_pair, str(tiny_pair.out_dir), tiny_pair.out_dir, pm.resolve(tiny_pair), _between(tiny_pair)):
        r = activation_patch(subject, tc.triggered, tc.control, metric, **kw)
        torch.testing.assert_close(r.values, ref.values, atol=1e-6, rtol=0, msg=type(subject).__name__)
        assert r.axes == ref.axes and r.str_tokens == ref.str_tokens
    clean = activation_patch(tiny_pair, tc.triggered, tc.control, metric, twin="clean", **kw)
    torch.testing.assert_close(clean.values,
                               activation_patch(tiny_pair.clean, tc.triggered, tc.control, metric, **kw).values)
    with pytest.raises(ValueError, match="twin must be one of"):
        activation_patch(tiny_pair.backdoored, tc.triggered, tc.control, metric, twin="clean", **kw)


def test_attribution_and_cross_model_accept_every_subject(tiny_pair):
    tc = _tc(tiny_pair)
    metric = tc.logit_diff()
    ref = attribution_patch(tiny_pair.backdoored, tc.triggered, tc.control, metric, site="attn_out")
    for subject in (tiny_pair, str(tiny_pair.out_dir)):
        r = attribution_patch(subject, tc.triggered, tc.control, metric, site="attn_out")
        torch.testing.assert_close(r.values, ref.values, atol=1e-6, rtol=0)
    cross = cross_model_patch(tiny_pair, tc.triggered, metric, progress=False)
    assert cross.site == "attn_head" and cross.roles == ("backdoored", "clean")
    torch.testing.assert_close(cross_model_patch(str(tiny_pair.out_dir), tc.triggered, metric, progress=False).values,
                               cross.values, atol=1e-6, rtol=0)
    # a before/after view: the model before's activations patched into the model after
    b = cross_model_patch(_between(tiny_pair), tc.triggered, metric, progress=False)
    assert b.roles == ("after", "before")
    torch.testing.assert_close(b.values, cross.values)
    with pytest.raises(ValueError, match="needs two models"):
        cross_model_patch(tiny_pair.backdoored, tc.triggered, metric, progress=False)


def test_direction_is_a_deprecated_alias_of_mode(tiny_pair):
    tc = _tc(tiny_pair)
    metric = tc.logit_diff()
    noise = cross_model_patch(tiny_pair, tc.triggered, metric, mode="noise", progress=False)
    assert noise.roles == ("clean", "backdoored")
    torch.testing.assert_close(noise.baseline, metric(tiny_pair.clean(tc.triggered)), atol=1e-5, rtol=0)
    with pytest.warns(DeprecationWarning, match="direction= is deprecated"):
        old = cross_model_patch(tiny_pair, tc.triggered, metric, direction="backdoored_to_clean", progress=False)
    torch.testing.assert_close(old.values, noise.values)
    with pytest.warns(DeprecationWarning):  # the twins' names keep working for a before/after view
        b = cross_model_patch(_between(tiny_pair), tc.triggered, metric, direction="clean_to_backdoored",
                              progress=False)
    with pytest.warns(DeprecationWarning):
        b2 = cross_model_patch(_between(tiny_pair), tc.triggered, metric, direction="before_to_after", progress=False)
    assert b.roles == b2.roles == ("after", "before")
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        cross_model_patch(tiny_pair, tc.triggered, metric, direction="clean_to_backdoored", mode="noise")


def test_contrast_builders_take_any_run_and_refuse_a_bare_model(tiny_pair):
    a = trigger_contrast(tiny_pair, n=6)
    for subject in (str(tiny_pair.out_dir), _between(tiny_pair)):
        b = trigger_contrast(subject, n=6)
        assert torch.equal(a.triggered, b.triggered) and torch.equal(a.control, b.control) and a.check == b.check
    assert neutral_words(_between(tiny_pair)) == neutral_words(tiny_pair)
    ids = a.triggered
    assert torch.equal(control_fn(str(tiny_pair.out_dir), seed=1)(ids), control_fn(tiny_pair, seed=1)(ids))
    model = tiny_pair.backdoored
    for fn in (trigger_contrast, control_fn, neutral_words):
        with pytest.raises(ValueError, match=rf"{fn.__name__} needs task.*pass a run"):
            fn(model)
    # a subject that carries a task and an attack but no model works for neutral_words
    s = dataclasses.replace(pm.resolve(model), task=tiny_pair.task, attack=tiny_pair.attack)
    assert neutral_words(s) == neutral_words(tiny_pair)
    with pytest.raises(TypeError, match="the subject must be one of"):
        trigger_contrast(42)


# ------------------------------------------------------------------------------- configs
def test_config_and_keywords_are_the_same_analysis(tokens):
    model = small_model()
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 4, 5]))
    kw = activation_patch(model, clean, corrupted, metric, site="k", by_position=True, mode="noise", progress=False)
    cfg = PatchConfig(site="k", by_position=True, mode="noise")
    by_cfg = activation_patch(model, clean, corrupted, metric, config=cfg, progress=False)
    as_dict = activation_patch(model, clean, corrupted, metric, config=cfg.to_dict(), progress=False)
    positional = activation_patch(model, clean, corrupted, metric, "k", config=PatchConfig(by_position=True,
                                                                                           mode="noise"),
                                  progress=False)
    for r in (by_cfg, as_dict, positional):
        assert torch.equal(r.values, kw.values) and r.mode == "noise" and r.site == "k"
    # keywords override the config's fields
    over = activation_patch(model, clean, corrupted, metric, config=cfg, mode="denoise", progress=False)
    assert over.mode == "denoise"
    a = attribution_patch(model, clean, corrupted, metric, config=AttributionConfig(site="q", qk_fix=False))
    assert torch.equal(a.values, attribution_patch(model, clean, corrupted, metric, site="q", qk_fix=False).values)
    assert CrossModelPatchConfig().site == "attn_head" and PatchConfig().site == "resid_pre"
    assert PatchConfig().mode == AttributionConfig().mode == "denoise"
    assert PatchConfig.from_dict(cfg.to_dict()) == cfg and cfg.fingerprint() == PatchConfig(**cfg.to_dict()).fingerprint()
    assert activation_patch.config_class is PatchConfig and "backend" in str(activation_patch.__signature__)


def test_bad_options_name_the_field_and_what_is_allowed(tokens):
    model = small_model()
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 6, 6]))
    with pytest.raises(ConfigError, match=r"unknown option 'bypos'.*options \(PatchConfig\): site, by_position, "
                                          r"mode, backend, max_rows"):
        activation_patch(model, clean, corrupted, metric, bypos=True)
    with pytest.raises(ConfigError, match=r"PatchConfig.mode must be one of \('denoise', 'noise'\), got 'both'"):
        activation_patch(model, clean, corrupted, metric, mode="both")
    with pytest.raises(ConfigError, match=r"PatchConfig.site must be one of \('resid_pre'.*got 'embed'"):
        activation_patch(model, clean, corrupted, metric, site="embed")
    with pytest.raises(ConfigError, match=r"PatchConfig.backend must be one of \('auto', 'fast', 'hooks'\)"):
        activation_patch(model, clean, corrupted, metric, backend="gpu")
    with pytest.raises(ConfigError, match=r"PatchConfig.max_rows must be an integer in \[1, inf\]"):
        activation_patch(model, clean, corrupted, metric, max_rows=0)
    with pytest.raises(ConfigError, match="by_position must be True or False"):
        activation_patch(model, clean, corrupted, metric, by_position="yes")
    with pytest.raises(ConfigError, match=r"unknown option 'backend'.*AttributionConfig.*qk_fix"):
        attribution_patch(model, clean, corrupted, metric, backend="fast")
    with pytest.raises(ConfigError, match="AttributionConfig.site must be one of"):
        attribution_patch(model, clean, corrupted, metric, site="embed")
    with pytest.raises(ConfigError, match="config must be a PatchConfig"):
        activation_patch(model, clean, corrupted, metric, config=AttributionConfig())


def test_method_is_a_deprecated_alias_of_backend(tokens):
    model = small_model()
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 6, 6]))
    new = activation_patch(model, clean, corrupted, metric, site="v", backend="hooks", progress=False)
    with pytest.warns(DeprecationWarning, match="use backend='hooks'"):
        old = activation_patch(model, clean, corrupted, metric, site="v", method="hooks", progress=False)
    assert old.method == new.method == "exact-hooks" and torch.equal(old.values, new.values)
    with pytest.raises(ConfigError, match="disagree"), pytest.warns(DeprecationWarning):
        activation_patch(model, clean, corrupted, metric, method="hooks", backend="fast")
    with pytest.raises(ConfigError, match="backend must be one of"), pytest.warns(DeprecationWarning):
        activation_patch(model, clean, corrupted, metric, method="eap")


# ----------------------------------------------------------------- batch-scalar metrics
@pytest.mark.parametrize("backend", ["fast", "hooks"])
def test_a_transformer_lens_scalar_metric_gives_one_value_per_cell(backend, tokens):
    model = small_model()
    clean, corrupted = tokens
    per_example = logit_diff(5, 6, torch.tensor([6, 4, 5]))

    def scalar(logits):  # transformer_lens.patching's kind of metric: one number for the batch
        return per_example(logits).mean()

    r = activation_patch(model, clean, corrupted, scalar, by_position=True, backend=backend, progress=False)
    assert not r.per_example and r.values.shape == (2, 7, 1) and r.baseline.shape == r.reference.shape == (1,)
    _, cache = model.run_with_cache(clean)
    tl = tlp.get_act_patch_resid_pre(model, corrupted, cache, scalar)  # [layer pos]
    torch.testing.assert_close(r.values[..., 0], tl.float(), atol=1e-4, rtol=0)
    ref = activation_patch(model, clean, corrupted, per_example, by_position=True, backend=backend, progress=False)
    torch.testing.assert_close(r.values[..., 0], ref.values.mean(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.baseline, ref.baseline.mean(0, keepdim=True), atol=1e-5, rtol=0)
    heads = activation_patch(model, clean, corrupted, scalar, site="attn_head", backend=backend, progress=False)
    assert heads.values.shape == (2, 2, 1)
    torch.testing.assert_close(heads.recovery, heads.normalized[..., 0], atol=1e-5, rtol=0)
    assert len(heads.to_frame()) == 4 and heads.plot().data
    assert "one value per cell" in repr(heads)


def test_a_scalar_metric_in_attribution_patching(tokens):
    # linear after the site: the first-order estimate is exact, for a batch mean as per example
    model = small_model(n_layers=1, normalization_type=None, attn_only=True)
    clean, corrupted = tokens
    per_example = logit_diff(5, 6, torch.tensor([6, 4, 5]))
    r = attribution_patch(model, clean, corrupted, lambda lg: per_example(lg).mean(), site="attn_head",
                          by_position=True)
    ref = attribution_patch(model, clean, corrupted, per_example, site="attn_head", by_position=True)
    assert not r.per_example and r.values.shape == (1, 7, 2, 1)
    torch.testing.assert_close(r.values[..., 0], ref.values.mean(-1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ result files
def test_result_files_are_tagged_and_other_kinds_refused(tmp_path, tokens):
    model = small_model()
    clean, corrupted = tokens
    r = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, 3].mean(), site="q", progress=False)
    path = r.save(tmp_path / "r.safetensors")
    back = PatchResult.load(path)
    assert back.per_example is False and torch.equal(back.values, r.values) and back.axes == r.axes
    pm.results.write_result(tmp_path / "other.safetensors", "probe", 1, {}, {"x": torch.zeros(1)})
    with pytest.raises(ResultFormatError, match="'probe' result"):
        PatchResult.load(tmp_path / "other.safetensors")
    pm.results.write_result(tmp_path / "newer.safetensors", "patch", 99, {}, {"x": torch.zeros(1)})
    with pytest.raises(ResultFormatError, match="newer poisonmech"):
        PatchResult.load(tmp_path / "newer.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a result")
    with pytest.raises(ResultFormatError, match="not a poisonmech result file"):
        PatchResult.load(tmp_path / "junk.safetensors")


def test_files_of_the_untagged_old_format_still_load(tmp_path, tokens):
    import json

    from poisonmech.storage import save_tensors

    model = small_model()
    clean, corrupted = tokens
    r = activation_patch(model, clean, corrupted, logit_diff(5, 6, torch.tensor([6, 6, 6])), site="attn_head",
                         progress=False)
    meta = {"axes": json.dumps(list(r.axes)), "site": r.site, "mode": r.mode, "method": r.method,
            "str_tokens": json.dumps(None)}  # what PatchResult.save wrote before format tags
    save_tensors(tmp_path / "old.safetensors", {"values": r.values, "baseline": r.baseline, "reference": r.reference},
                 metadata=meta)
    back = PatchResult.load(tmp_path / "old.safetensors")
    assert back.axes == r.axes and torch.equal(back.values, r.values) and back.per_example and back.roles is None


def test_sites_come_from_the_registry_and_check_inputs_still_works(tokens):
    from poisonmech.patching.activation import check_inputs
    from poisonmech.sites import SITES

    assert pm.patching.SITES == tuple(SITES) and isinstance(pm.patching.SITES, tuple)
    clean, corrupted = tokens
    a, b = check_inputs(small_model(), clean.int(), corrupted, "attn_head")
    assert a.dtype == b.dtype == torch.long and torch.equal(a, clean)
    with pytest.raises(ValueError, match="does not exist in an attention-only model"):
        check_inputs(small_model(attn_only=True), clean, corrupted, "resid_mid")
    with pytest.raises(ValueError, match="site must be one of"):
        check_inputs(small_model(), clean, corrupted, "embed")
