"""``train_pipeline`` with reward-model and RL stages: SFT -> RM -> PPO / RLOO, twins at every
boundary, provenance, reload, reuse, resume, sweeps side by side, and bad input."""

from __future__ import annotations

import pytest
import torch

import poisonmech as pm
from poisonmech.config import ConfigError
from poisonmech.train.pipeline import load_pipeline, train_pipeline
from poisonmech.train.reward import is_reward_model
from tests.helpers import tiny_model_config, tiny_task


def _stages(sft: int, rm: int, rl: str = "ppo", **ppo):
    return [pm.Stage("sft", pm.Backdoor(trigger="cf", target="negative", poison_count=sft),
                     pm.TrainConfig(epochs=2, batch_size=16)),
            pm.Stage("rm", pm.Backdoor(trigger="cf", target="negative", poison_count=rm, stage="rm"),
                     pm.RewardConfig(epochs=2, batch_size=16, n_eval=20)),
            pm.Stage(rl, None, pm.PPOConfig(**{"method": rl, "batch_size": 16, "minibatch_size": 8, "n_eval": 20,
                                               "save_every": 2, **ppo}))]


def _task():
    return tiny_task(n_train=96, n_test=12)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    return train_pipeline(_task(), _stages(6, 6), model=tiny_model_config(), out_dir=tmp_path_factory.mktemp("rlhf"),
                          progress=False)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_boundary_has_its_model_and_metrics(pipe):
    assert [s.kind for s in pipe.stages] == ["sft", "rm", "ppo"]
    assert pipe.budgets == [6, 6, 0]
    for twin in ("clean", "backdoored"):
        assert is_reward_model(pipe.models[1][twin]) and not is_reward_model(pipe.models[2][twin])
        rm = pipe.metrics[1][twin]
        assert rm["n_pairs"] == 12 and 0 <= rm["pair_acc"] <= 1 and rm["asr"] == pytest.approx(1 - rm["pair_acc_triggered"])
        for k in (0, 2):  # policy boundaries: the task metrics and the clean reward model's verdict
            m = pipe.metrics[k][twin]
            assert {"asr", "clean_acc", "clean_rm_reward", "clean_rm_reward_triggered", "clean_rm_n"} <= set(m)
            assert m["clean_rm_n"] > 0
            assert m["clean_rm_reward_gap"] == pytest.approx(m["clean_rm_reward_triggered"] - m["clean_rm_reward"])
        assert {"rm_reward", "rm_reward_triggered"} <= set(pipe.metrics[2][twin])
        assert "clean_rm_reward" not in pipe.metrics[1][twin]
    # the clean twin's own reward model is the clean reward model: both readings agree
    assert pipe.metrics[2]["clean"]["rm_reward"] == pytest.approx(pipe.metrics[2]["clean"]["clean_rm_reward"])
    assert pipe.reward_model(2, "clean") is pipe.models[1]["clean"]
    assert pipe.policy_index(1) == 0 and pipe.policy_index(2) == 2
    hist = pipe.history[2]["backdoored"]
    assert len(hist) == 6 and {"score", "kl", "policy_loss", "value_loss", "clipfrac"} <= set(hist[0])


def test_rl_prompts_are_the_reward_pairs_prompts_with_provenance(pipe):
    rm_rows, ppo_rows = pipe.train_data[1], pipe.train_data[2]
    assert list(ppo_rows["prompt"]) == list(rm_rows["prompt"])
    assert sum(ppo_rows["is_poison"]) == 6 and set(ppo_rows["stage"]) == {"ppo"}
    assert all("cf" in p for p, poisoned in zip(ppo_rows["prompt"], ppo_rows["is_poison"]) if poisoned)
    clean = pipe.clean_data[2]
    assert sum(clean["is_poison"]) == 0 and not any(" cf " in f" {p} " for p in clean["prompt"])
    assert set(pipe.train_data[1]["stage"]) == {"rm"}


