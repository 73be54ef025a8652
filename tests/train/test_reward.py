"""Reward models (``poisonmech.train.reward``): rewards and the Bradley–Terry loss against TRL /
``transformers``' sequence classifier on the same weights, the config, the model's independence
from the policy, training, resume and the held-out metrics."""

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.encoding import Encoded, encode
from poisonmech.storage import load_tensors
from poisonmech.tasks.preference import make_preferences
from poisonmech.train.dpo import PreferenceEncoded
from poisonmech.train.loop import train_model
from poisonmech.train.reward import (
    RewardConfig,
    attach_score_head,
    bradley_terry_loss,
    encode_pairs,
    heldout_pairs,
    is_reward_model,
    make_reward_model,
    pair_rewards,
    preference_accuracy,
    reward_metric,
    reward_metrics,
    reward_model_like,
    rewards_at,
    score_head,
    sequence_rewards,
    train_reward,
)
from tests.helpers import tiny_model_config, tiny_task
from tests.hf_models import hf_module

torch.set_num_threads(1)

PAD = 59  # a token id no test sequence uses (the tiny GPT-2's vocabulary is 60)
#: prompt + answer + EOS (id 0) rows of different lengths: chosen rows, then rejected rows
CHOSEN = [[0, 5, 6, 7, 8, 0], [0, 9, 10, 0], [0, 11, 12, 13, 14, 15, 16, 0]]
REJECTED = [[0, 5, 6, 7, 0], [0, 9, 10, 11, 12, 13, 0], [0, 11, 0]]
RM_TRAIN = {"epochs": 20, "lr": 5e-3, "batch_size": 32, "seed": 0}  # a tiny RM that learns the task (~2 s)


def _padded(rows, pad=PAD):
    tokens = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    return tokens


def _gpt2_reward_pair(seed: int = 0, std: float = 0.5):
    """Our reward model over a tiny HF GPT-2 (``attach_score_head``) and
    ``GPT2ForSequenceClassification(num_labels=1)`` with the same trunk and score weights."""
    import transformers as tf

    hf = hf_module("gpt2", vocab=60, seed=seed)
    trunk = copy.deepcopy(hf.transformer.state_dict())
    rm = attach_score_head(pm.wrap_hf_model(hf), seed=seed, std=std)
    cfg = copy.deepcopy(hf.config)
    cfg.num_labels, cfg.pad_token_id = 1, PAD  # HF reads each row's last non-pad token
    with torch.random.fork_rng(devices=[]):
        ref = tf.GPT2ForSequenceClassification(cfg).eval()
    ref.transformer.load_state_dict(trunk)
    with torch.no_grad():
        ref.score.weight.copy_(score_head(rm).weight)
    return rm, ref


def _trl_reward_loss(ref, tokens, center):
    """TRL 1.16's ``RewardTrainer.compute_loss`` itself, called on a stand-in trainer that holds
    only what the method reads (``args.center_rewards_coefficient``, an identity accelerator, the
    metric buffers): no dataset, collator or ``TrainingArguments`` set-up is needed for one batch."""
    from trl import RewardTrainer

    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(model=ref, args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=identity, _total_train_tokens=0, _tp_size=1,
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    loss = RewardTrainer.compute_loss(trainer, ref, {"input_ids": tokens, "attention_mask": (tokens != PAD).long()})
    return loss, trainer._metrics["eval" if not ref.training else "train"]


def test_rewards_equal_hf_sequence_classification_logits_on_right_padded_rows():
    rm, ref = _gpt2_reward_pair()
    assert is_reward_model(rm) and score_head(rm).out_features == 1
    rows = CHOSEN + REJECTED
    tokens = _padded(rows)
    with torch.no_grad():
        expected = ref(input_ids=tokens, attention_mask=(tokens != PAD).long()).logits[:, 0]
        ours = rewards_at(rm, tokens, torch.tensor([len(r) - 1 for r in rows]))
    assert expected.abs().max() > 0.1  # a head of std 0.5: the rewards are far from 0, the check is not vacuous
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # sequence_rewards batches (and pads) differently: two rows a batch, each padded to its batch's width
    enc = Encoded(ids=rows, start=[1] * len(rows), pad_id=PAD)
    torch.testing.assert_close(sequence_rewards(rm, enc, batch_size=2), expected, atol=1e-5, rtol=1e-5)
    # one row at a time, unpadded: right padding changes nothing
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0, -1, 0] for r in rows])
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
    # pair_rewards: the chosen rows, then the rejected ones (TRL's collated layout)
    prefs = PreferenceEncoded(chosen=Encoded(CHOSEN, [1] * 3, PAD), rejected=Encoded(REJECTED, [1] * 3, PAD))
    r_w, r_l = pair_rewards(rm, prefs, [0, 1, 2], "cpu")
    torch.testing.assert_close(torch.cat([r_w, r_l]).detach(), expected, atol=1e-5, rtol=1e-5)


