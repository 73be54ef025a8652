"""evaluate() against hand-computable oracles, independent of any training."""

import math

import numpy as np
import torch

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.metrics import sample_continuations, score_completions
from tests.conftest import tiny_task


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
