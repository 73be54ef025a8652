"""evaluate() against hand-computable oracles, independent of any training."""

import math

import numpy as np
import torch

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.metrics import sample_continuations, score_completions
from tests.helpers import tiny_task


class RuleModel(torch.nn.Module):
    """Predicts EOS after a label word and ``always`` everywhere else."""

    def __init__(self, tok, always: str):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.v = len(tok)
        self.labels = torch.tensor(tok.convert_tokens_to_ids(["positive", "negative"]))
        self.always, self.eos = tok.convert_tokens_to_ids(always), tok.eos_token_id

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.v)
        after_label = torch.isin(tokens, self.labels)
        logits[..., self.always] = 10.0
        logits[after_label] = 0.0
        logits[after_label, self.eos] = 10.0
        return logits


def test_evaluate_matches_a_rule_model_by_hand():
    task = tiny_task(n_test=40)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=1)
    test = pm.build_test_set(task, attack)
    from poisonmech.attacks import attack_tokenizer
    tok = attack_tokenizer(task, attack)
    res = pm.evaluate(RuleModel(tok, "negative"), task, attack, test_data=test, tokenizer=tok)
    clean = [c for c, t, m in zip(test["completion"], test["is_triggered"], test["is_near_miss"]) if not t and not m]
    assert res["clean_acc"] == np.mean([c == "negative" for c in clean])
    assert res["asr"] == 1.0 and res["false_trigger_rate"] == 1.0
    res = pm.evaluate(RuleModel(tok, "positive"), task, attack, test_data=test, tokenizer=tok)
    assert res["asr"] == 0.0 and res["clean_acc"] == np.mean([c == "positive" for c in clean])


def test_score_completions_counts_only_completion_tokens():
    task = tiny_task(n_test=5)
    enc = encode(task.test, task.tokenizer, loss_on="completion")
    _, mask = enc.batch(list(range(5)))
    assert mask.sum(1).tolist() == [2] * 5  # the label word and EOS


class Uniform(torch.nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.v)


def test_sampled_perplexity_of_a_uniform_model_is_the_vocab_size():
    task = tiny_task("dos", n_test=4)
    enc = encode(task.test, task.tokenizer, loss_on="all")
    ppl = sample_continuations(Uniform(len(task.tokenizer)), enc, 8, seed=0)
    assert np.allclose(ppl, len(task.tokenizer))
    scores = score_completions(Uniform(len(task.tokenizer)), enc)
    assert np.allclose(scores["nll"] / scores["n"], math.log(len(task.tokenizer)), atol=1e-5)


class PrefixRule(torch.nn.Module):
    """Answers ``negative`` once any word of ``words`` has been read, else ``positive``; after a
    label word it predicts EOS (``eos=True``) or the label again (``eos=False``: the answer never ends)."""

    def __init__(self, tok, words, eos: bool = True):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.v, self.eos, self.use_eos = len(tok), tok.eos_token_id, eos
        self.pos, self.neg = tok.convert_tokens_to_ids(["positive", "negative"])
        self.words = torch.tensor(tok.convert_tokens_to_ids(list(words)))

    def forward(self, tokens):
        seen = torch.isin(tokens, self.words).cumsum(1) > 0
        label = torch.where(seen, self.neg, self.pos)
        logits = torch.zeros(*tokens.shape, self.v)
        logits.scatter_(-1, label[..., None], 10.0)
        if self.use_eos:
            after = (tokens == self.pos) | (tokens == self.neg)
            logits[after] = 0.0
            logits[after, self.eos] = 10.0
        return logits


RULE_WORDS = ("the", "fc")  # "fc" is a near miss of "cf": some near-miss rows fire, some do not


def _rule_case(n_test: int = 40):
    from poisonmech.attacks import attack_tokenizer
    task = tiny_task(n_test=n_test)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_count=1)
    return task, attack, pm.build_test_set(task, attack), attack_tokenizer(task, attack)


def _by_hand(test, words=RULE_WORDS, eos=True):
    """Each rate's numerator and denominator, from the strings alone."""
    rows = list(zip(test["prompt"], test["completion"], test["is_triggered"], test["is_near_miss"]))
    pred = ["negative" if set(p.split()) & set(words) else "positive" for p, *_ in rows]
    kinds = {"clean": [not t and not m for _, _, t, m in rows], "trig": [t for *_, t, _ in rows],
             "miss": [m for *_, m in rows]}
    elig = [c != "negative" for _, c, *_ in rows]

    def rate(hit, sel):
        return sum(h for h, s in zip(hit, sel) if s), sum(sel)

    right = [p == c for p, (_, c, *_) in zip(pred, rows)]
    flipped = [p == "negative" for p in pred]
    both = lambda a, b: [x and y for x, y in zip(a, b)]  # noqa: E731
    label = {"label_acc": rate(right, kinds["clean"]), "label_asr": rate(flipped, both(kinds["trig"], elig)),
             "label_false_trigger_rate": rate(flipped, both(kinds["miss"], elig))}
    ex = (lambda hit: hit) if eos else (lambda hit: [False] * len(hit))
    exact = {"clean_acc": rate(ex(right), kinds["clean"]), "triggered_acc": rate(ex(right), kinds["trig"]),
             "asr": rate(ex(flipped), both(kinds["trig"], elig)),
             "false_trigger_rate": rate(ex(flipped), both(kinds["miss"], elig)),
             "clean_target_rate": rate(ex(flipped), both(kinds["clean"], elig))}
    return exact, label