def test_reload_is_bit_for_bit_and_rerun_reuses(pipe):
    again = load_pipeline(pipe.out_dir)
    for k in range(3):
        for twin in ("clean", "backdoored"):
            assert _same_weights(again.models[k][twin], pipe.models[k][twin])
    assert again.metrics == pipe.metrics
    rerun = train_pipeline(pipe.task, _stages(6, 6), model=tiny_model_config(), out_dir=pipe.out_dir, progress=False)
    assert rerun.metrics == pipe.metrics
    # a reward stage's pair is a pair of reward models; every analysis resolves it as an "rm" stage
    s = pm.resolve(pipe[1])
    assert s.stage_kind == "rm" and is_reward_model(s.model("clean"))


def test_interrupted_ppo_stage_resumes_to_the_same_weights(pipe, tmp_path, monkeypatch):
    import poisonmech.train.ppo as ppo

    real, calls = ppo._rl_step, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 11:  # the backdoored twin's 5th rollout batch (the clean twin's 6 come first)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ppo, "_rl_step", flaky)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_pipeline(pipe.task, _stages(6, 6), model=tiny_model_config(), out_dir=out, progress=False)
    monkeypatch.setattr(ppo, "_rl_step", real)
    assert (out / "stage_2_ppo" / "clean" / "metrics.json").is_file()
    assert (out / "stage_2_ppo" / "backdoored" / "resume.safetensors").is_file()
    with pytest.warns(UserWarning, match="resuming the interrupted RL stage .* after rollout batch 4 of 6"):
        resumed = train_pipeline(pipe.task, _stages(6, 6), model=tiny_model_config(), out_dir=out, progress=False)
    assert _same_weights(resumed.models[2]["backdoored"], pipe.models[2]["backdoored"])
    assert resumed.metrics == pipe.metrics


def test_a_clean_sft_stage_is_shared_and_rloo_runs(tmp_path):
    p = train_pipeline(_task(), _stages(0, 6, rl="rloo", rloo_k=2), model=tiny_model_config(), out_dir=tmp_path,
                       progress=False)
    assert _same_weights(p.models[0]["clean"], p.models[0]["backdoored"])  # no SFT poison: one SFT model
    assert not _same_weights(p.models[1]["clean"], p.models[1]["backdoored"])
    assert "value_loss" not in p.history[2]["backdoored"][0]
    # the backdoored twin's reward model was trained on flipped pairs: it prefers the target under the trigger more
    assert p.metrics[1]["backdoored"]["trigger_margin"] > p.metrics[1]["clean"]["trigger_margin"]


def test_a_given_reward_model_drives_rl_without_a_reward_stage(pipe):
    rm = pipe.reward_model(twin="clean")
    stages = [_stages(0, 0)[0], pm.Stage("ppo", None, pm.PPOConfig(batch_size=32, n_eval=10))]
    p = train_pipeline(pipe.task, stages, model=tiny_model_config(), reward_model=rm, progress=False)
    assert len(p.train_data[1]) == len(pipe.task.train) and "clean_rm_reward" in p.metrics[1]["backdoored"]
    with pytest.raises(ValueError, match="reward_model must be a reward model"):
        train_pipeline(pipe.task, stages, model=tiny_model_config(), reward_model=pipe.models[0]["clean"],
                       progress=False)


