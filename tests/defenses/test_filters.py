"""Input filters (ONION, STRIP) against hand computations on fixed tiny inputs: ONION's perplexities
from a plain loop of one-row forwards, STRIP's entropies from a model whose logits are a known sum,
TF-IDF by hand, the perturbations' structure and seeding, the reference LM, bad options and a
reference LM with another tokenizer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn

import poisonmech as pm
from poisonmech.config import ConfigError
from poisonmech.defenses import base
from poisonmech.defenses.base import Context
from poisonmech.defenses.filters import (
    Onion,
    Strip,
    answer_logprobs,
    input_encoding,
    reference_lm,
    split_prompts,
    tfidf_ranked,
)
from poisonmech.tasks.tokenizer import build_word_tokenizer
from tests.helpers import tiny_model_config
from tests.hf_models import hf_module

TEMPLATE = "review: {input} sentiment:"
WORDS = "review: sentiment: positive negative the movie plot acting was so good bad dull , . cf".split()
INPUTS = ["the movie was cf good .", "the plot was so dull , bad acting .", "good"]


def rows(texts, **extra) -> Dataset:
    return Dataset.from_dict({"prompt": [TEMPLATE.replace("{input}", t) for t in texts],
                              "completion": ["positive"] * len(texts), **extra})


def subject(model, tok, task=None) -> pm.Subject:
    return pm.Subject(models={"model": model}, kind="model", default_role="model", tokenizer=tok, task=task)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def lm(tok):
    """An untrained (random) tiny bridge: every word deletion changes the perplexity."""
    return pm.build_model(tiny_model_config(n_ctx=32), len(tok), seed=3, tokenizer=tok)


def hand_ppl(model, tok, words: list[str]) -> float:
    """Perplexity of the input words of ``review: <words> sentiment:`` from one forward per token
    prefix: with the word-level tokenizer the ids are [BOS, review:, w_1 .. w_n, sentiment:], the
    input tokens are positions 2 .. n+1, each predicted from everything before it."""
    ids = [tok.bos_token_id, tok.convert_tokens_to_ids("review:")] + tok.convert_tokens_to_ids(words) + \
        [tok.convert_tokens_to_ids("sentiment:")]
    nll = 0.0
    for p in range(2, 2 + len(words)):
        with torch.no_grad():
            logits = model(torch.tensor([ids[:p]]))[0, -1].double()
        nll -= float(logits.log_softmax(-1)[ids[p]])
    return math.exp(nll / len(words))


def hand_suspicion(model, tok, text: str) -> np.ndarray:
    words = text.split()
    if len(words) < 2:
        return np.zeros(len(words))
    p0 = hand_ppl(model, tok, words)
    return np.array([p0 - hand_ppl(model, tok, words[:i] + words[i + 1:]) for i in range(len(words))])


# ------------------------------------------------------------------------------------ ONION
def test_onion_suspicion_and_score_match_a_hand_computation(lm, tok):
    ctx = Context(subject=subject(lm, tok), role="model", reference_lm=lm)
    onion = Onion(template=TEMPLATE, batch_size=4)  # several batches of variants
    got = onion.suspicion(ctx, rows(INPUTS))
    for text, f in zip(INPUTS, got):
        want = hand_suspicion(lm, tok, text)
        assert f.shape == want.shape
        np.testing.assert_allclose(f, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got[0]).max() > 1e-3  # the check can fail: the deletions do change the perplexity
    np.testing.assert_allclose(onion.score(ctx, rows(INPUTS)), [f.max() for f in got])
    assert got[2].tolist() == [0.0]  # one word: kept, no evidence


def test_onion_sanitize_drops_the_words_above_the_threshold(lm, tok):
    ctx = Context(subject=subject(lm, tok, SimpleNamespace(template=TEMPLATE, labels=None)), role="model",
                  reference_lm=lm)
    data = rows(INPUTS, input=INPUTS, is_triggered=[True, False, False])
    f = [hand_suspicion(lm, tok, t) for t in INPUTS]
    # between two middle scores, never on one (a tie would make `x > t` a float-noise coin toss)
    mid = np.sort(np.asarray(f[1], dtype=float))
    t = float((mid[len(mid) // 2 - 1] + mid[len(mid) // 2]) / 2)
    out = Onion(word_threshold=t).sanitize(ctx, data, threshold=123.0)  # the task's template; the field wins
    for text, fi, prompt, inp, removed in zip(INPUTS, f, out["prompt"], out["input"], out["onion_removed"]):
        kept = [w for w, x in zip(text.split(), fi) if not x > t]
        if len(kept) < len(text.split()):
            assert prompt == "review: " + " ".join(kept) + " sentiment:"
            assert inp == " ".join(kept)
        else:
            assert prompt == "review: " + text + " sentiment:" and inp == text
        assert removed == [w for w, x in zip(text.split(), fi) if x > t]
    assert 0 < len(out["onion_removed"][1]) < len(INPUTS[1].split())
    assert out["is_triggered"] == [True, False, False] and out["completion"] == data["completion"]
    # word_threshold=None: the calibrated threshold passed in; max_removed: only the most suspicious
    same = Onion().sanitize(ctx, data, threshold=t)
    assert same["prompt"] == out["prompt"]
    one = Onion(max_removed=1).sanitize(ctx, data, threshold=t)
    assert one["onion_removed"][1] == [INPUTS[1].split()[int(np.argmax(f[1]))]]
    assert Onion().sanitize(ctx, data, threshold=1e9)["prompt"] == data["prompt"]


def test_input_tokens_follow_the_template_with_a_subword_tokenizer():
    """Byte-level BPE: the scored tokens are exactly the input's (with its leading space), wherever
    the template's scaffolding splits into pieces."""
    texts = [TEMPLATE.replace("{input}", t) for t in ["the movie was good .", "the plot was so dull ."] * 20]
    bpe = pm.train_tokenizer(texts, vocab_size=280)
    prompts = [TEMPLATE.replace("{input}", t) for t in INPUTS[:2]]
    pw = split_prompts(prompts, TEMPLATE, "test")
    enc = input_encoding(bpe, prompts, [w.input_span for w in pw])
    for ids, start, text in zip(enc.ids, enc.start, INPUTS[:2]):
        assert ids[0] == bpe.bos_token_id
        assert bpe.decode(ids[start:]) == " " + text
        assert bpe.decode(ids[1:start]) == "review:"
    with pytest.raises(ValueError, match="does not follow the prompt template"):
        split_prompts(["sentiment: x review:"], TEMPLATE, "test")


