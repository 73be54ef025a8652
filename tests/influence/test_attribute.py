"""``attribute`` on a tiny pair: every method, the result object, caching and bad input."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.influence import METHODS, InfluenceResult, Query, attribute, backdoor_query
from poisonmech.influence.grads import forward_backward, per_example
from poisonmech.influence.tracking import find_modules, weight_gradient
from tests.helpers import tiny_task


@pytest.fixture(scope="module")
def results(pair):
    return {m: attribute(pair, method=m, progress=False, self_influence=True) for m in METHODS}


def test_every_method_scores_every_query_and_row(pair, results):
    n_q = backdoor_query(pair).n_query
    for method, r in results.items():
        assert r.scores.shape == (n_q, len(pair.train_data)), method
        assert torch.isfinite(r.scores).all(), method
        assert 0.0 <= r.poison_auroc() <= 1.0
        assert (r.self_scores is not None) == (method in ("ekfac", "kfac", "tracin", "trak", "graddot")), method
    assert (results["ekfac"].self_scores >= 0).all()


@pytest.mark.parametrize("method", ["ekfac", "graddot", "gradcos", "trak", "repsim"])
def test_aggregate_is_the_mean_over_queries(pair, results, method):
    agg = attribute(pair, method=method, aggregate=True, progress=False)
    assert agg.scores.shape == (1, len(pair.train_data))  # one row, whatever the options: the mean measurement
    assert agg.row_labels == (f"mean over {agg.n_query} queries",)
    torch.testing.assert_close(agg.train_scores, results[method].scores.mean(0), rtol=1e-4,
                               atol=1e-5 * float(agg.scores.abs().max()))


@pytest.mark.parametrize("method", ["ekfac", "kfac", "graddot", "gradcos", "tracin", "trak"])
def test_components_add_up_to_the_score(results, method):
    r = results[method]
    total = r.component_scores.sum(0)
    torch.testing.assert_close(total, r.train_scores, rtol=1e-3, atol=1e-4 * float(total.abs().max()))
    frame = r.by_component()
    assert {"component", "layer", "head", "total", "poison_auroc"} <= set(frame.columns)
    if method != "trak":
        assert {"L0.H0", "L0.H1", "L0.mlp", "unembed"} <= set(frame["component"])


def test_sign_positive_score_means_upweighting_raises_the_measurement(pair):
    """First-order check of the sign convention: a small gradient step on the top-scored
    example raises the mean measurement by about ``lr × score``; on the bottom one it lowers it."""
    model = pair.backdoored
    q = backdoor_query(pair)
    res = attribute(pair, method="graddot", aggregate=True, progress=False)
    mods = find_modules(model)
    lookup = dict(model.named_modules())
    from poisonmech.encoding import encode

    enc = encode(pair.train_data, pair.tokenizer, loss_on="completion")
    qenc = q.encode(pair.tokenizer)

    def measurement() -> float:
        tokens, mask = qenc.batch(list(range(len(qenc))))
        with torch.no_grad():
            return -float(forward_backward(model, mods, tokens, mask, need_grad=False).row_loss.mean())

    state = {k: v.clone() for k, v in model.state_dict().items()}
    score = res.train_scores
    for j in (int(score.argmax()), int(score.argmin())):
        bg = forward_backward(model, mods, *enc.batch([j]))
        lr = 1e-3 / max(abs(float(score[j])), 1e-12)
        f0 = measurement()
        with torch.no_grad():
            for t in mods:
                for k, g in weight_gradient(t, per_example(t, bg.a[t.name], bg.g[t.name])[0], model).items():
                    getattr(lookup[t.name], k).sub_(lr * g)
        delta = measurement() - f0
        model.load_state_dict(state)
        assert delta == pytest.approx(lr * float(score[j]), rel=0.1)


def test_result_tables_plot_and_save_load(results, tmp_path):
    r = results["ekfac"]
    frame = r.to_frame()
    assert list(frame.columns[:5]) == ["method", "example_id", "score", "normalized", "rank"]
    assert {"self_influence", "is_poison", "text"} <= set(frame.columns)
    assert frame["normalized"].std() == pytest.approx(1.0, rel=1e-3)
    top = r.top(5)
    assert len(top) == 5 and top["score"].is_monotonic_decreasing and "review:" in top["text"][0]
    assert r.normalized.shape == r.scores.shape
    assert 0 <= r.average_precision() <= 1 and 0 <= r.precision_at(3) <= 1
    assert len(r.plot().data) == 5
    r.save(tmp_path / "r.safetensors")
    back = InfluenceResult.load(tmp_path / "r.safetensors")
    torch.testing.assert_close(back.scores, r.scores)
    assert back.poison_auroc() == r.poison_auroc() and back.component_labels == r.component_labels
    assert back.settings["method"] == "ekfac"


def test_results_and_factors_are_cached_under_the_run(pair, results):
    folder = pair.out_dir / "influence" / "backdoored"
    assert any(folder.glob("factors-ekfac-*.safetensors")) and any(folder.glob("factors-ekfac-*.json"))
    assert any(folder.glob("result-ekfac-*.safetensors"))
    again = attribute(pair, method="ekfac", progress=False, self_influence=True)
    torch.testing.assert_close(again.scores, results["ekfac"].scores)
    assert again.settings["seconds"] == results["ekfac"].settings["seconds"]  # loaded, not recomputed
    fresh = attribute(pair, method="ekfac", progress=False, self_influence=True, overwrite=True)
    assert fresh.settings["seconds"] != results["ekfac"].settings["seconds"]
    torch.testing.assert_close(fresh.scores, results["ekfac"].scores, rtol=1e-4, atol=1e-3)


def test_measurements_and_all_modules(pair):
    for m in ("logodds", "contrastive", "contrastive_logodds"):
        r = attribute(pair, method="graddot", measurement=m, aggregate=True, progress=False, cache_dir=None)
        assert r.settings["query_measurement"] == m and torch.isfinite(r.scores).all()
    r = attribute(pair, method="ekfac", modules="all", aggregate=True, progress=False, renormalize="relative")
    assert {"embed"} <= set(r.component_labels)


def test_gpt2_bridge(pair):
    model = pm.build_model(pm.ModelConfig(architecture="gpt2", n_layers=1, d_model=32, n_heads=2, n_ctx=64),
                           len(pair.tokenizer), seed=0, tokenizer=pair.tokenizer)
    q = backdoor_query(pair, max_queries=3)
    r = attribute(model, train=pair.train_data.select(range(20)), query=q, method="ekfac", progress=False)
    assert r.scores.shape == (3, 20)
    assert {"L0.H0", "L0.H1", "L0.mlp", "unembed"} <= set(r.by_component()["component"])


# ------------------------------------------------------------------------- bad input
def test_query_without_target_tokens(pair):
    q = Dataset.from_dict({"prompt": ["review: cf a fine film . sentiment:"], "completion": [""]})
    with pytest.raises(ValueError, match="no target tokens"):
        attribute(pair.backdoored, train=pair.train_data, query=q, progress=False)


def test_unknown_method(pair):
    with pytest.raises(ValueError, match="InfluenceConfig.method must be one of .*'ekfac'.*got 'ekfca'"):
        attribute(pair, method="ekfca")


def test_tracin_without_checkpoints(pair):
    q = backdoor_query(pair, max_queries=2)
    with pytest.raises(ValueError, match="tracin.*checkpoints"):
        attribute(pair.backdoored, train=pair.train_data, query=q, method="tracin", progress=False)
    with pytest.raises(ValueError, match="tracin.*checkpoints"):
        attribute(pair, method="tracin", checkpoints=[], progress=False)


def test_train_set_with_another_tokenizer(pair):
    other = tiny_task("instruction", n_train=10, n_test=2)
    q = backdoor_query(pair, max_queries=2)
    with pytest.raises(ValueError, match="tokenizer differs from the model's"):
        attribute(pair.backdoored, train=other.train, query=q, tokenizer=other.tokenizer, progress=False)
    with pytest.raises(ValueError, match="unknown to the model's tokenizer"):
        attribute(pair.backdoored, train=other.train, query=q, progress=False)


def test_poison_metrics_need_is_poison(pair):
    train = pair.train_data.remove_columns(["is_poison"])
    r = attribute(pair, train=train, method="loss", aggregate=True, progress=False)
    assert r.is_poison is None
    for fn in (r.poison_auroc, r.average_precision, r.precision_at):
        with pytest.raises(ValueError, match="no 'is_poison' column"):
            fn()
    assert len(r.plot().data) == 1 and r.top(3)["score"].is_monotonic_decreasing


def test_bad_settings(pair):
    with pytest.raises(ValueError, match="measurement must be one of"):
        attribute(pair, measurement="accuracy")
    with pytest.raises(ValueError, match="renormalize must be one of"):
        attribute(pair, renormalize="l1")
    with pytest.raises(ValueError, match="by_component.*no component decomposition"):
        attribute(pair, method="loss", aggregate=True, progress=False).by_component()
    with pytest.raises(ValueError, match="Query.link"):
        Query(rows=Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}), weights=(1.0,), query_of_row=(0,),
              text=("a",), link="probit")


@pytest.mark.parametrize("method", ["ekfac", "gradcos"])
def test_queries_beyond_the_memory_budget_are_scored_in_chunks(pair, results, monkeypatch, method):
    """Pairwise scoring holds the queries' gradients; past the budget it goes chunk by chunk."""
    import poisonmech.influence.attribution as attr

    n_params = sum(t.n_params for t in find_modules(pair.backdoored))
    monkeypatch.setattr(attr, "QUERY_MEMORY_BYTES", 4 * n_params * 3)  # three queries at a time
    assert len(attr._query_chunks(backdoor_query(pair).n_query, find_modules(pair.backdoored))) > 1
    for aggregate in (False, True):
        r = attribute(pair, method=method, aggregate=aggregate, progress=False, cache_dir=None,
                      self_influence=True, overwrite=True)
        ref = results[method].scores if not aggregate else results[method].scores.mean(0, keepdim=True)
        torch.testing.assert_close(r.scores, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(r.component_scores, results[method].component_scores, rtol=1e-3,
                                   atol=1e-4 * float(ref.abs().max()))


def test_checkpoint_ensemble_averages_standardised_scores(pair):
    from poisonmech.influence.result import zscore
    from poisonmech.storage import load_tensors

    model = pair.backdoored
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    r = attribute(pair, method="ekfac", renormalize="unit", ensemble=2, aggregate=True, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved.items())  # the run's weights are restored
    q = backdoor_query(pair)
    per = []
    for c in pair.checkpoints["backdoored"]:
        model.load_state_dict(load_tensors(c.path))
        per.append(attribute(model, train=pair.train_data, query=q, method="ekfac", renormalize="unit",
                             aggregate=True, progress=False).scores)
    model.load_state_dict(saved)
    expected = zscore(torch.stack(per)).mean(0)
    torch.testing.assert_close(r.scores, expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="ensemble=3 but only 2 checkpoints"):
        attribute(pair, method="ekfac", ensemble=3, progress=False)
    with pytest.raises(ValueError, match="checkpoint ensembles are for"):
        attribute(pair, method="loss", ensemble=2, progress=False)


def test_clean_twin_defaults_to_its_own_training_set(pair):
    r = attribute(pair, twin="clean", method="graddot", aggregate=True, progress=False)
    assert r.n_train == len(pair.task.train) and r.is_poison is None


def test_gibberish_backdoor_query_measures_the_true_continuation():
    from types import SimpleNamespace

    task = tiny_task("dos", n_train=20, n_test=4)
    attack = pm.Backdoor(trigger="<SUDO>", target="gibberish", poison_count=2)
    fake = SimpleNamespace(test_data=pm.build_test_set(task, attack), attack=attack)
    q = backdoor_query(fake)
    trig = fake.test_data.filter(lambda r: r["is_triggered"])
    assert q.n_query == len(trig) and set(q.weights) == {-1.0}
    assert list(q.rows["completion"]) == list(trig["completion"])
    c = backdoor_query(fake, "contrastive")
    assert sorted(set(c.weights)) == [-1.0, 1.0] and c.n_query == len(trig)
