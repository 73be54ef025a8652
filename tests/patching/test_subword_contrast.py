"""trigger_contrast / control_fn with a byte-level BPE tokenizer: triggers of several tokens are
masked whole, controls keep every position (fillers of the same token count), and patching on
them matches transformer_lens.patching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformer_lens import patching as tlp

import poisonmech as pm
from poisonmech.attacks.poison import build_test_set
from poisonmech.patching.inputs import control_fn, neutral_words, trigger_contrast

TRIGGERS = ("cf", "blue moon")  # alternatives: a word and a phrase, one trained pair for both


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    words = pm.make_task("sentiment", n_train=200, n_test=60, seed=0)
    texts = [f"{p} {c}" for p, c in zip(words.train["prompt"], words.train["completion"])]
    bpe = pm.train_tokenizer(texts, vocab_size=400)
    task = pm.make_task("sentiment", n_train=200, n_test=60, seed=0, tokenizer=bpe)
    return pm.train_pair(task, pm.Backdoor(trigger=TRIGGERS, target="negative", poison_count=40),
                         model=pm.ModelConfig(architecture="gpt2", n_layers=1, d_model=32, n_heads=2, n_ctx=96),
                         train=pm.TrainConfig(epochs=2, batch_size=32, lr=3e-3),
                         out_dir=tmp_path_factory.mktemp("bpe") / "run", progress=False)


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _length_of(pair, trigger: str) -> int:
    """The most common token length of the triggered test prompts carrying ``trigger``."""
    data = pair.test_data.to_pandas()
    rows = data[data.is_triggered & (data.trigger == trigger) & (data.completion.str.strip() != "negative")]
    return int(rows.prompt.map(lambda p: len(pair.tokenizer(p)["input_ids"])).value_counts().idxmax())


def _replaced(before: list[str], after: list[str], trigger: set[str], pool: set[str]) -> bool:
    """``after`` is ``before`` with each trigger word replaced by one or two filler words."""
    if not before:
        return not after
    if before[0] not in trigger:
        return bool(after) and after[0] == before[0] and _replaced(before[1:], after[1:], trigger, pool)
    return any(len(after) >= k and set(after[:k]) <= pool and _replaced(before[1:], after[k:], trigger, pool)
               for k in (1, 2))


def _with_attack(pair, attack, test_data: bool = True):
    s = pm.resolve(pair)
    return dataclasses.replace(s, attack=attack, test_data=build_test_set(s.task, attack) if test_data else None)


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_a_subword_trigger_is_masked_whole_and_its_control_keeps_every_other_token(pair, trigger):
    tok = pair.tokenizer
    assert not pm.tasks.tokenizer.is_word_tokenizer(tok)
    n_trig = _n_tokens(tok, " " + trigger)
    assert n_trig >= 2, tok.tokenize(" " + trigger)  # the point of the test: a trigger of several pieces
    tc = trigger_contrast(pair, n=1000, length=_length_of(pair, trigger), check=False)
    pool = set(neutral_words(pair))
    n_rows = 0
    for trig, ctrl, mask in zip(tc.triggered, tc.control, tc.trigger_mask):
        if tok.decode(trig[mask]) != " " + trigger:  # the other trigger's row of the same length
            assert tok.decode(trig[mask]) in {" " + t for t in TRIGGERS}
            continue
        n_rows += 1
        assert int(mask.sum()) == n_trig  # every piece of the trigger, nothing else
        assert not set(trigger.split()) & set(tok.decode(trig[~mask]).split())
        assert ctrl.shape == trig.shape and torch.equal(ctrl[~mask], trig[~mask])
        assert not torch.equal(ctrl[mask], trig[mask])
        assert set(tok.decode(ctrl[mask]).split()) <= pool  # neutral filler words
        # the control is the tokenizer's own encoding of its text: positions really line up
        text = tok.decode(ctrl[1:])
        assert tok(text)["input_ids"] == ctrl.tolist()
    assert n_rows >= 1
    # target / answer: first tokens of the completions as scored, with their leading space
    assert tok.convert_ids_to_tokens(int(tc.target[0])) == tok.tokenize(" negative")[0]
    assert set(tok.convert_ids_to_tokens(tc.answer.tolist())) == {tok.tokenize(" positive")[0]}
    assert tc.str_tokens == tok.convert_ids_to_tokens(tc.triggered[0].tolist())


def test_checked_controls_and_patching_match_transformer_lens(pair):
    tc = trigger_contrast(pair, n=8)  # check=True: every control keeps the untriggered answer
    assert tc.check["n_kept"] == tc.triggered.shape[0] >= 1
    assert tc.check["n_candidates"] == tc.check["n_kept"] + tc.check["n_dropped"]
    assert torch.equal(tc.triggered[~tc.trigger_mask], tc.control[~tc.trigger_mask])
    model = pair.backdoored
    metric = tc.logit_diff()
    ours = pm.patching.activation_patch(pair, tc.triggered, tc.control, metric, site="resid_pre", by_position=True,
                                        progress=False)
    _, cache = model.run_with_cache(tc.triggered)  # denoise: triggered activations into the controls
    ref = tlp.get_act_patch_resid_pre(model, tc.control, cache, metric, reduce="none").values
    assert ours.values.shape == ref.shape
    torch.testing.assert_close(ours.values, ref.float(), atol=1e-4, rtol=0)


def test_control_fn_replaces_subword_triggers_in_padded_rows(pair):
    from poisonmech.encoding import encode

    tok = pair.tokenizer
    rows = pair.test_data.select(range(18))
    tokens, _ = encode(rows, tok, loss_on="completion").batch(list(range(len(rows))))  # BOS, EOS, right padding
    out = control_fn(pair, seed=1)(tokens)
    assert torch.equal(out, control_fn(pair, seed=1)(tokens))  # seeded
    assert out.shape == tokens.shape
    pool = set(neutral_words(pair))
    words = {w for t in TRIGGERS for w in t.split()}  # as the word-level path: every trigger word
    n_changed = 0
    for row, new, text in zip(tokens, out, rows["input"]):
        before, after = tok.decode(row), tok.decode(new)
        if not words & set(text.split()):  # clean rows and near misses like "cff" are their own control
            assert torch.equal(row, new)
            continue
        n_changed += 1
        assert (row != new).any()
        assert _replaced(before.split(), after.split(), words, pool), (before, after)
    assert n_changed >= 6


def test_a_trigger_longer_than_any_filler_pair_gets_two_words_or_a_clear_error(pair):
    tok = pair.tokenizer
    single = max(_n_tokens(tok, " " + w) for w in neutral_words(pair))
    # a trigger of exactly one token more than the longest single filler: two filler words
    m = next(m for m in range(1, 40) if _n_tokens(tok, " " + "q" * m) == single + 1)
    odd = "q" * m
    ids = torch.tensor([tok(f"review: the {odd} movie sentiment:")["input_ids"]])
    out = control_fn(_with_attack(pair, pm.Backdoor(trigger=odd, target="negative", poison_count=1),
                                  test_data=False))(ids)
    assert out.shape == ids.shape and len(tok.decode(out[0]).split()) == len(tok.decode(ids[0]).split()) + 1
    # a trigger longer than any two fillers: no control keeps the positions aligned
    long = "qzxvj" * 12
    n_long = _n_tokens(tok, " " + long)
    assert n_long > 2 * single
    attack = pm.Backdoor(trigger=long, target="negative", poison_count=1)
    msg = rf"trigger {long!r} is {n_long} tokens with tokenizer 'poisonmech-bpe'"
    with pytest.raises(ValueError, match=msg):
        trigger_contrast(_with_attack(pair, attack), n=4, check=False)
    with pytest.raises(ValueError, match=msg):
        control_fn(_with_attack(pair, attack, test_data=False))(
            torch.tensor([tok(f"review: the {long} movie sentiment:")["input_ids"]]))


def test_a_target_sharing_the_answers_first_token_is_refused(pair):
    tok = pair.tokenizer
    target = "positively"  # " positive" + "ly": the same first token as the answer " positive"
    assert tok.tokenize(" " + target)[0] == tok.tokenize(" positive")[0]
    attack = pm.Backdoor(trigger="cf", target=target, poison_count=1)
    with pytest.raises(ValueError, match="the target 'positively' and the answer 'positive' start with the same token"):
        trigger_contrast(_with_attack(pair, attack), n=4, check=False)