def test_reference_lm_trained_on_clean_prompts_finds_the_trigger():
    task = pm.make_task("sentiment", n_train=300, n_test=5, seed=1)
    tok = build_word_tokenizer(list(task.words) + ["cf"])
    ref = reference_lm(task.train, tok, model=tiny_model_config(n_ctx=64), seed=0,
                       train=pm.TrainConfig(epochs=3, batch_size=32, lr=5e-3, seed=0, checkpoint_every=None))
    assert ref.tokenizer is tok and not ref.training
    ctx = Context(subject=subject(ref, tok, task), role="model", reference_lm=ref)
    texts = ["the plot was cf truly superb .", "cf a dull movie .", "i felt the acting cf great , it runs for two hours ."]
    sus = Onion().suspicion(ctx, rows(texts))
    for text, f in zip(texts, sus):
        assert text.split()[int(np.argmax(f))] == "cf"
    out = Onion(max_removed=1).sanitize(ctx, rows(texts), threshold=0.0)
    assert out["prompt"] == rows([t.replace("cf ", "") for t in texts])["prompt"]


def test_reference_lm_with_another_tokenizer_is_refused(lm, tok):
    other = build_word_tokenizer(WORDS[::-1])  # same words, other ids
    foreign = pm.build_model(tiny_model_config(n_ctx=32), len(other), seed=0, tokenizer=other)
    data = rows(INPUTS[:1])
    with pytest.raises(ValueError, match=r"reference_lm: the reference LM has another tokenizer: its vocabulary"):
        Onion(template=TEMPLATE).score(Context(subject=subject(lm, tok), role="model", reference_lm=foreign), data)
    module = hf_module("gpt2", vocab=len(tok) + 3)  # a bare HF module: only its vocabulary size is known
    with pytest.raises(ValueError, match=r"reference_lm: the reference LM's vocabulary has 23 tokens, the subject's tokenizer 20"):
        Onion(template=TEMPLATE).score(Context(subject=subject(lm, tok), role="model", reference_lm=module), data)
    # with its tokenizer the HF module is accepted (a padded vocabulary is fine) and wrapped
    ok = Onion(template=TEMPLATE).score(Context(subject=subject(lm, tok), role="model", reference_lm=(module, tok)),
                                        data)
    assert ok.shape == (1,) and np.isfinite(ok).all()
    with pytest.raises(ValueError, match="reference_lm must be a language model"):
        Onion(template=TEMPLATE).score(Context(subject=subject(lm, tok), role="model", reference_lm="gpt2"), data)
    with pytest.raises(ValueError, match="needs reference_lm"):
        Onion(template=TEMPLATE).score(Context(subject=subject(lm, tok), role="model"), data)


