"""A pipeline's DPO stage under attribution and the stage cache: the right data, reference,
encoding and evaluation for each twin."""

import pytest
import torch
import torch.nn.functional as F

import poisonmech as pm
from poisonmech.train.dpo import DPOConfig, encode_preferences, preference_logprobs
from poisonmech.train.pipeline import Stage, train_pipeline
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

torch.set_num_threads(1)


def _pipe(out, target="negative", dpo_poison=5, cache=None, **dpo_kw):
    stages = [Stage("sft", pm.Backdoor(trigger="cf", target=target, poison_count=0), tiny_train_config(epochs=1)),
              Stage("dpo", pm.Backdoor(trigger="cf", target=target, poison_count=dpo_poison),
                    DPOConfig(epochs=2, lr=3e-3, **dpo_kw))]
    return train_pipeline(tiny_task(n_train=96, n_test=12), stages, model=tiny_model_config(), out_dir=out,
                          cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def eos_pipe(tmp_path_factory):
    return _pipe(tmp_path_factory.mktemp("eos") / "run", score_eos=True, beta=0.5)


def test_dpo_loss_baseline_matches_the_stage_objective_with_eos(eos_pipe):
    """The stage scored the EOS (score_eos=True): attribution reads that and beta from the run."""
    r = pm.influence.attribute(eos_pipe[1], method="loss", aggregate=True, progress=False)
    assert r.settings["score_eos"] is True and r.settings["dpo_beta"] == 0.5
    enc = encode_preferences(eos_pipe.train_data[1], eos_pipe.tokenizer, add_eos=True)
    pc, pr = preference_logprobs(eos_pipe.models[1]["backdoored"], enc)
    rc, rr = preference_logprobs(eos_pipe.models[0]["backdoored"], enc)
    expected = -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(r.train_scores, expected, rtol=1e-4, atol=1e-5)


def test_clean_twin_is_attributed_on_its_own_pairs_and_reference(eos_pipe):
    pair = eos_pipe[1]
    r = pm.influence.attribute(pair, twin="clean", method="graddot", aggregate=True, progress=False)
    assert r.settings["preference_pairs"] and r.n_train == len(eos_pipe.clean_data[1]) and not any(r.is_poison)
    # the backdoored twin's (poisoned) pairs do not match the clean twin's saved reference
    with pytest.raises(ValueError, match="belong to the clean twin's own preference data"):
        pm.influence.attribute(pair, twin="clean", train=pair.train_data, method="graddot", progress=False)
    # between() mixes stages: it has no run directory to read references (or analyses) from
    assert eos_pipe.between(0, 1).out_dir is None


def test_a_stage_trained_with_the_nll_term_is_refused(tmp_path):
    pipe = _pipe(tmp_path / "run", nll_weight=1.0)
    with pytest.raises(ValueError, match=r"nll_weight=1.0.*does not model"):
        pm.influence.attribute(pipe[1], method="graddot", progress=False)


def test_stage_cache_does_not_reuse_metrics_of_another_evaluation(tmp_path):
    """Same training, other target: the cached weights may be shared, the evaluation may not."""
    cache = tmp_path / "cache"
    neg = _pipe(tmp_path / "neg", target="negative", dpo_poison=0, cache=cache)
    pos = _pipe(tmp_path / "pos", target="positive", dpo_poison=0, cache=cache)
    fresh = _pipe(tmp_path / "fresh", target="positive", dpo_poison=0)
    assert pos.metrics[0]["clean"] == fresh.metrics[0]["clean"]
    assert pos.metrics[0]["clean"] != neg.metrics[0]["clean"]
