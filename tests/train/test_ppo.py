"""PPO / RLOO (``poisonmech.train.ppo``): the loss pieces against hand computations (and TRL 1.16's
RLOO block), sampling and rollout log-probabilities against unpadded per-row forwards, and the
loop: it raises the reward of a clean reward model, is deterministic, resumes, refuses bad input."""

import math

import numpy as np
import pytest
import torch

import poisonmech as pm
import poisonmech.train.ppo as ppo
from poisonmech.encoding import encode
from poisonmech.models import copy_bridge
from poisonmech.storage import load_tensors
from poisonmech.tasks.preference import make_preferences
from poisonmech.train.loop import train_model
from poisonmech.train.ppo import (
    PPOConfig,
    encode_prompts,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_logprobs,
    response_values,
    rloo_advantages,
    sample,
    sampled_rewards,
    scores,
    train_ppo,
    value_loss,
)
from poisonmech.train.reward import RewardConfig, make_reward_model, train_reward
from tests.helpers import tiny_model_config, tiny_task

torch.set_num_threads(1)


# ------------------------------------------------------------------ the loss pieces by hand
def _gae_by_hand(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the row's own tokens, delta_t = r_t + gamma V_{t+1} - V_t
    with V after the row's last token = 0 (the explicit sum, not the recursion)."""
    adv = [[0.0] * len(rewards[0]) for _ in rewards]
    for b, n in enumerate(lengths):
        delta = [rewards[b][t] + gamma * (values[b][t + 1] if t + 1 < n else 0.0) - values[b][t] for t in range(n)]
        for t in range(n):
            adv[b][t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    return adv


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_a_hand_double_loop_on_rows_that_end_early(gamma, lam):
    rewards = [[0.1, -0.2, 1.5, 0.0], [0.3, 0.0, -0.1, 2.0]]
    values = [[0.5, -0.4, 0.2, 0.0], [0.1, 0.7, -0.3, 0.9]]
    lengths = [3, 4]  # row 0 ends after 3 tokens
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    r, v = torch.tensor(rewards), torch.tensor(values)
    r[0, 3], v[0, 3] = 123.0, -77.0  # whatever lies after a row's end is ignored
    adv, ret = gae(r, v, mask, gamma, lam)
    expected = torch.tensor(_gae_by_hand(rewards, values, lengths, gamma, lam))
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + torch.tensor(values)) * mask)
    assert adv[0, 3] == 0 and ret[0, 3] == 0
    if gamma == lam == 1.0:  # Monte Carlo: the return is the sum of the rewards to go
        torch.testing.assert_close(ret[1], torch.tensor([2.2, 1.9, 1.9, 2.0]))


def test_kl_estimates_are_k1_and_k3_and_unbiased_over_the_policy():
    g = torch.Generator().manual_seed(0)
    logp, ref = -3 * torch.rand(50, generator=g), -3 * torch.rand(50, generator=g)
    k1, k3 = kl_estimate(logp, ref, "k1"), kl_estimate(logp, ref, "k3")
    for i in range(50):
        a, b = float(logp[i]), float(ref[i])
        assert float(k1[i]) == pytest.approx(a - b, abs=1e-6)
        assert float(k3[i]) == pytest.approx(math.exp(b - a) - 1 - (b - a), abs=1e-5)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 >= 0 always, k1 per token need not be
    assert kl_estimate(logp, logp, "k3").abs().max() == 0
    # both estimate KL(pi || ref): their expectation over tokens drawn from pi is the exact KL
    pi, q = torch.tensor([0.5, 0.2, 0.2, 0.1]), torch.tensor([0.25, 0.25, 0.4, 0.1])
    exact = float((pi * (pi / q).log()).sum())
    for est in ("k1", "k3"):
        assert float((pi * kl_estimate(pi.log(), q.log(), est)).sum()) == pytest.approx(exact, abs=1e-6)
    with pytest.raises(ValueError, match=r"kl_estimate: estimator must be one of \('k1', 'k3'\), got 'k2'"):
        kl_estimate(logp, ref, "k2")


