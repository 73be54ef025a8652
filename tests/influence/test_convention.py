"""The calling convention in the influence package: any subject first, one config, one rank of
scores, checked result files, and a patching metric as the measurement."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.config import ConfigError
from poisonmech.encoding import encode
from poisonmech.influence import (
    InfluenceConfig,
    InfluenceResult,
    LDSConfig,
    LDSResult,
    MetricQuery,
    RetrainResult,
    SubsetRetrains,
    attribute,
    backdoor_query,
    linear_datamodeling_score,
    retrain_without,
    subset_retrains,
    train_on_subset,
)
from poisonmech.influence.tracking import find_modules
from poisonmech.results import ResultFormatError
from poisonmech.storage import save_tensors
from poisonmech.train.pipeline import Between
from tests.helpers import map_params, tiny_model_config, tiny_task


# ------------------------------------------------------------------ any subject, first
@pytest.mark.parametrize("method", ["graddot", "ekfac", "loss"])
def test_pair_run_dir_and_bare_model_give_identical_scores(pair, method):
    q = backdoor_query(pair, max_queries=4)
    by_pair = attribute(pair, method=method, max_queries=4, progress=False)
    by_dir = attribute(str(pair.out_dir), method=method, max_queries=4, progress=False)
    bare = attribute(pair.backdoored, train=pair.train_data, query=q, method=method, progress=False)
    by_stage_subject = attribute(pm.resolve(pair), None, None, method, max_queries=4, progress=False)
    for other in (by_dir, bare, by_stage_subject):
        torch.testing.assert_close(other.scores, by_pair.scores)
        assert other.example_ids == by_pair.example_ids and other.query_text == by_pair.query_text


def test_config_and_keywords_are_one_list_of_options(pair):
    cfg = InfluenceConfig(method="graddot", aggregate=True, max_queries=3, renormalize="unit")
    a = attribute(pair, config=cfg, progress=False, cache_dir=None)
    b = attribute(pair, method="graddot", aggregate=True, max_queries=3, renormalize="unit", progress=False,
                  cache_dir=None)
    c = attribute(pair, config=cfg.to_dict(), progress=False, cache_dir=None)  # its dict, as TOML passes it
    d = attribute(pair, None, None, "graddot", config=cfg.replace(method="loss"), progress=False, cache_dir=None)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.scores, c.scores)
    assert d.method == "graddot"  # an explicit argument overrides the config's field
    assert InfluenceConfig.from_dict(cfg.to_dict()) == cfg and cfg.fingerprint() == InfluenceConfig.from_dict(
        json.loads(json.dumps(cfg.to_dict()))).fingerprint()
    assert InfluenceConfig(modules=["*mlp*"]).modules == ("*mlp*",)


def test_unknown_option_names_the_allowed_ones(pair):
    with pytest.raises(ConfigError, match=r"unknown option 'dampnig'.*InfluenceConfig.*damping.*projection_dim"):
        attribute(pair, dampnig=0.1)
    with pytest.raises(ConfigError, match=r"unknown field 'dampnig'.*allowed:.*damping"):
        InfluenceConfig.from_dict({"dampnig": 0.1})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("damping", -1, r"InfluenceConfig.damping must be a number in \[0, inf\] or None, got -1"),
    ("projection_dim", 0, r"InfluenceConfig.projection_dim must be an integer in \[1, inf\], got 0"),
    ("batch_size", 1.5, r"InfluenceConfig.batch_size must be an integer"),
    ("max_queries", 0, r"InfluenceConfig.max_queries must be an integer in \[1, inf\] or None"),
    ("fisher", "exact", r"InfluenceConfig.fisher must be one of \('mc', 'empirical'\)"),
    ("modules", "attention", r"InfluenceConfig.modules must be one of"),
    ("measurement", "accuracy", r"InfluenceConfig.measurement must be one of .*'logprob'.* or a metric"),
])
def test_out_of_range_options_name_the_field(pair, field, value, message):
    with pytest.raises(ConfigError, match=message):
        attribute(pair, **{field: value})
    with pytest.raises(ConfigError, match=message):
        InfluenceConfig(**{field: value})


def test_bare_model_needs_train_and_query(pair):
    with pytest.raises(ValueError, match=r"needs the training rows.*\(model, 'model'\).*pass train="):
        attribute(pair.backdoored, method="loss", progress=False)
    with pytest.raises(ValueError, match=r"carries no run's triggered test rows.*pass query="):
        attribute(pair.backdoored, train=pair.train_data, method="loss", progress=False)
    with pytest.raises(ValueError, match="twin must be one of \\('model',\\)"):
        attribute(pair.backdoored, train=pair.train_data, query=backdoor_query(pair), twin="clean")
    with pytest.raises(TypeError, match="the subject must be one of"):
        attribute(42)


def _between(pair) -> Between:
    """A before/after view over the pair's models (as ``pipe.between(a, b)`` gives: no checkpoints, no run dir)."""
    return Between(before=pair.clean, after=pair.backdoored, twin="backdoored", stage_before="stage_0_sft",
                   stage_after="stage_1_sft", index_before=0, index_after=1, stage_kind="sft", task=pair.task,
                   attack=pair.attack, tokenizer=pair.tokenizer, train_data=pair.train_data,
                   test_data=pair.test_data, model_config=pair.model_config, train_config=pair.train_config,
                   metrics_before={}, metrics_after={})


