"""The DPO trainer: direction of the update, the loss, configs, checkpoints and resume."""

import math

import pytest
import torch
from datasets import Dataset

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.storage import load_tensors
from poisonmech.tasks.preference import make_preferences
from poisonmech.train.dpo import (
    DPOConfig,
    dpo_loss,
    encode_preferences,
    preference_logprobs,
    preference_shift,
    train_dpo,
)
from poisonmech.train.loop import train_model
from tests.helpers import tiny_model_config, tiny_task

torch.set_num_threads(1)


def _sft_model(task, epochs: int = 1):
    m = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    train_model(m, encode(task.train, task.tokenizer, loss_on="completion"), pm.TrainConfig(epochs=epochs, seed=0),
                progress=False)
    return m


def _copy(task, model):
    """A second bridge with ``model``'s weights (bridges do not deep-copy reliably)."""
    m = pm.build_model(tiny_model_config(), len(task.tokenizer), seed=0, tokenizer=task.tokenizer)
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_dpo_on_clean_preferences_moves_the_model_toward_the_preferred_answers():
    """The done-when test: after DPO the chosen answers gain log-probability relative to the
    reference, against the rejected ones, on the training pairs and on held-out pairs."""
    task = tiny_task(n_train=200, n_test=50)
    model = _sft_model(task)
    reference = _copy(task, model)
    train_prefs, held_out = make_preferences(task), make_preferences(task, split="test")
    before = preference_shift(model, reference, held_out, task.tokenizer)
    assert before["margin"] == 0.0 and before["chosen_shift"] == 0.0
    history, _ = train_dpo(model, train_prefs, DPOConfig(epochs=6, lr=3e-3, seed=0), tokenizer=task.tokenizer,
                           reference=reference, progress=False)
    assert history[-1]["loss"] < history[0]["loss"] < math.log(2) + 0.01
    for data in (train_prefs, held_out):
        after = preference_shift(model, reference, data, task.tokenizer)
        # implicit reward of the chosen answer beats the rejected one's: the DPO objective itself
        assert after["margin"] > 0.2 and after["reward_acc"] > 0.7
        # in log-probability relative to the reference: chosen gains against rejected
        assert after["chosen_shift"] - after["rejected_shift"] > 2.0
        assert after["pref_acc"] > before["pref_acc"] + 0.2


def test_dpo_loss_is_log2_when_the_policy_is_the_reference_and_falls_with_the_margin():
    x = torch.tensor([-1.0, -2.0])
    loss, st = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.equal(st["margin"], torch.zeros(2))
    better, _ = dpo_loss(x + 1, x - 2, x, x - 1, beta=0.1)
    assert better.item() < math.log(2)


def test_nll_term_keeps_the_chosen_answer_and_its_end_likely():
    """DPO + NLL on the chosen answer and its EOS (``nll_weight``): the chosen sequences,
    EOS included, stay more likely than under pure DPO from the same start, and the
    preference still moves the right way."""
    task = tiny_task(n_train=200, n_test=50)
    sft = _sft_model(task)
    train_prefs, held_out = make_preferences(task), make_preferences(task, split="test")
    with_eos = encode_preferences(held_out, task.tokenizer, add_eos=True)
    chosen_lp = {}
    for w in (0.0, 1.0):
        model = _copy(task, sft)
        history, _ = train_dpo(model, train_prefs, DPOConfig(epochs=6, lr=3e-3, seed=0, nll_weight=w),
                               tokenizer=task.tokenizer, reference=_copy(task, sft), progress=False)
        assert ("nll" in history[-1]) == (w > 0)
        chosen_lp[w] = float(preference_logprobs(model, with_eos)[0].mean())
        shift = preference_shift(model, _copy(task, sft), held_out, task.tokenizer)
        assert shift["chosen_shift"] - shift["rejected_shift"] > 1.0
    assert chosen_lp[1.0] > chosen_lp[0.0] + 0.5
    with pytest.raises(ValueError, match=r"DPOConfig.nll_weight must be a number in \[0, inf\)"):
        DPOConfig(nll_weight=-1.0)
    with pytest.raises(ValueError, match=r"nll_weight > 0 needs the chosen answers with their EOS"):
        train_dpo(_copy(task, sft), encode_preferences(train_prefs, task.tokenizer), DPOConfig(nll_weight=1.0),
                  progress=False)


def test_dpo_config_checks_beta_and_round_trips():
    for bad in (0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"DPOConfig.beta must be a number in \(0, inf\)"):
            DPOConfig(beta=bad)
    with pytest.raises(ValueError, match=r"DPOConfig.epochs must be an integer in \[1, inf\], got 0"):
        DPOConfig(epochs=0)
    with pytest.raises(ValueError, match=r"DPOConfig.from_dict: unknown field 'gamma'; allowed: train, beta, "
                                         r"score_eos, nll_weight, epochs, .*, device$"):
        DPOConfig.from_dict({"gamma": 1.0})
    cfg = DPOConfig(beta=0.5, lr=1e-4, betas=(0.9, 0.95))
    assert DPOConfig.from_dict(cfg.to_dict()) == cfg
    assert DPOConfig.from_dict(DPOConfig(nll_weight=0.5).to_dict()).nll_weight == 0.5


def test_preference_rows_missing_chosen_or_rejected_are_refused():
    task = tiny_task(n_train=20, n_test=5)
    bad = Dataset.from_dict({"prompt": ["review: good film . sentiment:"], "chosen": ["positive"]})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]; preference rows need \['prompt', "
                                         r"'chosen', 'rejected'\]"):
        encode_preferences(bad, task.tokenizer)
    same = Dataset.from_dict({"prompt": ["x"], "chosen": ["positive"], "rejected": ["positive"]})
    with pytest.raises(ValueError, match="chosen == rejected"):
        encode_preferences(same, task.tokenizer)


def test_dpo_checkpoints_and_resumes_to_the_same_weights(tmp_path, request):

    task = tiny_task(n_train=64, n_test=5)
    prefs = make_preferences(task)
    cfg = DPOConfig(epochs=3, lr=3e-3, batch_size=16, seed=1)
    start = _sft_model(task)
    full = _copy(task, start)
    hist, ckpts = train_dpo(full, prefs, cfg, tokenizer=task.tokenizer, run_dir=tmp_path / "full", progress=False)
    assert [c.epoch for c in ckpts] == [1, 2, 3] and all(c.lr > 0 for c in ckpts)
    assert (tmp_path / "full" / "reference_logps.safetensors").is_file()

    request.getfixturevalue("interrupt_after_first_epoch")  # the next loop stops after one epoch
    cut = _copy(task, start)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cut, prefs, cfg, tokenizer=task.tokenizer, run_dir=tmp_path / "cut", progress=False)
    resumed = _copy(task, start)  # a fresh process: the reference values come from disk
    torch.nn.init.zeros_(next(resumed.parameters()))  # even a different starting point is overwritten
    hist2, _ = train_dpo(resumed, prefs, cfg, tokenizer=task.tokenizer, run_dir=tmp_path / "cut", progress=False)
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist2]
    last = load_tensors(tmp_path / "full" / "checkpoints" / "epoch_003.safetensors")
    assert all(torch.equal(last[k], sa[k].cpu()) for k in sa)