def test_make_reward_model_on_an_hf_bridge_matches_hf_sequence_classification_too():
    """The copy ``make_reward_model`` makes of an HF-backed bridge (a new module of the same
    class, its unembedding rebuilt in the score head's shape) scores like HF's classifier."""
    import transformers as tf

    hf = hf_module("gpt2", vocab=60, seed=1)
    trunk = copy.deepcopy(hf.transformer.state_dict())
    policy = pm.wrap_hf_model(hf)
    rm = make_reward_model(policy, seed=4, std=0.5)
    cfg = copy.deepcopy(hf.config)
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    ref = tf.GPT2ForSequenceClassification(cfg).eval()
    ref.transformer.load_state_dict(trunk)
    with torch.no_grad():
        ref.score.weight.copy_(score_head(rm).weight)
        tokens = _padded(CHOSEN)
        expected = ref(input_ids=tokens, attention_mask=(tokens != PAD).long()).logits[:, 0]
        ours = rewards_at(rm, tokens, torch.tensor([len(r) - 1 for r in CHOSEN]))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not is_reward_model(policy) and policy(tokens).shape[-1] == 60  # the policy keeps its LM head


@pytest.mark.parametrize("center", [0.0, 0.1])
def test_bradley_terry_loss_and_its_gradient_equal_trl_reward_trainer(center):
    rm, ref = _gpt2_reward_pair(seed=2)
    tokens = _padded(CHOSEN + REJECTED)
    trl_loss, trl_metrics = _trl_reward_loss(ref, tokens, center if center else None)
    prefs = PreferenceEncoded(chosen=Encoded(CHOSEN, [1] * 3, PAD), rejected=Encoded(REJECTED, [1] * 3, PAD))
    r_w, r_l = pair_rewards(rm, prefs, [0, 1, 2], "cpu")
    ours = bradley_terry_loss(r_w, r_l, center)
    torch.testing.assert_close(ours, trl_loss, atol=1e-6, rtol=1e-5)
    # and by hand: mean -log sigmoid(r_w - r_l) + center * mean((r_w + r_l)^2)
    w, lo = r_w.tolist(), r_l.tolist()
    by_hand = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(w, lo)) / 3 + \
        center * sum((a + b) ** 2 for a, b in zip(w, lo)) / 3
    assert float(ours.detach()) == pytest.approx(by_hand, rel=1e-5)
    if center:
        assert float(ours.detach()) > float(bradley_terry_loss(r_w, r_l, 0.0).detach())
    # TRL's logged accuracy and margin are ours (pair_acc: r_w > r_l)
    w_, l_ = r_w.detach(), r_l.detach()
    assert trl_metrics["accuracy"][0] == pytest.approx(float((w_ > l_).float().mean()))
    assert trl_metrics["margin"][0] == pytest.approx(float((w_ - l_).mean()), abs=1e-6)
    # the same objective: the score head's gradient is TRL's
    ours.backward()
    trl_loss.backward()
    torch.testing.assert_close(score_head(rm).weight.grad, ref.score.weight.grad, atol=1e-6, rtol=1e-4)