def test_between_has_no_checkpoints_or_run(pair, tmp_path):
    b = _between(pair)
    r = attribute(b, method="graddot", max_queries=3, progress=False)  # the later model, its stage's rows
    ref = attribute(pair, method="graddot", max_queries=3, progress=False)
    torch.testing.assert_close(r.scores, ref.scores)
    with pytest.raises(ValueError, match="tracin' needs the training checkpoints, and this subject has none"):
        attribute(b, method="tracin", max_queries=3, progress=False)
    with pytest.raises(ValueError, match="needs the training rows.*'before'.*pass train="):
        attribute(b, twin="before", method="loss", progress=False)
    with pytest.raises(ValueError, match="pipeline stages are not supported"):
        subset_retrains(b, n_subsets=3)
    from poisonmech.tasks.preference import make_preferences

    prefs = make_preferences(pair.task, 4)
    with pytest.raises(ValueError, match=r"between\(a, b\) view has no run directory.*pass reference="):
        attribute(b, train=prefs, method="graddot", max_queries=2, progress=False)
    r = attribute(b, train=prefs, method="graddot", max_queries=2, reference=b.before, beta=0.1, progress=False)
    assert r.scores.shape == (2, 4) and r.settings["preference_pairs"]


def test_retraining_needs_a_run(pair):
    for fn, args in ((retrain_without, ([1],)), (train_on_subset, ([1],)), (subset_retrains, ()),
                     (linear_datamodeling_score, (torch.zeros(3),))):
        with pytest.raises(ValueError, match="needs a run: its task, attack, model_config, train_config"):
            fn(pair.backdoored, *args)
    with pytest.raises(ConfigError, match=r"LDSConfig.n_bootstrap must be an integer in \[0, inf\]"):
        linear_datamodeling_score(pair, torch.zeros(3), n_bootstrap=-1)
    with pytest.raises(ConfigError, match=r"RetrainConfig.n_random"):
        retrain_without(pair, [1], n_random=-1)
    assert LDSConfig(n_subsets=5).subsets().n_subsets == 5