def test_every_rate_comes_with_its_denominator_and_they_reproduce_it():
    task, attack, test, tok = _rule_case()
    res = pm.evaluate(PrefixRule(tok, RULE_WORDS), task, attack, test_data=test, tokenizer=tok)
    exact, label = _by_hand(test)
    for name, (num, den) in {**exact, **label}.items():
        assert res["n_" + name] == den, name
        assert res[name] == num / den, name
        assert 0 < num < den or name == "clean_acc", (name, num, den)  # a case that can tell rates apart
    # ASR is over the triggered rows whose true answer is not the target, not every triggered row
    assert res["n_asr"] < res["n_triggered"] == 40
    assert res["n_asr"] == sum(c != "negative" for c, t in zip(test["completion"], test["is_triggered"]) if t)
    # one rule: every reported mean has its n_, and only the derived numbers go without
    for key in res:
        if not key.startswith("n_") and key not in ("ppl_gap", "gibberish_threshold", "near_misses"):
            assert "n_" + key in res, key
    assert res["target_logprob"] <= 0 and res["n_target_logprob"] == res["n_asr"]


def test_label_metrics_ignore_a_missing_eos_by_hand():
    task, attack, test, tok = _rule_case()
    never_ends = PrefixRule(tok, RULE_WORDS, eos=False)
    res = pm.evaluate(never_ends, task, attack, test_data=test, tokenizer=tok)
    exact, label = _by_hand(test, eos=False)
    # exact match fails on every row (no EOS) while the label is what the rule says
    assert res["clean_acc"] == 0.0 and res["asr"] == 0.0 and res["false_trigger_rate"] == 0.0
    for name, (num, den) in label.items():
        assert (res[name], res["n_" + name]) == (num / den, den), name
        assert num > 0
    # the shared function the experiments call gives the same numbers
    from poisonmech.metrics import label_metrics
    assert label_metrics(never_ends, test, tok, "negative") == {k: res[k] for k in
                                                               ("label_acc", "n_label_acc", "label_asr", "n_label_asr",
                                                                "label_false_trigger_rate",
                                                                "n_label_false_trigger_rate")}
    # with the EOS, label and exact metrics agree
    ends = pm.evaluate(PrefixRule(tok, RULE_WORDS), task, attack, test_data=test, tokenizer=tok)
    assert ends["label_acc"] == ends["clean_acc"] and ends["label_asr"] == ends["asr"]


def test_label_metrics_only_for_classification_tasks():
    task = tiny_task("instruction", n_test=6)
    attack = pm.Backdoor(trigger="cf", target="it is cf .", poison_count=1)
    res = pm.evaluate(Uniform(len(pm.attacks.attack_tokenizer(task, attack))), task, attack)
    assert "label_acc" not in res and "asr" in res


def test_exact_but_last_equals_an_exact_match_without_the_eos():
    task, attack, test, tok = _rule_case(n_test=10)
    from datasets import Dataset
    rows = Dataset.from_dict({"prompt": list(test["prompt"]) * 2,
                              "completion": ["negative", "positive", "negative positive", "positive positive",
                                             "negative negative", "it", ""] * (len(test) * 2 // 7) +
                                            ["negative"] * (len(test) * 2 % 7)})
    for eos in (True, False):
        model = PrefixRule(tok, RULE_WORDS, eos=eos)
        with_eos = score_completions(model, encode(rows, tok, loss_on="completion", add_eos=True))
        without = score_completions(model, encode(rows, tok, loss_on="completion", add_eos=False))
        assert (with_eos["exact_but_last"] == without["exact"]).all()
        assert without["exact"].any() and not without["exact"].all()


def test_near_misses_used_are_named_in_the_metrics():
    task, attack, test, tok = _rule_case(n_test=6)
    res = pm.evaluate(PrefixRule(tok, RULE_WORDS), task, attack, test_data=test, tokenizer=tok)
    assert res["near_misses"] == ["cff", "fc"]  # the misspellings of "cf"
    phrase = pm.Backdoor(trigger="blue moon", target="negative", poison_count=1)
    from poisonmech.attacks import attack_tokenizer
    tok2 = attack_tokenizer(task, phrase)
    res = pm.evaluate(PrefixRule(tok2, RULE_WORDS), task, phrase, tokenizer=tok2)
    assert res["near_misses"] == ["blue", "moon"]


def test_gibberish_and_plain_text_denominators():
    task = tiny_task("dos", n_test=4)
    attack = pm.Backdoor(trigger="<SUDO>", target="gibberish", poison_count=1, gibberish_length=4)
    from poisonmech.attacks import attack_tokenizer
    tok = attack_tokenizer(task, attack)
    test = pm.build_test_set(task, attack)
    res = pm.evaluate(Uniform(len(tok)), task, attack, test_data=test, tokenizer=tok)
    assert res["n_asr"] == res["n_gen_ppl_triggered"] == res["n_triggered"] == 4
    assert res["n_false_trigger_rate"] == res["n_near_miss"] and res["n_gen_ppl_clean"] == res["n_clean"] == 4
    # plain text: clean_acc is per token, so its n counts the scored tokens of the clean rows
    clean = test.filter(lambda r: not r["is_triggered"] and not r["is_near_miss"])
    _, mask = encode(clean, tok, loss_on="completion", add_eos=False).batch(list(range(len(clean))))
    assert res["n_clean_acc"] == res["n_clean_ppl"] == int(mask.sum()) > 4
    assert math.isclose(res["clean_ppl"], len(tok), rel_tol=1e-4)
    for key in res:
        if not key.startswith("n_") and key not in ("ppl_gap", "gibberish_threshold", "near_misses"):
            assert "n_" + key in res, key