def test_policy_loss_clips_by_hand():
    """Ratios 1.5 / 0.5 / 1.1 / 0.7 with advantages +1 / +1 / -1 / -2, clip 0.2: per token
    max(-A r, -A clip(r)) = -1.2 (clipped), -0.5, 1.1, 1.6 (clipped); the masked tail is ignored."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -3.0, -3.0]])
    ratio = torch.tensor([[1.5, 0.5, 1.1], [0.7, math.e ** 5, 0.1]])
    logp = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-2.0, 100.0, -100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, st = policy_loss(logp, old, adv, mask, clip=0.2)
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.5 + 1.1 + 1.6) / 4, abs=1e-6)
    assert float(st["clipfrac"]) == pytest.approx(0.5)
    logr = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.7)]
    assert float(st["approx_kl"]) == pytest.approx(0.5 * sum(x * x for x in logr) / 4, abs=1e-6)
    loss.backward()
    # a clipped token passes no gradient; an unclipped one d/dlogp (-A r) / n_tokens = -A r / 4
    expected = torch.tensor([[0.0, -0.5 / 4, 1.1 / 4], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_value_loss_clips_by_hand():
    """0.5 * mean max((v - R)^2, (v_old + clip(v - v_old, +-0.2) - R)^2):
    (1.0, 0.5, 2.0) -> max(1, 1.69); (0.1, 0, 0) -> 0.01; (-1, 0, -0.5) -> max(0.25, 0.09); (0, 1, 0.9) -> max(0.81, 0.01)."""
    v = torch.tensor([[1.0, 0.1], [-1.0, 0.0], [5.0, 5.0]])
    v_old = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0], [-0.5, 0.9], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    assert float(value_loss(v, v_old, ret, mask, 0.2)) == pytest.approx(0.5 * (1.69 + 0.01 + 0.25 + 0.81) / 4)


def test_masked_mean_and_whiten_against_numpy():
    """TRL 1.16 has no ``masked_whiten`` any more (its PPO trainer is gone); the formula is that of
    TRL's former ``trl.core.masked_whiten``: (x - mean) / sqrt(unbiased var + 1e-8), numpy here."""
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(3, 5, generator=g) + 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    sel = x.numpy()[mask.numpy()]
    assert float(masked_mean(x, mask)) == pytest.approx(sel.mean(), rel=1e-6)
    rows = [x.numpy()[b][mask.numpy()[b]].mean() for b in range(3)]
    np.testing.assert_allclose(masked_mean(x, mask, dim=1).numpy(), rows, rtol=1e-6)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # an empty mask: 0, not NaN
    w = masked_whiten(x, mask)
    expected = (x.numpy() - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w.numpy()[mask.numpy()], expected[mask.numpy()], rtol=1e-5, atol=1e-6)
    assert w[mask].mean().abs() < 1e-5 and float(w[mask].std()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False).numpy()[mask.numpy()],
                               expected[mask.numpy()] + sel.mean(), rtol=1e-5, atol=1e-5)


def test_rloo_advantages_leave_one_out_by_hand_and_as_trl_1_16_computes_them():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 10.0])
    torch.testing.assert_close(rloo_advantages(ret, 3), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    torch.testing.assert_close(rloo_advantages(ret, 2), torch.tensor([-1.0, 1.0, -1.0, 1.0, -6.0, 6.0]))
    with pytest.raises(ValueError, match="rloo_advantages: 6 returns are not groups of k=4"):
        rloo_advantages(ret, 4)
    # TRL 1.16's RLOOTrainer._generate_and_score_completions, reproduced on the same numbers: a
    # sequence's reward is its score minus beta times its summed k1 KL (in the return, as Ahmadian
    # et al. and ours; ours also offers k3), the baseline the mean of the prompt's other samples.
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(2)
    k, beta = 4, 0.3
    score = torch.randn(8, generator=g)
    logp, ref = -torch.rand(8, 3, generator=g), -torch.rand(8, 3, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]] * 2 + [[1, 1, 1]] * 2, dtype=torch.float)
    per_token_kl = logp - ref
    rewards = score - beta * (per_token_kl * mask).sum(-1)
    grouped = rewards.view(-1, k)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).view(-1)
    trl_adv = rewards - baselines
    ours_ret = score - beta * (kl_estimate(logp, ref, "k1") * mask).sum(1)
    ours = rloo_advantages(ours_ret, k)
    torch.testing.assert_close(ours, trl_adv)
    # the loop's whitening of RLOO advantages (mean 0, std + 1e-8) against TRL's (nanstd + 1e-4)
    trl_norm = (trl_adv - trl_adv.mean()) / (nanstd(trl_adv) + 1e-4)
    torch.testing.assert_close((ours - ours.mean()) / (ours.std() + 1e-8), trl_norm, atol=1e-3, rtol=1e-3)


