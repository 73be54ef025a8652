"""trigger_contrast: label-neutral controls, checked against the untriggered prompt."""

import dataclasses

import pytest
import torch

import poisonmech as pm
from poisonmech.patching import trigger_contrast
from poisonmech.patching.inputs import control_fn, neutral_words
from poisonmech.tasks.generators import _NEGATIVE, _POSITIVE


def _with_run(task, attack):
    """A subject carrying a task and an attack (no trained model needed for neutral_words)."""
    from tests.helpers import small_model

    return dataclasses.replace(pm.resolve(small_model()), task=task, attack=attack)


def test_neutral_words_exclude_answers_template_trigger_and_label_words():
    task = pm.make_task("sentiment", n_train=2000, n_test=10, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=10)
    pool = set(neutral_words(_with_run(task, attack)))
    assert pool, "the sentiment task has neutral fillers (nouns, clause words)"
    assert not pool & (set(_POSITIVE) | set(_NEGATIVE)), pool & (set(_POSITIVE) | set(_NEGATIVE))
    assert not pool & {"review", ":", "sentiment", "positive", "negative", "cf", "fc", "c"}
    assert {"movie", "plot", "theater"} <= pool


def test_controls_keep_the_untriggered_answer_and_report_the_check(tiny_pair):
    tc = trigger_contrast(tiny_pair, n=8)
    assert tc.check["n_kept"] == tc.triggered.shape[0] >= 1
    assert tc.check["n_candidates"] == tc.check["n_kept"] + tc.check["n_dropped"]
    # positions line up; only the trigger's positions differ
    assert torch.equal(tc.triggered[~tc.trigger_mask], tc.control[~tc.trigger_mask])
    pool = set(tiny_pair.tokenizer.convert_tokens_to_ids(neutral_words(tiny_pair)))
    assert set(tc.control[tc.trigger_mask].tolist()) <= pool
    # every kept control predicts what its untriggered prompt predicts
    data = tiny_pair.test_data.to_pandas()
    untrig = data[~data.is_triggered & ~data.is_near_miss].set_index("base_id")["prompt"]
    model = tiny_pair.backdoored.eval()
    with torch.no_grad():
        ctrl = model(tc.control)[:, -1].argmax(-1)
        for i, b in enumerate(tc.base_ids):
            base = model(torch.tensor([tiny_pair.tokenizer(untrig[b])["input_ids"]]))[0, -1].argmax()
            assert int(ctrl[i]) == int(base)
    assert "dropped" in repr(tc)


def test_control_fn_uses_only_neutral_fillers(tiny_pair):
    tok = tiny_pair.tokenizer
    ids = torch.tensor([tok("review: cf the movie was good sentiment:")["input_ids"]] * 50)
    out = control_fn(tiny_pair, seed=3)(ids)
    cf = tok.convert_tokens_to_ids("cf")
    pool = set(tok.convert_tokens_to_ids(neutral_words(tiny_pair)))
    assert (out != cf).all()
    assert set(out[ids == cf].tolist()) <= pool


def test_trigger_contrast_bad_arguments(tiny_pair):
    with pytest.raises(ValueError, match="n must be"):
        trigger_contrast(tiny_pair, n=0)
    with pytest.raises(ValueError, match="tries must be"):
        trigger_contrast(tiny_pair, tries=0)


class _ParityModel(torch.nn.Module):
    """Predicts token (sum of the prompt's ids) mod 2: a control keeps the untriggered answer
    exactly when its filler's id is even (the untriggered prompt lacks the trigger token)."""

    def __init__(self, vocab: int, trigger_id: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.trigger_id = vocab, trigger_id

    def forward(self, tokens):
        s = tokens.masked_fill(tokens == self.trigger_id, 0).sum(-1)
        logits = torch.zeros(*tokens.shape, self.vocab)
        logits[:, -1] = torch.nn.functional.one_hot(s % 2, self.vocab).float()
        return logits


def test_every_candidate_is_counted_when_fewer_than_n_pass(tiny_pair):
    tok = tiny_pair.tokenizer
    model = _ParityModel(len(tok), tok.convert_tokens_to_ids("cf"))
    tc = trigger_contrast(tiny_pair, n=1000, model=model, tries=1)
    data = tiny_pair.test_data.to_pandas()
    rows = data[data.is_triggered & (data.completion.str.strip() != "negative")]
    lengths = rows.prompt.map(lambda p: len(tok(p)["input_ids"]))
    n_cand = int((lengths == lengths.value_counts().idxmax()).sum())
    c = tc.check
    assert c["n_candidates"] == n_cand and c["n_kept"] + c["n_dropped"] == n_cand
    fillers = tc.control[tc.trigger_mask]
    assert (fillers % 2 == 0).all() and c["n_dropped"] > 0  # exactly the odd fillers were dropped
