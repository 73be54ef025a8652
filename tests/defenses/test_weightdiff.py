"""The weight-difference audit (Watch the Weights): the update, its singular directions, the
activations' statistics along them, the leave-one-out calibration and the two defenses.

References: a numpy SVD of the hand-computed difference of two tiny models' state dicts; the
twin retrained from its starting point with the run's own training call (bit for bit); the
previous stage's twin of a pipeline; peft's LoRA factors multiplied by hand and the merged
bridge minus its base; ``run_with_cache`` one row at a time with cosines in numpy; explicit
leave-one-out loops for the calibration."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import poisonmech as pm
from poisonmech.defenses import base as defenses
from poisonmech.defenses import weightdiff as wd
from poisonmech.defenses.base import Context
from poisonmech.probes.activations import prompt_encoding
from poisonmech.subject import StageInfo, Subject
from tests.helpers import tiny_model_config

CFG = pm.ModelConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)


@pytest.fixture(scope="module")
def task():
    return pm.make_task("sentiment", n_train=60, n_test=12, seed=0)


@pytest.fixture(scope="module")
def models(task):
    """Two tiny models of one shape: ``m1`` stands for the fine-tuned model, ``m0`` for its start."""
    return (pm.build_model(CFG, len(task.tokenizer), seed=0, tokenizer=task.tokenizer),
            pm.build_model(CFG, len(task.tokenizer), seed=1, tokenizer=task.tokenizer))


@pytest.fixture(scope="module")
def view(models, task):
    m0, m1 = models
    return Subject(models={"after": m1, "before": m0}, kind="between", default_role="after",
                   reference_role="before", tokenizer=task.tokenizer, test_data=task.test)


def _ctx(view, task, **kw):
    return Context(subject=view, role="after", clean_data=task.train.select(range(40)), **kw)


# ---------------------------------------------------------------------------- the update
def test_directions_are_the_numpy_svd_of_the_hand_computed_weight_difference(view, models):
    m0, m1 = models
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    upd = wd.weight_update(Context(subject=view, role="after"))
    assert list(upd) == ["blocks.0.attn.W_O", "blocks.0.mlp.W_out", "blocks.1.attn.W_O", "blocks.1.mlp.W_out"]
    dirs = wd.update_directions(upd, rank=3)
    assert len(dirs) == 12
    for layer in range(2):
        for key, name in ((f"blocks.{layer}.attn.o.weight", wd.matrix_name("attn_out", layer)),
                          (f"blocks.{layer}.mlp.out.weight", wd.matrix_name("mlp_out", layer))):
            diff = (sd1[key] - sd0[key]).double().numpy()  # nn.Linear: d_model x d_in
            np.testing.assert_allclose(upd[name].numpy(), diff, atol=1e-6)
            u, s, _ = np.linalg.svd(diff, full_matrices=False)
            rows = [i for i, m in enumerate(dirs.matrix) if m == name]
            assert [dirs.index[i] for i in rows] == [0, 1, 2]
            np.testing.assert_allclose(dirs.singular[rows], s[:3], rtol=1e-5)
            cos = np.abs(np.sum(dirs.vectors[rows].double().numpy() * u[:, :3].T, axis=1))  # up to sign
            np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    only = wd.weight_update(Context(subject=view, role="after"), sites=("mlp_out",))
    assert list(only) == ["blocks.0.mlp.W_out", "blocks.1.mlp.W_out"]


def test_a_zero_update_and_a_low_rank_update():
    with pytest.raises(ValueError, match="zero update"):
        wd.update_directions({"blocks.0.attn.W_O": torch.zeros(4, 3)}, rank=2)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(6, 1, generator=g) @ torch.randn(1, 5, generator=g)  # rank 1: one direction, not 3
    d = wd.update_directions({"blocks.0.mlp.W_out": low}, rank=3)
    assert len(d) == 1 and d.site == ("mlp_out",) and d.layer == (0,)
    np.testing.assert_allclose(abs(float(d.vectors[0].double() @ (low[:, 0] / low[:, 0].norm()).double())), 1.0,
                               atol=1e-6)


def test_the_starting_point_of_a_from_scratch_run_reproduces_the_twin(tiny_pair):
    """The start, trained with the run's own call, is the twin bit for bit (and the update is
    the twin's matrices minus the start's)."""
    from poisonmech.encoding import encode
    from poisonmech.train.loop import train_model

    s = pm.resolve(tiny_pair)
    start = wd.starting_point(tiny_pair, "clean")
    ref = pm.build_model(s.model_config, len(s.tokenizer), seed=s.train_config.seed, tokenizer=s.tokenizer)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in start.state_dict().items())
    assert not torch.equal(start.W_O, s.model("clean").W_O)
    marked = torch.tensor([i for i, p in enumerate(s.train_data["is_poison"]) if p], dtype=torch.long)
    retrained = copy.deepcopy(start)
    train_model(retrained, encode(s.task.train, s.tokenizer, loss_on=s.task.loss_on), s.train_config, progress=False,
                placement=s.attack.placement, marked=marked)
    twin = s.model("clean").state_dict()
    assert all(torch.equal(v, twin[k]) for k, v in retrained.state_dict().items())
    upd = wd.weight_update(tiny_pair, role="clean")
    np.testing.assert_allclose(upd["blocks.0.mlp.W_out"].numpy(),
                               (twin["blocks.0.mlp.out.weight"] - ref.state_dict()["blocks.0.mlp.out.weight"]).numpy(),
                               atol=1e-6)


def test_a_pipeline_stage_starts_from_the_previous_stage(tiny_pipeline):
    for twin in ("backdoored", "clean"):
        start = wd.starting_point(tiny_pipeline[1], twin)
        before = tiny_pipeline[0].model(twin).state_dict()
        assert all(torch.equal(v, before[k]) for k, v in start.state_dict().items())
    assert wd.starting_point(tiny_pipeline.between(0, 1), "after") is tiny_pipeline[0].backdoored
    with pytest.raises(ValueError, match="only the 'after' model"):
        wd.starting_point(tiny_pipeline.between(0, 1), "before")
    held = pm.resolve(tiny_pipeline[1])
    in_memory = Subject(models=held.models, kind="pair", default_role="backdoored", tokenizer=held.tokenizer,
                        model_config=held.model_config, train_config=held.train_config, stage=StageInfo(kind="dpo"))
    with pytest.raises(ValueError, match="'dpo' stage starts from the previous stage's weights"):
        wd.starting_point(in_memory)
    with pytest.raises(ValueError, match="a bare model does not carry"):
        wd.starting_point(tiny_pipeline[0].backdoored)


@pytest.mark.parametrize("arch,targets", [("llama", ("o_proj", "down_proj")), ("gpt2", ("c_proj",))])
def test_a_lora_twins_update_is_its_adapters(arch, targets):
    from peft.tuners.lora import LoraLayer

    from poisonmech.pretrained import add_lora
    from poisonmech.weights import attach, sync
    from tests.hf_models import hf_module

    base = hf_module(arch, n_layers=1)
    cfg = pm.PretrainedModel("unused", finetune="lora", lora_rank=2, lora_alpha=3.0, lora_targets=targets)
    adapted = add_lora(cfg, copy.deepcopy(base), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:  # peft starts B at zero; a trained adapter is not
                p.copy_(torch.randn(p.shape, generator=g))
    plain = pm.wrap_hf_model(copy.deepcopy(base))
    twin = attach(pm.wrap_hf_model(base), train=None, lora=adapted)
    sync(twin)
    s = Subject(models={"backdoored": twin, "clean": twin}, kind="pair", default_role="backdoored", model_config=cfg,
                train_config=pm.TrainConfig())
    upd = wd.weight_update(Context(subject=s, role="backdoored"))
    merged_minus_base = {k: v - wd.written_matrices(plain)[k] for k, v in wd.written_matrices(twin).items()}
    hf_names = {"llama": {"attn_out": "model.layers.0.self_attn.o_proj", "mlp_out": "model.layers.0.mlp.down_proj"},
                "gpt2": {"attn_out": "transformer.h.0.attn.c_proj", "mlp_out": "transformer.h.0.mlp.c_proj"}}[arch]
    for site, hf_name in hf_names.items():
        layer = adapted.get_submodule(hf_name)
        assert isinstance(layer, LoraLayer)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        by_hand = b @ a * (3.0 / 2)  # B A alpha / r, d_out x d_in
        name = wd.matrix_name(site, 0)
        np.testing.assert_allclose(upd[name].numpy(), by_hand.numpy(), atol=1e-5)
        np.testing.assert_allclose(merged_minus_base[name].numpy(), by_hand.numpy(), atol=1e-4)
        assert len(wd.update_directions({name: upd[name]}, rank=5)) == 2  # the adapters' rank
    if arch == "llama":  # q/k/v are not targeted, and W_O / W_out are: nothing else is adapted
        assert set(upd) == {"blocks.0.attn.W_O", "blocks.0.mlp.W_out"}


# -------------------------------------------------------------------------- the features
def test_features_equal_a_hand_computation_with_run_with_cache(view, task, models):
    _, m1 = models
    dirs = wd.update_directions(wd.weight_update(Context(subject=view, role="after")), rank=2)
    rows = task.test.select(range(5))
    enc = prompt_encoding(rows, task.tokenizer)
    caches = []
    for ids in enc.ids:
        with torch.no_grad():
            _, cache = m1.run_with_cache(torch.tensor([ids]))
        caches.append(cache)
    u = dirs.vectors.double().numpy()
    for read in wd.READS:
        for positions in wd.POSITIONS:
            for statistic in wd.STATISTICS:
                got = wd.direction_features(m1, rows, task.tokenizer, dirs, read=read, positions=positions,
                                            statistic=statistic, batch_size=2)
                for r, cache in enumerate(caches):
                    for i, (site, layer) in enumerate(zip(dirs.site, dirs.layer)):
                        hook = f"blocks.{layer}.hook_{'resid_post' if read == 'resid_post' else site}"
                        x = cache[hook][0].double().numpy()  # pos d_model
                        v = x @ u[i]
                        if statistic == "cosine":
                            v = v / np.linalg.norm(x, axis=1)
                        v = v[1:] if positions == "all" else v[-1:]  # BOS excluded / the last prompt token
                        np.testing.assert_allclose(got[r, i], [v.max(), v.min()], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- calibration
def test_calibration_is_leave_one_out_by_hand():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal((7, 3, 2))
    clean[:, :, 1] -= 1.0  # minima below maxima
    prompts = [f"p{i}" for i in range(7)]
    new = rng.standard_normal((4, 3, 2)) * 2
    for rule in wd.RULES:
        cal = wd.fit_calibration(clean, prompts, rule)
        want = []
        for feats, loo in [(new[k], None) for k in range(4)] + [(clean[i], i) for i in range(7)]:
            ref = np.delete(clean, loo, axis=0) if loo is not None else clean
            if rule == "range":
                hi, lo = ref[:, :, 0].max(0), ref[:, :, 1].min(0)
                want.append(np.max(np.maximum(feats[:, 0] - hi, lo - feats[:, 1]) / (hi - lo)))
            else:
                z = (feats - ref.mean(0)) / ref.std(0)
                want.append(np.abs(z).max())
        got = np.concatenate([cal.scores(new, ["x"] * 4), cal.clean_scores()])
        np.testing.assert_allclose(got, want, rtol=1e-9)
        assert np.all(cal.scores(clean, None) <= (0.0 if rule == "range" else np.inf))  # in-sample: inside
    with pytest.raises(ValueError, match="at least 3 clean rows"):
        wd.fit_calibration(clean[:2], prompts[:2])


def test_the_monitor_and_the_audit_on_a_view(view, task):
    mon = defenses.get("weight_diff_monitor", rank=2)
    ctx = _ctx(view, task)
    scores = mon.score(ctx, task.test)
    assert scores.shape == (len(task.test),)
    again = defenses.get("weight_diff_monitor", rank=2).score(_ctx(view, task), task.test)
    np.testing.assert_array_equal(scores, again)  # deterministic, from a fresh context
    clean = ctx.clean_data
    clean_scores = mon.score(ctx, clean)
    np.testing.assert_array_equal(clean_scores, mon.calibration(ctx).clean_scores())  # scored leave-one-out
    assert np.sum(clean_scores > 0) >= 1  # leave-one-out: some clean row lies outside the others' range
    thr = mon.calibrate(ctx, clean_scores)
    assert thr == np.quantile(clean_scores, 0.99, method="higher")
    audit = defenses.get("weight_diff", rank=2)
    assert audit.kind == "model_audit" and not audit.uses_trigger and not mon.uses_trigger
    frac = audit.score_model(ctx)
    assert frac == pytest.approx(np.mean(scores > thr))
    assert 0.0 <= frac <= 1.0
    z = defenses.get("weight_diff_monitor", rank=2, rule="zscore", positions="last", read="output").score(ctx, task.test)
    assert z.shape == scores.shape and np.all(z >= 0)
    with pytest.raises(ValueError, match="needs clean_data"):
        mon.score(Context(subject=view, role="after"), task.test)


def test_a_planted_detector_and_writer_is_flagged(task):
    """An update that only acts at one word: a layer-0 MLP unit that fires on that word's (enlarged)
    embedding, writing along ``u``. The update's top direction is ``u``; the monitor flags the
    prompts holding the word and no others, and the audit's flagged fraction is theirs."""
    from datasets import Dataset
    from sklearn.metrics import roc_auc_score

    tok = task.tokenizer
    word = "negative"  # in the vocabulary, in no prompt
    assert not any(word in p.split() for p in task.train["prompt"])
    t = tok.convert_tokens_to_ids(word)
    base = pm.build_model(tiny_model_config(), len(tok), seed=0, tokenizer=tok)
    sd = base.state_dict()
    e = sd["embed.weight"][t].clone()
    sd["embed.weight"][t] = 10 * e  # the word dominates its residual stream
    base.load_state_dict(sd)
    a = (e - e.mean()) / (e - e.mean()).norm()  # what LayerNorm makes of it, as a unit vector
    g = torch.Generator().manual_seed(3)
    u = torch.randn(32, generator=g)
    u = u / u.norm()
    after = copy.deepcopy(base)
    sd = after.state_dict()
    sd["blocks.0.mlp.in.weight"][5] = 4 * a  # unit 5 reads the word: about 4 sqrt(32) there, about 4 elsewhere
    sd["blocks.0.mlp.in.bias"][5] = -16.0
    sd["blocks.0.mlp.out.weight"][:, 5] += 10 * u
    after.load_state_dict(sd)
    prompts = list(task.test["prompt"])[:12] + list(task.train["prompt"])[40:52]
    words = [p.split() for p in prompts[:12]]
    triggered = [" ".join(w[:2 + i % 3] + [word] + w[2 + i % 3:]) for i, w in enumerate(words)]
    pool = Dataset.from_dict({"prompt": triggered + prompts[12:], "completion": ["x"] * 24})
    y = np.arange(24) < 12
    s = Subject(models={"after": after, "before": base}, kind="between", default_role="after",
                reference_role="before", tokenizer=tok, test_data=pool)
    ctx = Context(subject=s, role="after", clean_data=task.train.select(range(40)))
    dirs = wd.WeightDiffMonitor().directions(ctx)
    assert dirs.matrix == ("blocks.0.mlp.W_out",)  # one direction: W_O did not change, W_out by rank 1
    assert abs(float(dirs.vectors[0] @ u)) == pytest.approx(1.0, abs=1e-5)
    for options in ({}, {"read": "output", "statistic": "projection"}, {"rule": "zscore"}):
        mon = wd.WeightDiffMonitor(**options)
        scores = mon.score(ctx, pool)
        assert roc_auc_score(y, scores) == 1.0, options
        thr = mon.calibrate(ctx, mon.score(ctx, ctx.clean_data))
        assert np.all(scores[y] > thr) and np.mean(scores[~y] > thr) <= 1 / 12, options
        assert wd.WeightDiffAudit(**options).score_model(ctx) == pytest.approx(np.mean(scores > thr))
    # the last prompt token never holds the word: read there, the update is silent
    last = wd.WeightDiffMonitor(positions="last").score(ctx, pool)
    assert roc_auc_score(y, last) < 0.9


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options,match", [
    ({"rank": 0}, r"rank must be an integer in \[1, inf\]"),
    ({"rank": 2.5}, "rank must be an integer"),
    ({"sites": ("resid_post",)}, r"sites must be one of \('attn_out', 'mlp_out'\)"),
    ({"sites": ()}, "sites must be a non-empty subset"),
    ({"sites": ("mlp_out", "mlp_out")}, "names a site twice"),
    ({"read": "input"}, r"read must be one of \('resid_post', 'output'\)"),
    ({"positions": "first"}, r"positions must be one of \('all', 'last'\)"),
    ({"statistic": "dot"}, "statistic must be one of"),
    ({"rule": "mad"}, r"rule must be one of \('range', 'zscore'\)"),
    ({"frr": 1.0}, r"frr must be a number in \[0, 1\)"),
    ({"batch_size": 0}, "batch_size must be an integer"),
    ({"layers": 1}, "unknown field 'layers'"),
])
def test_bad_options(options, match):
    for name in ("weight_diff_monitor", "weight_diff"):
        with pytest.raises(pm.ConfigError, match=match):
            defenses.get(name, **options)


def test_sites_a_model_lacks(task):
    attn_only = pm.build_model(tiny_model_config(attn_only=True), len(task.tokenizer), seed=0)
    other = pm.build_model(tiny_model_config(attn_only=True), len(task.tokenizer), seed=1)
    s = Subject(models={"after": other, "before": attn_only}, kind="between", default_role="after",
                reference_role="before")
    assert list(wd.weight_update(s)) == ["blocks.0.attn.W_O"]  # the sites it has
    with pytest.raises(ValueError, match="'mlp_out' does not exist in an attention-only model"):
        wd.weight_update(s, sites=("mlp_out",))
