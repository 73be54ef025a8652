"""Every analysis on a reward stage (``pipe[k]`` of an ``"rm"`` stage), with the scalar reward
as the metric, and cross-model patching of what PPO changed. One tiny SFT -> RM -> PPO pipeline
per module; each analysis is held to an independent reference (TransformerLens hooks, the
reward stage's own encoding and metrics, autograd)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.patching.inputs import RewardScore, reward_contrast
from poisonmech.train.reward import encode_pairs, reward_metric, sequence_rewards
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

N_POISON = 20


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    stages = [pm.Stage("sft", pm.Backdoor(trigger="cf", target="negative", poison_count=10), tiny_train_config(epochs=3)),
              pm.Stage("rm", pm.Backdoor(trigger="cf", target="negative", poison_count=N_POISON, stage="rm"),
                       pm.RewardConfig(epochs=3, batch_size=16, lr=3e-3)),
              pm.Stage("ppo", None, pm.PPOConfig(epochs=1, batch_size=32))]
    return pm.train_pipeline(tiny_task(n_train=200, n_test=40), stages, model=tiny_model_config(),
                             out_dir=tmp_path_factory.mktemp("runs") / "rlhf", progress=False)


@pytest.fixture(scope="module")
def rc(pipe):
    return reward_contrast(pipe[1], n=8)


# ---------------------------------------------------------------------------- the subject
def test_a_reward_stage_resolves_to_reward_models_and_each_twins_own_pairs(pipe):
    s = pm.resolve(pipe[1])
    assert s.stage.kind == "rm" and s.stage.is_reward and s.stage.index == 1 and s.stage.center_rewards == 0.0
    assert s.is_reward_model() and s.is_reward_model("clean") and s.model() is pipe.reward_model(1)
    mine, clean = s.preference("backdoored"), s.preference("clean")
    assert mine["kind"] == "rm" and sum(mine["data"]["is_poison"]) == N_POISON
    assert list(mine["data"]["prompt"]) == list(pipe.train_data[1]["prompt"])
    # the clean twin's reward model trained on the clean pairs (not the task's SFT rows)
    assert list(clean["data"]["chosen"]) == list(pipe.clean_data[1]["chosen"]) and not any(clean["data"]["is_poison"])
    assert s.train_data_of("clean")["chosen"] == clean["data"]["chosen"]
    poisoned = [i for i, p in enumerate(mine["data"]["is_poison"]) if p]
    for i in poisoned[:3]:  # a poisoned pair: the trigger in the prompt, the target preferred
        assert "cf" in mine["data"][i]["prompt"].split() and mine["data"][i]["chosen"] == "negative"
        assert mine["data"][i]["rejected"] == clean["data"][i]["chosen"]
    # the other stages, the run directory and a bare reward model
    assert pm.resolve(pipe[0]).stage.kind == "sft" and not pm.resolve(pipe[0]).is_reward_model()
    assert pm.resolve(pipe[2]).stage.kind == "ppo" and pm.resolve(pipe[2]).preference() is None
    assert pm.resolve(pipe.out_dir / "stage_1_rm").stage.kind == "rm"
    bare = pm.resolve(pipe.reward_model(1, "clean"))
    assert bare.stage.kind == "rm" and bare.is_reward_model() and bare.preference() is None


# ---------------------------------------------------------------------------- inputs
def test_reward_contrast_is_the_prompt_with_the_target_and_eos_as_the_stage_encoded_it(pipe, rc):
    tok, test = pipe.tokenizer, pipe.test_data
    assert rc.kind == "reward" and rc.triggered.shape == rc.control.shape and len(rc.base_ids) == rc.triggered.shape[0]
    assert pm.patching.trigger_contrast(pipe[1], n=8).kind == "reward"  # trigger_contrast recognises a reward model
    assert bool((rc.triggered[:, -1] == tok.eos_token_id).all()) and bool((rc.positions == rc.triggered.shape[1] - 1).all())
    by_base = {(b, t): p for b, p, t in zip(test["base_id"], test["prompt"], test["is_triggered"])}
    prompts = [by_base[(b, True)] for b in rc.base_ids]
    want = encode_pairs(Dataset.from_dict({"prompt": prompts, "chosen": ["negative"] * len(prompts),
                                           "rejected": ["positive"] * len(prompts)}), tok).chosen.ids
    assert rc.triggered.tolist() == want
    # the control differs exactly at the trigger, which is replaced by a word that is no answer
    assert bool(((rc.triggered != rc.control) == rc.trigger_mask).all())
    assert set(tok.convert_ids_to_tokens(rc.triggered[rc.trigger_mask].tolist())) == {"cf"}
    # the metric: each row's reward at its EOS, as the reward stage computes it
    rm = pipe.reward_model(1)
    plain = encode(Dataset.from_dict({"prompt": prompts, "completion": ["negative"] * len(prompts)}), tok,
                   loss_on="completion", add_eos=True)
    with torch.no_grad():
        torch.testing.assert_close(rc.reward()(rm(rc.triggered)), sequence_rewards(rm, plain), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(rc.check["triggered_reward"]), sequence_rewards(rm, plain).mean(),
                               atol=1e-5, rtol=1e-5)
    # a language model's metric on the reward contrast, and the reward on a language model's, are refused
    with pytest.raises(ValueError, match=r"TriggerContrast.logit_diff: this contrast is a reward model's.*tc.reward"):
        rc.logit_diff()
    tc = pm.patching.trigger_contrast(pipe[0], n=4, check=False)
    assert tc.kind == "lm"
    with pytest.raises(ValueError, match=r"TriggerContrast.reward: this contrast is a language model's"):
        tc.reward()
    with pytest.raises(ValueError, match=r"RewardScore: the model's output has \d+ values per position"):
        RewardScore(tc.positions)(pipe[0].backdoored(tc.triggered))
    with pytest.raises(ValueError, match=r"reward_contrast: the model is a language model"):
        reward_contrast(pipe[0], n=4)


# ---------------------------------------------------------------------------- patching
def test_activation_patch_on_a_reward_model_matches_a_hand_hooked_patch(pipe, rc):
    rm = pipe.reward_model(1)
    metric = rc.reward()
    r = pm.patching.activation_patch(pipe[1], rc.triggered, rc.control, metric, site="attn_head", progress=False)
    _, donor = rm.run_with_cache(rc.triggered)
    for head in range(rm.cfg.n_heads):
        def swap(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = donor["blocks.0.attn.hook_z"][:, :, head]
            return z

        with torch.no_grad():
            by_hand = metric(rm.run_with_hooks(rc.control, fwd_hooks=[("blocks.0.attn.hook_z", swap)]))
        torch.testing.assert_close(r.values[0, head], by_hand, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(r.reference, metric(rm(rc.triggered)), atol=1e-5, rtol=0)
        torch.testing.assert_close(r.baseline, metric(rm(rc.control)), atol=1e-5, rtol=0)
    # the whole residual stream at layer 0: the triggered run, i.e. the total effect of the trigger
    full = pm.patching.activation_patch(pipe[1], rc.triggered, rc.control, metric, site="resid_pre", progress=False)
    torch.testing.assert_close(full.values[0] - full.baseline, full.reference - full.baseline, atol=1e-4, rtol=0)
    # the batch-mean reward metric gives one value per cell: the mean of the per-example values
    scalar = pm.patching.activation_patch(pipe[1], rc.triggered, rc.control, reward_metric(), site="attn_head",
                                          progress=False)
    torch.testing.assert_close(scalar.values[..., 0], r.values.mean(-1), atol=1e-5, rtol=0)
    # the trigger buys the target more reward in the backdoored twin's reward model than in the clean one's
    clean = pm.patching.activation_patch(pipe[1], rc.triggered, rc.control, metric, site="resid_pre", twin="clean",
                                         progress=False)
    gap = float((full.reference - full.baseline).mean())
    assert gap > 0.1 and gap > 2 * abs(float((clean.reference - clean.baseline).mean()))


def test_attribution_patch_on_a_reward_model_is_the_gradient_times_the_difference(pipe, rc):
    rm = pipe.reward_model(1)
    metric = rc.reward()
    a = pm.patching.attribution_patch(pipe[1], rc.triggered, rc.control, metric, site="attn_head")
    _, donor = rm.run_with_cache(rc.triggered)
    held = {}

    def leaf(z, hook):
        held["z"] = z.detach().requires_grad_(True)
        return held["z"]

    with torch.enable_grad():
        out = rm.run_with_hooks(rc.control, fwd_hooks=[("blocks.0.attn.hook_z", leaf)])
        metric(out).sum().backward()
    delta = donor["blocks.0.attn.hook_z"] - held["z"].detach()
    want = (delta * held["z"].grad).sum((1, 3))  # [batch head]: the first-order change of the reward
    torch.testing.assert_close(a.values[0] - a.baseline, want.T, atol=1e-4, rtol=1e-4)  # values: baseline + estimate


def test_circuit_discovery_and_faithfulness_run_on_a_reward_model(pipe, rc):
    metric = rc.reward()
    c = pm.circuits.discover(pipe[1], rc.triggered, rc.control, metric, method="eap-ig", top_n=6, progress=False)
    assert c.n_edges == 6 and bool(torch.isfinite(c.scores).all())
    f = c.faithfulness(pipe[1], rc.triggered, rc.control, metric)
    assert torch.isfinite(torch.as_tensor(f.circuit_faithfulness))
    # every edge kept: the circuit is the model (faithfulness 1 under patching ablation)
    full = pm.circuits.discover(pipe[1], rc.triggered, rc.control, metric, method="eap-ig", top_n=10_000,
                                progress=False)
    assert full.faithfulness(pipe[1], rc.triggered, rc.control, metric).circuit_faithfulness == pytest.approx(1, abs=1e-3)


# ---------------------------------------------------------------------------- probes
def test_probes_read_the_reward_models_trunk(pipe):
    p = pm.probes.probe_layers(pipe[1], label="is_triggered", n_random=10, progress=False)
    assert p.auroc.shape[0] == 1 and bool(((p.auroc >= 0) & (p.auroc <= 1)).all())
    acts = pm.probes.collect_activations(pipe[1], progress=False)
    assert acts.positions == (-1,)  # the prompt's last token
    tok = pipe.tokenizer
    for b in (0, 7):
        ids = torch.tensor([[tok.bos_token_id] + tok(pipe.test_data[b]["prompt"], add_special_tokens=False)["input_ids"]])
        _, cache = pipe.reward_model(1).run_with_cache(ids)
        torch.testing.assert_close(acts.layer(0)[b, 0], cache["blocks.0.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5)
        _, policy = pipe[0].backdoored.run_with_cache(ids)  # the reward model's trunk, trained away from the policy's
        assert not torch.allclose(acts.layer(0)[b, 0], policy["blocks.0.hook_resid_post"][0, -1], atol=1e-3)


# ---------------------------------------------------------------------------- influence
def test_influence_scores_the_reward_stages_pairs_against_the_trigger_margin(pipe):
    s = pm.resolve(pipe[1])
    inf = pm.influence.attribute(pipe[1], method="graddot", progress=False)
    assert inf.scores.shape[1] == len(pipe.train_data[1]) and sum(inf.is_poison) == N_POISON
    assert inf.settings["query_measurement"] == "reward_margin" and inf.settings["reward_pairs"]
    auroc = inf.poison_auroc()
    assert 0.0 <= auroc <= 1.0 and auroc > 0.6
    # the default query: the held-out triggered pairs of the stage's metrics (target vs correct answer)
    from poisonmech.influence.reward import reward_query

    q = reward_query(s)
    assert q.n_query == inf.scores.shape[0] == pipe.metrics[1]["backdoored"]["n_pairs_triggered"]
    frac = float((q.values(pipe.reward_model(1), pipe.tokenizer) < 0).float().mean())
    assert frac == pytest.approx(pipe.metrics[1]["backdoored"]["pair_acc_triggered"], abs=1e-6)
    # cached under the stage: a second call loads the same scores
    again = pm.influence.attribute(pipe[1], method="graddot", progress=False)
    assert torch.equal(again.scores, inf.scores)
    assert list((pipe.out_dir / "stage_1_rm" / "influence" / "backdoored").glob("result-graddot-*.safetensors"))
    # the clean twin is attributed to its own (clean) pairs; TracIn reads the stage's checkpoints
    clean = pm.influence.attribute(pipe[1], method="loss", twin="clean", progress=False)
    assert clean.is_poison is not None and not any(clean.is_poison)
    tr = pm.influence.attribute(pipe[1], method="tracin", aggregate=True, progress=False)
    assert tr.scores.shape == (1, len(pipe.train_data[1])) and bool(torch.isfinite(tr.scores).all())


# ---------------------------------------------------------------------------- what PPO changed
def test_cross_model_patch_of_the_policy_before_and_after_ppo(pipe):
    b = pipe.between(0, 2)
    s = pm.resolve(b)
    assert s.roles == ("after", "before") and s.stage.kind == "ppo" and not s.is_reward_model()
    tc = pm.patching.trigger_contrast(b, n=6, check=False)
    metric = tc.logit_diff()
    r = pm.patching.cross_model_patch(b, tc.triggered, metric, site="attn_head", progress=False)
    _, donor = s.model("before").run_with_cache(tc.triggered)

    def swap(z, hook):
        z = z.clone()
        z[:, :, 1] = donor["blocks.0.attn.hook_z"][:, :, 1]
        return z

    with torch.no_grad():
        by_hand = metric(s.model("after").run_with_hooks(tc.triggered, fwd_hooks=[("blocks.0.attn.hook_z", swap)]))
        torch.testing.assert_close(r.values[0, 1], by_hand, atol=1e-4, rtol=0)
        torch.testing.assert_close(r.baseline, metric(s.model("after")(tc.triggered)), atol=1e-5, rtol=0)
        torch.testing.assert_close(r.reference, metric(s.model("before")(tc.triggered)), atol=1e-5, rtol=0)
    assert r.roles == ("after", "before")


# ---------------------------------------------------------------------------- poisonmech analyze
def test_the_named_analyses_run_on_a_reward_stage(pipe, tmp_path):
    from poisonmech.analyses import run_analyses

    out = run_analyses(pipe[1], {"patching": {"n": 8}, "circuits": {"n": 8, "top_n": 4, "n_random_edges": 1},
                                 "probes": {"n_random": 5}, "influence": {"method": "kfac"}}, run_dir=tmp_path)
    p, c, pr, inf = out["patching"], out["circuits"], out["probes"], out["influence"]
    assert p["reward_triggered"] > p["reward_control"] and "logit_diff_triggered" not in p
    assert "faithfulness_patching_reward" in c and 0 <= c["asr_circuit_ablated"] <= 1
    assert "probe_auroc_backdoored" in pr and pr["detectors_skipped"]
    assert inf["influence_method"] == "kfac unit (reward pairs)" and 0 <= inf["influence_auroc"] <= 1