# ------------------------------------------------------------------ one rank, checked files
def test_scores_have_rank_two_and_round_trip(pair, tmp_path):
    agg = attribute(pair, method="graddot", aggregate=True, max_queries=3, progress=False)
    per = attribute(pair, method="graddot", max_queries=3, progress=False)
    assert agg.scores.ndim == per.scores.ndim == 2
    assert agg.scores.shape == (1, per.n_train) and per.scores.shape == (3, per.n_train) and agg.n_query == 3
    torch.testing.assert_close(agg.train_scores, per.train_scores, rtol=1e-4, atol=1e-6)
    for r in (agg, per):
        assert r.top(3)["score"].is_monotonic_decreasing and 0 <= r.poison_auroc() <= 1
        assert 0 <= r.precision_at(4) <= 1 and len(r.by_component()) > 0 and len(r.plot().data) == 5
        long = r.to_frame(per_query=True)
        assert len(long) == r.scores.shape[0] * r.n_train and set(long["query_text"]) == set(r.row_labels)
        r.save(tmp_path / "r.safetensors")
        back = InfluenceResult.load(tmp_path / "r.safetensors")
        torch.testing.assert_close(back.scores, r.scores)
        assert back.aggregated == r.aggregated and back.to_frame().equals(r.to_frame())
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        per.precision_at(0)
    with pytest.raises(ValueError, match="aggregated over queries"):
        agg.top(3, query=0)


def test_version_1_files_load_with_one_row(pair, tmp_path):
    agg = attribute(pair, method="loss", aggregate=True, max_queries=2, progress=False)
    meta = {"format": "poisonmech.influence/1", "method": agg.method, "example_ids": list(agg.example_ids),
            "train_text": list(agg.train_text), "query_text": list(agg.query_text), "is_poison": list(agg.is_poison),
            "component_labels": None, "settings": agg.settings, "aggregated": True}
    save_tensors(tmp_path / "v1.safetensors", {"scores": agg.scores[0].contiguous()},
                 metadata={"poisonmech": json.dumps(meta)})
    old = InfluenceResult.load(tmp_path / "v1.safetensors")
    assert old.scores.shape == (1, agg.n_train)
    torch.testing.assert_close(old.scores, agg.scores)


def test_result_files_of_another_kind_are_refused(pair, tmp_path):
    r = attribute(pair, method="loss", max_queries=2, progress=False)
    r.save(tmp_path / "inf.safetensors")
    retrains = SubsetRetrains(example_ids=(1, 2, 3), subsets=((1,), (2,), (3,)),
                              measurements=torch.tensor([[1.0], [2.0], [0.0]]), full=torch.tensor([1.5]),
                              query_text=("q",), n_poison=(0, 1, 0))
    lds = retrains.score(torch.tensor([[0.5, 2.0, -1.0]]), n_bootstrap=5)
    retrain = RetrainResult(removed_ids=(1,), random_ids=((2,),), n_poison_removed=1, n_poison_random=(0,),
                            metrics_removed={"asr": 0.1}, metrics_random=({"asr": 0.9},),
                            metrics_original={"asr": 1.0}, settings={"seed": 0})
    for obj, name in ((retrains, "retrains.json"), (lds, "lds.json"), (retrain, "retrain.json")):
        obj.save(tmp_path / name)
        back = type(obj).load(tmp_path / name)
        assert back.to_frame().equals(obj.to_frame()) and obj.plot().data
        with pytest.raises(ResultFormatError, match="holds a .* result .*not a InfluenceResult"):
            InfluenceResult.load(tmp_path / name)
    for cls in (LDSResult, SubsetRetrains, RetrainResult):
        with pytest.raises(ResultFormatError, match="'influence' result"):
            cls.load(tmp_path / "inf.safetensors")
    with pytest.raises(ResultFormatError, match="'lds' result"):
        SubsetRetrains.load(tmp_path / "lds.json")
    (tmp_path / "new.json").write_text(json.dumps({"format": "poisonmech.lds/9"}))
    with pytest.raises(ResultFormatError, match="newer poisonmech"):
        LDSResult.load(tmp_path / "new.json")


# ------------------------------------------------------------------ a patching metric as the measurement
@pytest.fixture(scope="module")
def tiny():
    task = tiny_task(n_train=12, n_test=4)
    model = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    train = task.train.select(range(5))
    tokens = torch.randint(1, len(task.tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))
    return task, model, train, tokens