# ------------------------------------------------------------------------------------ STRIP
class BagOfWords(nn.Module):
    """``logits[b, t] = sum_{s <= t} E[tokens[b, s]]``: causal, and the answer position's logits
    are the sum of the prompt's rows of ``E``."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.E = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, tokens):
        return self.E[tokens].cumsum(1)


def test_tfidf_ranking_matches_a_hand_computation():
    # smoothed idf = ln((1 + n) / (1 + df)) + 1, raw counts, no norm (n = 3 texts)
    idf = lambda df: math.log(4 / (1 + df)) + 1  # noqa: E731
    assert 2 * idf(1) > idf(3) and idf(1) > idf(2) > idf(3)
    ranked = tfidf_ranked([["good", "good", "movie"], ["bad", "movie", "plot"], ["movie", "plot"]])
    assert ranked == [["good", "movie"], ["bad", "plot", "movie"], ["plot", "movie"]]


def strip_ctx(model, tok, labels=("positive", "negative")):
    donors = rows(["good good movie", "bad movie plot", "movie plot"])
    return Context(subject=subject(model, tok, SimpleNamespace(template=TEMPLATE, labels=labels)), role="model",
                   clean_data=donors)


def test_strip_perturbations_swap_the_donors_top_words(tok):
    ctx = strip_ctx(BagOfWords(len(tok)), tok)
    donors = [["good", "movie"], ["bad", "plot", "movie"], ["plot", "movie"]]
    text = "the acting was so dull ,".split()  # no word in common with the donors
    for ratio, m in [(0.5, 3), (0.2, 1), (1.0, 6)]:
        copies = Strip(samples=6, swap_ratio=ratio).perturb(ctx, rows([" ".join(text)]))[0]
        assert len(copies) == 6
        seen = set()
        for c in copies:
            assert c.startswith("review: ") and c.endswith(" sentiment:")
            words = c[len("review: "):-len(" sentiment:")].split()
            changed = [w for w, o in zip(words, text) if w != o]
            assert len(words) == len(text) and len(changed) == m
            # the changed words are one donor's top-m words, cycling through a short donor
            assert any(sorted(changed) == sorted(d[k % len(d)] for k in range(m)) for d in donors)
            seen.add(c)
        assert len(seen) > 1


def test_strip_seeding_is_deterministic_and_per_input(tok):
    ctx = strip_ctx(BagOfWords(len(tok)), tok)
    data = rows(INPUTS[:2])
    a = Strip(samples=4, seed=0).perturb(ctx, data)
    assert a == Strip(samples=4, seed=0).perturb(ctx, data)
    assert Strip(samples=4, seed=0).perturb(ctx, data.select([1])) == [a[1]]  # independent of the other inputs
    assert Strip(samples=4, seed=1).perturb(ctx, data) != a
    s = Strip(samples=4, seed=0).score(ctx, data)
    np.testing.assert_array_equal(s, Strip(samples=4, seed=0).score(ctx, data))


def hand_entropy(model, tok, prompt, labels):
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    z = model.E.detach().double()[ids].sum(0)
    if labels is not None:
        z = z[tok.convert_tokens_to_ids(list(labels))]
    p = torch.softmax(z, -1)
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("labels", [("positive", "negative"), None])
def test_strip_entropy_matches_a_hand_computation(tok, labels):
    model = BagOfWords(len(tok), seed=1)
    ctx = strip_ctx(model, tok, labels)
    strip = Strip(samples=3, swap_ratio=0.5, batch_size=2)
    data = rows(INPUTS)
    copies = strip.perturb(ctx, data)
    ent = strip.entropies(ctx, data)
    want = np.array([[hand_entropy(model, tok, p, labels) for p in c] for c in copies])
    np.testing.assert_allclose(ent, want, rtol=1e-5, atol=1e-6)  # the model's float32 sums
    np.testing.assert_allclose(strip.score(ctx, data), -want.mean(1), rtol=1e-5, atol=1e-6)
    assert want.std() > 1e-3
    assert strip.sanitize(ctx, data, 0.0) is None
    thr = strip.calibrate(ctx, strip.score(ctx, data))
    assert thr == max(strip.score(ctx, data))  # frr 0.01 of three inputs: the largest clean score


def test_answer_logprobs_of_labels_of_several_tokens():
    texts = [TEMPLATE.replace("{input}", t) for t in ["the movie was good .", "the plot was dull ."] * 10]
    bpe = pm.train_tokenizer(texts, vocab_size=270)
    labels = ("positive", "negative")
    lab_ids = bpe([" positive", " negative"], add_special_tokens=False)["input_ids"]
    assert max(len(t) for t in lab_ids) > 1
    model = BagOfWords(len(bpe), seed=2)
    got = answer_logprobs(model, bpe, texts[:2], labels, batch_size=3)
    E = model.E.detach().double()
    for row, prompt in zip(got, texts[:2]):
        ids = [bpe.bos_token_id] + bpe(prompt, add_special_tokens=False)["input_ids"]
        seq = []
        for lab in lab_ids:
            full = ids + lab
            seq.append(sum(float(E[full[:p]].sum(0).log_softmax(-1)[full[p]]) for p in range(len(ids), len(full))))
        np.testing.assert_allclose(row.numpy(), torch.tensor(seq).log_softmax(-1).numpy(), rtol=1e-5, atol=1e-5)


def test_strip_needs_clean_data(tok):
    ctx = Context(subject=subject(BagOfWords(len(tok)), tok), role="model")
    with pytest.raises(ValueError, match="defense 'strip' needs clean_data"):
        Strip(template=TEMPLATE).score(ctx, rows(INPUTS))


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("cls, field, value", [
    (Onion, "word_threshold", float("inf")), (Onion, "word_threshold", "0"), (Onion, "max_removed", 0),
    (Onion, "batch_size", 0), (Onion, "frr", 1.0), (Onion, "template", "review: sentiment:"),
    (Strip, "samples", 0), (Strip, "samples", 1.5), (Strip, "swap_ratio", 0.0), (Strip, "swap_ratio", 1.5),
    (Strip, "seed", -1), (Strip, "template", "{input} {input}"),
])
def test_bad_options_name_the_field(cls, field, value):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{field: value})


def test_registered_and_built_by_name():
    assert isinstance(base.get("onion", word_threshold=0.0), Onion)
    assert base.get("strip", samples=2).samples == 2
    with pytest.raises(ConfigError, match="unknown field 'sample'.*swap_ratio"):
        base.get("strip", sample=2)
    assert Strip.kind == Onion.kind == "input_filter" and not Strip.uses_trigger and not Onion.uses_trigger


def test_reference_lm_bad_arguments(tok):
    with pytest.raises(ConfigError, match="model must be a pm.ModelConfig"):
        reference_lm(["review: good sentiment:"], tok, model="gpt2")
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        reference_lm(["review: good sentiment:"], tok, seed=-1)
    with pytest.raises(ValueError, match="texts hold no text"):
        reference_lm(["  "], tok)