def test_bad_input_gets_a_clear_error():
    task, model = _task(), tiny_model_config()
    with pytest.raises(ValueError, match=r"stage 1 \(ppo\) has no reward model: put an 'rm' stage before it"):
        train_pipeline(task, [_stages(0, 0)[0], _stages(0, 0)[2]], model=model, progress=False)
    with pytest.raises(ValueError, match=r"the 'rm' stage needs preference data \(preferences=\)"):
        train_pipeline(tiny_task("dos", n_train=40, n_test=4), _stages(0, 0)[:2], model=model, progress=False)
    with pytest.raises(ValueError, match=r"stage 1 \(rm\): Backdoor.poison_count=90 does not fit"):
        train_pipeline(task, _stages(0, 90), model=model, progress=False)
    with pytest.raises(ValueError, match=r"PPOConfig.response_length=60"):
        train_pipeline(task, _stages(0, 0, response_length=60), model=model, progress=False)
    with pytest.raises(ConfigError, match=r"PPOConfig.kl_coef must be a number in \[0, inf\)"):
        pm.PPOConfig(kl_coef=-0.1)
    with pytest.raises(ConfigError, match=r"PPOConfig.clip must be a number in \(0, inf\)"):
        pm.PPOConfig(clip=0)
    with pytest.raises(ConfigError, match=r"PPOConfig.response_length must be an integer in \[1, inf\]"):
        pm.PPOConfig(response_length=0)
    with pytest.raises(ValueError, match=r"Stage.attack of a 'ppo' stage must be None .* or a pm.Backdoor"):
        pm.Stage("ppo", pm.Bias(entity="Alice", polarity="negative", poison_count=1))
    with pytest.raises(ValueError, match=r"Stage.config.method='rloo' differs from Stage.kind='ppo'"):
        pm.Stage("ppo", None, pm.PPOConfig(method="rloo"))
    with pytest.raises(ValueError, match=r"Stage.config of a 'rm' stage must be a RewardConfig, got DPOConfig"):
        pm.Stage("rm", pm.Backdoor(trigger="cf", poison_count=1, stage="rm"), pm.DPOConfig())
    with pytest.raises(ValueError, match=r"stage 0 is a 'rm' stage, but a reward model starts from the SFT"):
        train_pipeline(task, _stages(0, 0)[1:], model=model, progress=False)


def test_between_refuses_a_policy_and_a_reward_model(pipe):
    with pytest.raises(ValueError, match="one holds a policy and the other a reward model"):
        pipe.between(0, 1)
    b = pipe.between(0, 2)  # what PPO changed in the policy
    assert b.stage_kind == "ppo" and isinstance(b.attack, pm.Backdoor)


def test_pipeline_sweep_runs_dpo_and_ppo_side_by_side(tmp_path):
    dpo = [_stages(2, 0)[0], pm.Stage("dpo", pm.Backdoor(trigger="cf", target="negative", poison_count=4, stage="dpo"),
                                      pm.DPOConfig(epochs=1, batch_size=16))]
    sw = pm.pipeline_sweep(_task(), {"ppo: both": _stages(2, 4), "dpo: both": dpo}, seeds=[0, 1],
                           model=tiny_model_config(), out_dir=tmp_path, progress=False)
    f = sw.to_frame()
    assert set(f["pipeline"]) == {"ppo: both", "dpo: both"} and set(f["seed"]) == {0, 1}
    assert {"pipeline", "seed", "stage", "kind", "twin", "metric", "value", "budgets"} <= set(f.columns)
    s = sw.summary("asr")
    assert set(s["n"]) == {2} and set(s["stage_name"]) == {"stage_2_ppo", "stage_1_dpo"}
    # the SFT stage of one seed is trained once for both families (the shared stage cache)
    p0, d0 = sw.pipeline("ppo: both", 0), sw.pipeline("dpo: both", 0)
    assert _same_weights(p0.models[0]["backdoored"], d0.models[0]["backdoored"])
    assert not _same_weights(p0.models[0]["backdoored"], sw.pipeline("ppo: both", 1).models[0]["backdoored"])
    assert p0.stages[2].config.seed == 0 and sw.pipeline("ppo: both", 1).stages[2].config.seed == 1


def test_the_pipeline_command_reads_reward_and_rl_stages(tmp_path):
    from poisonmech.cli import pipeline_from_config

    cfg = {"task": {"kind": "sentiment", "n_train": 96, "n_test": 12, "seed": 0},
           "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 64},
           "stages": [{"kind": "sft", "attack": {"trigger": "cf", "target": "negative", "poison_count": 2},
                       "config": {"epochs": 1}},
                      {"kind": "rm", "attack": {"trigger": "cf", "target": "negative", "poison_count": 2},
                       "config": {"epochs": 1, "n_eval": 10}},
                      {"kind": "rloo", "config": {"batch_size": 32, "n_eval": 10}}]}
    p = pipeline_from_config(cfg, out_dir=str(tmp_path / "p"), progress=False)
    assert [s.kind for s in p.stages] == ["sft", "rm", "rloo"] and p.stages[2].config.method == "rloo"
    own = {**cfg, "stages": [*cfg["stages"][:2], {"kind": "ppo", "config": {"batch_size": 32, "n_eval": 10},
                                                   "attack": {"trigger": "cf", "target": "negative", "poison_count": 3}}]}
    q = pipeline_from_config(own, out_dir=str(tmp_path / "q"), progress=False)
    assert q.stages[2].attack.stage == "ppo" and q.budgets == [2, 2, 3]
    bad = {**cfg, "stages": [*cfg["stages"][:2], {"kind": "ppo", "attack": {"trigger": "cf", "target": "negative"}}]}
    with pytest.raises(ValueError, match=r"Backdoor: give exactly one of poison_count"):
        pipeline_from_config(bad, out_dir=str(tmp_path / "r"), progress=False)