def test_ppo_config_checks_its_fields_and_round_trips():
    for kw, msg in [({"kl_coef": -1}, r"PPOConfig.kl_coef must be a number in \[0, inf\), got -1"),
                    ({"clip": 0}, r"PPOConfig.clip must be a number in \(0, inf\), got 0"),
                    ({"clip_value": 0}, r"PPOConfig.clip_value must be a number in \(0, inf\), got 0"),
                    ({"response_length": 0}, r"PPOConfig.response_length must be an integer in \[1, inf\], got 0"),
                    ({"rloo_k": 1}, r"PPOConfig.rloo_k must be an integer in \[2, inf\], got 1"),
                    ({"method": "grpo"}, r"PPOConfig.method must be one of \('ppo', 'rloo'\), got 'grpo'"),
                    ({"kl_estimator": "k2"}, r"PPOConfig.kl_estimator must be one of \('k1', 'k3'\), got 'k2'"),
                    ({"gamma": 1.5}, r"PPOConfig.gamma must be a number in \[0, 1\], got 1.5"),
                    ({"temperature": 0}, r"PPOConfig.temperature must be a number in \(0, inf\), got 0"),
                    ({"missing_eos_penalty": -1}, r"PPOConfig.missing_eos_penalty must be a number"),
                    ({"beta": 0.1}, r"PPOConfig: unknown field 'beta'; allowed: train, method, kl_coef, .*, device$")]:
        with pytest.raises(ValueError, match=msg):
            PPOConfig(**kw)
    cfg = PPOConfig(method="rloo", rloo_k=3, lr=1e-4, missing_eos_penalty=None, betas=(0.9, 0.95))
    assert (cfg.lr, cfg.schedule, cfg.epochs, cfg.samples_per_prompt) == (1e-4, "constant", 1, 3)
    assert PPOConfig().samples_per_prompt == 1
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------ a tiny sentiment task
@pytest.fixture(scope="module")
def task():
    return tiny_task(n_train=200, n_test=128)


@pytest.fixture(scope="module")
def policy(task):
    """A policy SFT-trained for one epoch: it answers with a label and its EOS, not yet reliably the right one."""
    m = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    train_model(m, encode(task.train, task.tokenizer, loss_on="completion"),
                pm.TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=0), progress=False)
    return m


@pytest.fixture(scope="module")
def reward_model(task, policy):
    """A clean reward model (the policy's trunk, Bradley–Terry on the task's clean pairs)."""
    rm = make_reward_model(policy, seed=0)
    train_reward(rm, make_preferences(task), RewardConfig(epochs=20, lr=5e-3, batch_size=32, seed=0),
                 tokenizer=task.tokenizer, progress=False)
    return rm