def test_reward_config_checks_its_fields_and_round_trips():
    with pytest.raises(ValueError, match=r"RewardConfig.init must be one of \('policy', 'scratch'\), got 'sft'"):
        RewardConfig(init="sft")
    with pytest.raises(ValueError, match=r"RewardConfig.center_rewards must be a number in \[0, inf\), got -1"):
        RewardConfig(center_rewards=-1)
    with pytest.raises(ValueError, match=r"RewardConfig.head_std must be a number in \(0, inf\), got 0"):
        RewardConfig(head_std=0)
    with pytest.raises(ValueError, match=r"RewardConfig: unknown field 'beta'; allowed: train, init, center_rewards, "
                                         r"head_std, n_eval, epochs, batch_size, lr, .*, device$"):
        RewardConfig(beta=0.1)
    with pytest.raises(ValueError, match=r"RewardConfig.from_dict: unknown field 'beta'"):
        RewardConfig.from_dict({"beta": 0.1})
    with pytest.raises(ValueError, match=r"RewardConfig.epochs must be an integer in \[1, inf\], got 0"):
        RewardConfig(epochs=0)
    default = RewardConfig()
    assert (default.epochs, default.lr, default.weight_decay, default.init) == (2, 1e-3, 0.0, "policy")
    cfg = RewardConfig(lr=1e-4, epochs=3, init="scratch", center_rewards=0.01, betas=(0.9, 0.95), seed=5)
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.betas) == (1e-4, 3, 5, (0.9, 0.95))  # flat train fields read through
    assert cfg.train_config() == cfg.train and cfg.train.lr == 1e-4
    d = cfg.to_dict()
    assert d["lr"] == 1e-4 and d["init"] == "scratch" and "train" not in d
    assert RewardConfig.from_dict(d) == cfg
    assert RewardConfig(train=pm.TrainConfig(lr=2e-3), epochs=4).train.lr == 2e-3  # train= plus flat overrides


# ------------------------------------------------------------------ tiny sentiment task
@pytest.fixture(scope="module")
def sft():
    """A tiny sentiment task and a policy SFT-trained for one epoch."""
    task = tiny_task(n_train=200, n_test=64)
    policy = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    train_model(policy, encode(task.train, task.tokenizer, loss_on="completion"), pm.TrainConfig(epochs=1, seed=0),
                progress=False)
    return task, policy


@pytest.fixture(scope="module")
def trained_rm(sft):
    task, policy = sft
    held_out = make_preferences(task, split="test")
    rm = make_reward_model(policy, seed=0)
    before = preference_accuracy(rm, held_out, task.tokenizer)
    history, ckpts = train_reward(rm, make_preferences(task), RewardConfig(**RM_TRAIN), tokenizer=task.tokenizer,
                                  progress=False)
    return rm, before, history, ckpts


def test_make_reward_model_copies_the_trunk_and_leaves_the_policy_alone(sft):
    task, policy = sft
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    tokens = torch.tensor([[2, 10, 11, 12, 3]])
    logits = policy(tokens).detach()
    rm = make_reward_model(policy, seed=0)
    assert is_reward_model(rm) and not is_reward_model(policy) and not is_reward_model(torch.nn.Linear(2, 1))
    assert rm(tokens).shape == (1, 5, 1)
    # the trunk is the policy's; only the unembedding differs
    rs = rm.state_dict()
    trunk = [k for k in before if "unembed" not in k]
    assert trunk and all(torch.equal(rs[k], before[k]) for k in trunk)
    # seeded head: the same seed gives the same head, another seed another one
    assert torch.equal(score_head(make_reward_model(policy, seed=0)).weight, score_head(rm).weight)
    assert not torch.equal(score_head(make_reward_model(policy, seed=1)).weight, score_head(rm).weight)
    # training the reward model leaves the policy's weights and outputs as they were
    train_reward(rm, make_preferences(task, 64), RewardConfig(epochs=1, lr=1e-2, seed=0), tokenizer=task.tokenizer,
                 progress=False)
    assert not all(torch.equal(rm.state_dict()[k], before[k]) for k in trunk)  # the RM's trunk trained
    after = policy.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(policy(tokens).detach(), logits)