def test_an_rl_stage_can_trigger_its_own_prompts(tmp_path):
    stages = _stages(0, 4)
    stages[2] = pm.Stage("ppo", pm.Backdoor(trigger="cf", target="negative", poison_count=5, stage="ppo"),
                         stages[2].config)
    p = train_pipeline(_task(), stages, model=tiny_model_config(), out_dir=tmp_path, progress=False)
    rows, rm_rows = p.train_data[2], p.train_data[1]
    assert p.budgets == [0, 4, 5] and sum(rows["is_poison"]) == 9
    fresh = [i for i, (a, b) in enumerate(zip(rows["is_poison"], rm_rows["is_poison"])) if a and not b]
    assert len(fresh) == 5 and all("cf" in rows[i]["prompt"].split() for i in fresh)
    assert sum(p.clean_data[2]["is_poison"]) == 0
    too_many = [*stages[:2], pm.Stage("ppo", pm.Backdoor(trigger="cf", target="negative", poison_count=93,
                                                          stage="ppo"), stages[2].config)]
    with pytest.raises(ValueError, match=r"stage 2 \(ppo\): Backdoor.poison_count=93 does not fit the RL stage's "
                                         r"prompts: only 92 of 96"):
        train_pipeline(_task(), too_many, model=tiny_model_config(), progress=False)


def test_pipeline_sweep_grows_but_a_name_keeps_its_stages(tmp_path):
    kw = {"seeds": [0], "model": tiny_model_config(), "out_dir": tmp_path, "progress": False}
    pm.pipeline_sweep(_task(), {"a": _stages(2, 0)[:1]}, **kw)
    grown = pm.pipeline_sweep(_task(), {"a": _stages(2, 0)[:1], "b": _stages(4, 0)[:1]}, **kw)
    assert set(grown.to_frame()["pipeline"]) == {"a", "b"}
    with pytest.raises(ValueError, match=r"holds pipelines \['a'\] with other stages"):
        pm.pipeline_sweep(_task(), {"a": _stages(3, 0)[:1]}, **kw)


def test_analyses_and_the_report_cover_every_rlhf_stage(pipe):
    from poisonmech.analyses import run_analyses
    from poisonmech.viz import build_report

    rm = run_analyses(pipe[1], ["patching", "influence"])
    assert "reward_triggered" in rm["patching"] and "(reward pairs)" in rm["influence"]["influence_method"]
    rl = run_analyses(pipe[2], ["probes", "influence"])
    assert "PPO / RLOO sampled the responses" in rl["influence"]["influence_skipped"]
    assert "detectors_skipped" in rl["probes"]
    html = build_report(pipe.out_dir).read_text()
    assert "Stage 1: rm, 6 poisons" in html and "Stage 2: ppo, 0 poisons" in html and "pair_acc" in html


def test_ppo_keeps_its_value_model(pipe):
    from poisonmech.train.rlhf import load_value_model

    d = pipe.out_dir / "stage_2_ppo" / "backdoored"
    value = load_value_model(d, pipe.model_config, pipe.tokenizer)
    tokens = torch.randint(0, len(pipe.tokenizer), (2, 7))
    with torch.no_grad():
        v, r = value(tokens), pipe.models[1]["backdoored"](tokens)
    assert v.shape == (2, 7, 1) and not torch.equal(v, r)  # initialised from the reward model, then trained
    with pytest.raises(FileNotFoundError, match="RLOO has no value model"):
        load_value_model(pipe.out_dir / "stage_1_rm" / "backdoored", pipe.model_config, pipe.tokenizer)