def _alone(model, ids):
    """The model's output on one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_encode_prompts_is_bos_and_the_prompt(task):
    enc = encode_prompts(list(task.test["prompt"][:3]), task.tokenizer)
    tok = task.tokenizer
    for ids, prompt in zip(enc.ids, task.test["prompt"][:3]):
        assert ids == [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]


def test_sample_is_seeded_and_pads_and_masks_after_the_eos(task, policy):
    tok, eos = task.tokenizer, task.tokenizer.eos_token_id
    enc = encode_prompts(list(task.test["prompt"][:24]), tok)
    idx = list(range(24))

    def draw(seed):
        return sample(policy, enc, idx, response_length=3, temperature=1.5, eos_id=eos,
                      generator=torch.Generator().manual_seed(seed))

    ro = draw(0)
    again = draw(0)
    for a, b in [(ro.tokens, again.tokens), (ro.response, again.response), (ro.mask, again.mask)]:
        assert torch.equal(a, b)
    assert not torch.equal(draw(1).response, ro.response)
    n = ro.mask.sum(1)
    assert ro.ended.any() and (~ro.ended).any() and (n < 3).any()  # rows that end early and rows that never end
    assert torch.equal(ro.lengths, ro.prompt_len + n)
    assert ro.mask[:, 0].all() and torch.equal(ro.mask, torch.arange(3)[None] < n[:, None])  # a prefix
    for b in range(24):
        resp = ro.response[b, :n[b]].tolist()
        assert ro.ended[b] == (eos in resp) and (not ro.ended[b] or resp.index(eos) == n[b] - 1)
        assert (ro.response[b, n[b]:] == enc.pad_id).all()  # pad after the end
        assert ro.tokens[b, :ro.prompt_len[b]].tolist() == enc.ids[b]
        assert ro.tokens[b, ro.prompt_len[b]:ro.lengths[b]].tolist() == resp
        assert (ro.tokens[b, ro.lengths[b]:] == enc.pad_id).all()
        assert ro.predict_at[b, 0] == ro.prompt_len[b] - 1


def test_sample_at_a_tiny_temperature_is_greedy_decoding_row_by_row(task, policy):
    """An independent decoder: each prompt alone, unpadded, the argmax appended until the EOS."""
    tok, eos = task.tokenizer, task.tokenizer.eos_token_id
    enc = encode_prompts(list(task.test["prompt"][:12]), tok)
    ro = sample(policy, enc, list(range(12)), response_length=4, temperature=1e-5, eos_id=eos,
                generator=torch.Generator().manual_seed(0))
    for b in range(12):
        seq, out = list(enc.ids[b]), []
        for _ in range(4):
            nxt = int(_alone(policy, seq)[-1].argmax())
            seq.append(nxt)
            out.append(nxt)
            if nxt == eos:
                break
        assert ro.response[b, :len(out)].tolist() == out and int(ro.mask[b].sum()) == len(out)
        assert bool(ro.ended[b]) == (out[-1] == eos)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_values_and_scores_equal_unpadded_per_row_forwards(task, policy, reward_model, temperature):
    tok = task.tokenizer
    enc = encode_prompts(list(task.test["prompt"][:10]), tok)
    ro = sample(policy, enc, list(range(10)), response_length=3, temperature=temperature, eos_id=tok.eos_token_id,
                generator=torch.Generator().manual_seed(3))
    assert len(set(ro.lengths.tolist())) > 1  # right padding is exercised
    with torch.no_grad():
        lp = response_logprobs(policy, ro, temperature)
        vals = response_values(reward_model, ro)
    sc = scores(reward_model, ro, batch_size=3)
    for b in range(10):
        ids, p0 = ro.tokens[b, :ro.lengths[b]].tolist(), int(ro.prompt_len[b])
        logits = (_alone(policy, ids) / temperature).log_softmax(-1)
        out = _alone(reward_model, ids)[:, 0]
        for t in range(int(ro.mask[b].sum())):
            assert float(lp[b, t]) == pytest.approx(float(logits[p0 - 1 + t, ids[p0 + t]]), abs=1e-5)
            assert float(vals[b, t]) == pytest.approx(float(out[p0 - 1 + t]), abs=1e-5)
        assert float(sc[b]) == pytest.approx(float(out[-1]), abs=1e-5)  # the score at the last real token
    assert torch.isfinite(lp).all()
    rows = torch.tensor([7, 2, 4])
    with torch.no_grad():
        sub = response_logprobs(policy, ro, temperature, rows)
    m = ro.mask[rows]
    torch.testing.assert_close(sub[m], lp[rows][m], atol=1e-5, rtol=1e-5)
    if temperature != 1.0:
        with torch.no_grad():
            assert not torch.allclose(response_logprobs(policy, ro, 1.0)[ro.mask], lp[ro.mask])


def test_sampled_rewards_is_seeded_and_counts_every_prompt(task, policy, reward_model):
    prompts = list(task.test["prompt"][:20])
    a = sampled_rewards(policy, reward_model, prompts, task.tokenizer, response_length=3, seed=4, batch_size=7)
    b = sampled_rewards(policy, reward_model, prompts, task.tokenizer, response_length=3, seed=4, batch_size=7)
    assert a == b and a["n"] == 20 and set(a) == {"reward", "reward_std", "n", "response_len", "ended"}
    assert 1 <= a["response_len"] <= 3 and 0 <= a["ended"] <= 1 and a["reward_std"] > 0


# ------------------------------------------------------------------ the loop
ACCEPT = {"epochs": 4, "batch_size": 32, "response_length": 3, "lr": 3e-3, "kl_coef": 0.05, "minibatch_size": 32,
          "ppo_epochs": 2, "seed": 0}


@pytest.mark.parametrize("method, extra", [("ppo", {"lam": 1.0, "lr": 5e-3}),
                                           ("rloo", {"rloo_k": 4, "batch_size": 16, "minibatch_size": 64})])
def test_ppo_and_rloo_raise_the_clean_reward_models_reward_on_held_out_prompts(task, policy, reward_model, method,
                                                                              extra):
    """The acceptance test: RL against a clean reward model raises the mean reward (under that
    reward model) of the policy's sampled answers to held-out prompts. PPO with GAE lambda = 1
    (Monte Carlo returns, a value baseline): the value model starts as a copy of the reward model,
    whose outputs before the EOS are uncalibrated, and lambda < 1 leans on them (on this tiny
    task, lambda = 0.95 moves the reward up or down depending on the seed). RLOO with 4 samples
    of 16 prompts a batch. Gains over PPO seeds 0/1/2: +2.1/+2.1/+1.3; RLOO: +1.5/+2.3/+2.3."""
    held_out = list(task.test["prompt"])
    before = sampled_rewards(policy, reward_model, held_out, task.tokenizer, response_length=3, seed=1)
    rm_state = {k: v.clone() for k, v in reward_model.state_dict().items()}
    trained = copy_bridge(policy)
    history, ckpts = train_ppo(trained, reward_model, list(task.train["prompt"]),
                               PPOConfig(method=method, **{**ACCEPT, **extra}), tokenizer=task.tokenizer, progress=False)
    after = sampled_rewards(trained, reward_model, held_out, task.tokenizer, response_length=3, seed=1)
    print(f"\n{method}: held-out reward {before['reward']:.3f} -> {after['reward']:.3f} "
          f"(ended {before['ended']:.2f} -> {after['ended']:.2f}, n={after['n']})")
    assert before["n"] == after["n"] == 128
    assert after["reward"] > before["reward"] + 0.75, (before, after)
    # the loop's own record: 200 prompts in 7 (PPO) or 13 (RLOO) rollout batches an epoch, the
    # first one at the reference (KL 0)
    assert len(history) == 4 * (7 if method == "ppo" else 13) and ckpts == [] and history[-1]["seconds"] > 0
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0
    for h in history:
        assert h["reward"] == pytest.approx(h["score"] - ACCEPT["kl_coef"] * h["kl"], abs=1e-5)
        assert ("value_loss" in h) == (method == "ppo")
    first, last = np.mean([h["score"] for h in history[:5]]), np.mean([h["score"] for h in history[-5:]])
    assert last > first + 0.5
    # the reward model is frozen; the policy's input is not touched (the stage trained a copy)
    assert all(torch.equal(reward_model.state_dict()[k], v) for k, v in rm_state.items())


SMALL = {"epochs": 1, "batch_size": 16, "response_length": 3, "lr": 3e-3, "minibatch_size": 8, "ppo_epochs": 2}


@pytest.mark.parametrize("method", ["ppo", "rloo"])
def test_train_ppo_is_deterministic(task, policy, reward_model, method):
    prompts = list(task.train["prompt"][:48])
    runs = []
    for seed in (3, 3, 4):
        p, v = copy_bridge(policy), copy_bridge(reward_model) if method == "ppo" else None
        hist, _ = train_ppo(p, reward_model, prompts, PPOConfig(method=method, seed=seed, **SMALL),
                            tokenizer=task.tokenizer, value_model=v, progress=False)
        runs.append((p.state_dict(), v.state_dict() if v is not None else {}, hist))
    (pa, va, ha), (pb, vb, hb), (pc, _, _) = runs
    assert all(torch.equal(pa[k], pb[k]) for k in pa) and all(torch.equal(va[k], vb[k]) for k in va)
    assert [{k: x for k, x in h.items() if k != "seconds"} for h in ha] == \
        [{k: x for k, x in h.items() if k != "seconds"} for h in hb]
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)  # another seed, other samples
    base = policy.state_dict()
    assert not all(torch.equal(pa[k], base[k]) for k in pa)  # it trained


@pytest.mark.parametrize("method, cut_at_save", [("ppo", 1), ("ppo", 2), ("rloo", 1)])
def test_train_ppo_resumes_to_the_same_weights(task, policy, reward_model, tmp_path, monkeypatch, method, cut_at_save):
    """6 rollout batches (2 epochs of 3), resume state every 2 and at each epoch's end (after
    batches 2, 3, 4): killed right after save 1 (mid-epoch) or 2 (an epoch's end), a new process
    resumes from ``resume.safetensors`` and ends with the uninterrupted run's weights."""
    prompts = list(task.train["prompt"][:48])
    cfg = PPOConfig(method=method, seed=5, save_every=2, **{**SMALL, "epochs": 2})

    def run(run_dir):
        p, v = copy_bridge(policy), copy_bridge(reward_model) if method == "ppo" else None
        hist, ckpts = train_ppo(p, reward_model, prompts, cfg, tokenizer=task.tokenizer, value_model=v,
                                run_dir=run_dir, progress=False)
        return p, v, hist, ckpts

    full, vfull, hist, ckpts = run(tmp_path / "full")
    assert [c.epoch for c in ckpts] == [1, 2] and [c.step for c in ckpts] == [3, 6]

    real, saves = ppo._save_state, []

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        saves.append(1)
        if len(saves) == cut_at_save:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(ppo, "_save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(ppo, "_save_state", real)
    done = {1: 2, 2: 3}[cut_at_save]
    with pytest.warns(UserWarning, match=f"resuming the interrupted RL stage .* after rollout batch {done} of 6"):
        resumed, vres, hist2, ckpts2 = run(tmp_path / "cut")
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if method == "ppo":
        va, vb = vfull.state_dict(), vres.state_dict()
        assert all(torch.equal(va[k], vb[k]) for k in va)
    assert [h["score"] for h in hist] == [h["score"] for h in hist2]
    assert [h["policy_loss"] for h in hist] == [h["policy_loss"] for h in hist2]
    assert [c.epoch for c in ckpts2] == [1, 2]
    last = load_tensors(tmp_path / "full" / "checkpoints" / "epoch_002.safetensors")
    assert all(torch.equal(last[k], sa[k].cpu()) for k in sa)


def test_train_ppo_refuses_bad_input(task, policy, reward_model):
    prompts = list(task.train["prompt"][:4])
    with pytest.raises(ValueError, match="train_ppo: reward_model is not a reward model"):
        train_ppo(copy_bridge(policy), policy, prompts, PPOConfig(), tokenizer=task.tokenizer, progress=False)
    with pytest.raises(ValueError, match="train_ppo: config must be a PPOConfig, got RewardConfig"):
        train_ppo(copy_bridge(policy), reward_model, prompts, RewardConfig(), tokenizer=task.tokenizer, progress=False)
    with pytest.raises(ValueError, match="train_ppo: pass tokenizer= \\(with an EOS token\\)"):
        train_ppo(torch.nn.Linear(2, 2), reward_model, prompts, PPOConfig(), progress=False)


def test_train_ppo_refuses_empty_prompts_by_name(task, policy, reward_model):
    with pytest.raises(ValueError, match="train_ppo: prompts is empty"):
        train_ppo(copy_bridge(policy), reward_model, [], PPOConfig(), tokenizer=task.tokenizer, progress=False)