def _flat(loss, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _train_grads(model, task, train, params) -> list[torch.Tensor]:
    enc = encode(train, task.tokenizer, loss_on="completion")
    out = []
    for j in range(len(train)):
        tokens, mask = enc.batch([j])
        logits = model(tokens)[:, :-1]
        out.append(_flat(torch.nn.functional.cross_entropy(logits[mask].float(), tokens[:, 1:][mask],
                                                           reduction="sum"), params))
    return out


def test_graddot_with_a_metric_is_the_dot_product_of_autograd_gradients(tiny):
    """Score of training row j for query row i: ``∇(-metric_i) · ∇L_j`` (L_j its summed NLL):
    positive = up-weighting row j raises the metric."""
    task, model, train, tokens = tiny
    metric = pm.patching.metrics.logit_diff(target=3, answer=torch.tensor([4, 5, 6]), positions=[6, 4, 5])
    res = attribute(model, train, tokens, "graddot", measurement=metric, batch_size=2, progress=False)
    params = map_params(model, find_modules(model, "linear"))
    gz = _train_grads(model, task, train, params)
    expected = torch.zeros(3, len(train))
    for i in range(3):
        gq = _flat(-metric(model(tokens))[i], params)
        for j in range(len(train)):
            expected[i, j] = gq @ gz[j]
    torch.testing.assert_close(res.scores, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert res.settings["query_measurement"] == "metric:LogitDiff" and res.settings["measurement"] == "metric:LogitDiff"
    assert res.n_query == 3 and len(res.query_text) == 3
    with pytest.warns(UserWarning, match="no stable hash"):
        InfluenceConfig(measurement=metric).fingerprint()

    # a metric without subset (one forward over the rows) and a TransformerLens-style scalar metric
    plain = attribute(model, train, tokens, "graddot", measurement=lambda logits: metric(logits), progress=False)
    # float32 sums over other batch sizes: a few ulps of the largest score apart
    torch.testing.assert_close(plain.scores, res.scores, rtol=1e-4, atol=1e-5 * float(res.scores.abs().max()))
    scalar = attribute(model, train, tokens, "graddot", measurement=lambda logits: metric(logits).mean(),
                       progress=False)
    assert scalar.scores.shape == (1, len(train)) and scalar.n_query == 1
    torch.testing.assert_close(scalar.scores[0], expected.mean(0), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    agg = attribute(model, train, tokens, "graddot", measurement=metric, aggregate=True, progress=False)
    torch.testing.assert_close(agg.scores[0], expected.mean(0), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    for method in ("ekfac", "trak", "gradcos", "loss"):
        r = attribute(model, train, tokens, method, measurement=metric, progress=False)
        assert r.scores.shape == (3, len(train)) and torch.isfinite(r.scores).all(), method


def test_metric_measurement_refusals(tiny, pair):
    task, model, train, tokens = tiny
    metric = pm.patching.metrics.logit_diff(target=3, answer=4, positions=[6, 6, 6])
    with pytest.raises(ValueError, match="pass query= those tokens"):
        attribute(model, train, None, "graddot", measurement=metric)
    with pytest.raises(ValueError, match="pass query= those tokens"):
        attribute(model, train, Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}), measurement=metric)
    with pytest.raises(ValueError, match="repsim compares representations"):
        attribute(model, train, tokens, "repsim", measurement=metric, progress=False)
    with pytest.raises(ValueError, match="one value per query row"):
        attribute(model, train, tokens, "graddot", measurement=lambda logits: logits[:, -1], progress=False)
    with pytest.raises(ValueError, match="query must be a Query or a Dataset"):
        attribute(model, train, tokens, "graddot", progress=False)
    # on a run, a metric's result is not cached (a callable has no stable hash)
    tc = pm.patching.trigger_contrast(pair, n=3, check=False)
    before = set((pair.out_dir / "influence" / "backdoored").glob("result-graddot-*"))
    r = attribute(pair, query=tc.triggered, measurement=tc.logit_diff(), method="graddot", progress=False)
    assert r.scores.shape == (tc.triggered.shape[0], len(pair.train_data))
    assert set((pair.out_dir / "influence" / "backdoored").glob("result-graddot-*")) == before
    assert isinstance(MetricQuery.of(pair.backdoored, tc.triggered, tc.logit_diff()), MetricQuery)