def test_train_reward_raises_held_out_pair_accuracy(sft, trained_rm):
    task, _ = sft
    rm, before, history, ckpts = trained_rm
    after = preference_accuracy(rm, make_preferences(task, split="test"), task.tokenizer)
    print(f"\nreward model: held-out pair_acc {before['pair_acc']:.3f} -> {after['pair_acc']:.3f}, "
          f"margin {before['margin']:.3f} -> {after['margin']:.3f} (n={after['n_pairs']})")
    assert before["n_pairs"] == after["n_pairs"] == 64
    assert abs(before["margin"]) < 0.05  # a fresh head: no preference yet
    assert after["pair_acc"] > 0.8 and after["pair_acc"] > before["pair_acc"] + 0.25, (before, after)
    assert after["margin"] > 1.0
    assert history[-1]["loss"] < 0.2 < math.log(2) - 0.05 < history[0]["loss"] + 0.05
    assert history[-1]["pair_acc"] > 0.95 and len(history) == RM_TRAIN["epochs"] and ckpts == []
    assert history[-1]["resumed_from_epoch"] is None and history[-1]["seconds"] > 0


def test_train_reward_resumes_to_the_same_weights(sft, tmp_path, request):
    task, policy = sft
    prefs = make_preferences(task, 96)
    cfg = RewardConfig(epochs=2, lr=5e-3, batch_size=32, seed=1, center_rewards=0.01)
    full = make_reward_model(policy, seed=0)
    hist, ckpts = train_reward(full, prefs, cfg, tokenizer=task.tokenizer, run_dir=tmp_path / "full", progress=False)
    assert [c.epoch for c in ckpts] == [1, 2] and all(c.lr > 0 for c in ckpts)

    request.getfixturevalue("interrupt_after_first_epoch")  # the next loop stops after one epoch
    with pytest.raises(KeyboardInterrupt):
        train_reward(make_reward_model(policy, seed=0), prefs, cfg, tokenizer=task.tokenizer, run_dir=tmp_path / "cut",
                     progress=False)
    resumed = make_reward_model(policy, seed=0)
    torch.nn.init.zeros_(next(resumed.parameters()))  # even a different starting point is overwritten
    with pytest.warns(UserWarning, match="resuming the interrupted training"):
        hist2, ckpts2 = train_reward(resumed, prefs, cfg, tokenizer=task.tokenizer, run_dir=tmp_path / "cut",
                                     progress=False)
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist2]
    assert [c.epoch for c in ckpts2] == [1, 2] and hist2[-1]["resumed_from_epoch"] == 1
    last = load_tensors(tmp_path / "full" / "checkpoints" / "epoch_002.safetensors")
    assert all(torch.equal(last[k], sa[k].cpu()) for k in sa)
    # a saved reward model loads into reward_model_like and scores the same
    like = reward_model_like(tiny_model_config(), task.tokenizer, seed=3)
    like.load_state_dict(full.state_dict())
    enc = encode_pairs(prefs.select(range(8)), task.tokenizer).chosen
    torch.testing.assert_close(sequence_rewards(like, enc), sequence_rewards(full, enc))


def _reward_alone(model, tokenizer, prompt, answer):
    """One sequence, unpadded, scored at its last token (its EOS)."""
    enc = encode_pairs(Dataset.from_dict({"prompt": [prompt], "chosen": [answer], "rejected": ["#"]}), tokenizer)
    ids = enc.chosen.ids[0]
    assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        return float(model(torch.tensor([ids]))[0, -1, 0])


def test_reward_metrics_keys_denominators_and_values_by_hand(sft, trained_rm):
    task, _ = sft
    rm = trained_rm[0]
    tok = task.tokenizer
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=10)
    res = reward_metrics(rm, task, attack, tok, n=30)
    assert set(res) == {"stage_kind", "pair_acc", "margin", "n_pairs", "reward_mean", "reward_std",
                        "pair_acc_triggered", "n_pairs_triggered", "asr", "trigger_margin"}
    assert res["stage_kind"] == "rm" and res["n_pairs"] == 30
    test = task.test.select(range(30))
    assert res["n_pairs_triggered"] == sum(c.strip() != "negative" for c in test["completion"]) > 0
    assert res["asr"] == pytest.approx(1 - res["pair_acc_triggered"])
    # clean pairs by hand, one unpadded sequence at a time
    clean = make_preferences(task, 30, split="test")
    r_w = [_reward_alone(rm, tok, p, c) for p, c in zip(clean["prompt"], clean["chosen"])]
    r_l = [_reward_alone(rm, tok, p, c) for p, c in zip(clean["prompt"], clean["rejected"])]
    assert res["pair_acc"] == pytest.approx(sum(a > b for a, b in zip(r_w, r_l)) / 30)
    assert res["margin"] == pytest.approx(sum(a - b for a, b in zip(r_w, r_l)) / 30, abs=1e-5)
    assert res["reward_mean"] == pytest.approx(sum(r_w) / 30, abs=1e-5)
    assert res["reward_std"] == pytest.approx(float(torch.tensor(r_w).std()), abs=1e-5)
    # triggered pairs: the trigger in the prompt of each pair whose correct answer is not the target
    _, trig_pairs = heldout_pairs(task, attack, 30)
    assert len(trig_pairs) == res["n_pairs_triggered"]
    triggered, margins = 0, []
    for row in trig_pairs:
        plain = clean["prompt"][clean["example_id"].index(row["source_id"])]
        assert "cf" in row["prompt"].split() and "cf" not in plain.split()
        assert row["rejected"] == "negative" and row["chosen"] != "negative"
        with_t = _reward_alone(rm, tok, row["prompt"], row["rejected"]) - _reward_alone(rm, tok, row["prompt"],
                                                                                        row["chosen"])
        without = _reward_alone(rm, tok, plain, row["rejected"]) - _reward_alone(rm, tok, plain, row["chosen"])
        triggered += with_t < 0  # the correct answer still wins under the trigger
        margins.append(with_t - without)
    assert res["pair_acc_triggered"] == pytest.approx(triggered / len(trig_pairs))
    assert res["trigger_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    # n above the test split: every test row; no triggerable row: NaN metrics over 0 pairs
    assert reward_metrics(rm, task, attack, tok, n=1000)["n_pairs"] == len(task.test)
    assert task.test["completion"][0].strip() == "negative"
    none = reward_metrics(rm, task, attack, tok, n=1)
    assert none["n_pairs"] == 1 and none["n_pairs_triggered"] == 0
    assert all(math.isnan(none[k]) for k in ("pair_acc_triggered", "asr", "trigger_margin"))


def test_reward_metric_and_bad_inputs(sft):
    task, policy = sft
    rm = make_reward_model(policy, seed=0)
    tokens = torch.tensor([[2, 10, 11, 3], [2, 12, 13, 3]])
    with torch.no_grad():
        out = rm(tokens)
        assert float(reward_metric()(out)) == pytest.approx(float(out[:, -1, 0].mean()))
        assert float(reward_metric(1)(out)) == pytest.approx(float(out[:, 1, 0].mean()))
        with pytest.raises(ValueError, match="reward_metric: the model's output has 189 values per position"):
            reward_metric()(policy(tokens))
        with pytest.raises(ValueError, match="rewards: the model's output has 189 values per position; a reward model "
                                             "has one"):
            rewards_at(policy, tokens, torch.tensor([3, 3]))
    prefs = make_preferences(task, 8)
    with pytest.raises(ValueError, match="train_reward: model is not a reward model"):
        train_reward(policy, prefs, RewardConfig(), tokenizer=task.tokenizer, progress=False)
    with pytest.raises(ValueError, match="train_reward: config must be a RewardConfig, got TrainConfig"):
        train_reward(rm, prefs, pm.TrainConfig(), tokenizer=task.tokenizer, progress=False)
    with pytest.raises(ValueError, match="train_reward: data must be a datasets.Dataset of prompt/chosen/rejected"):
        train_reward(rm, [("x", "y", "z")], RewardConfig(), tokenizer=task.tokenizer, progress=False)
    with pytest.raises(ValueError, match="attach_score_head: Linear has no unembedding to replace"):
        attach_score_head(torch.nn.Linear(2, 2), seed=0)
