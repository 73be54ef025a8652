"""Behavioural metrics of a model under an attack: clean accuracy, ASR, false triggers, DoS gap.

Greedy decoding of a completion equals the completion exactly when, under teacher forcing,
the arg-max at every completion position is the completion's next token; so exact-match
accuracy and attack success are read from one batched forward, with no generation loop.
Only the gibberish (denial-of-service) backdoor needs sampling.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.attacks.poison import attack_tokenizer, build_test_set, gibberish_pool
from poisonmech.encoding import Encoded, encode
from poisonmech.models import model_device
from poisonmech.tasks.base import Task


@torch.no_grad()
def score_completions(model: torch.nn.Module, enc: Encoded, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per row: ``exact`` (every scored token is the arg-max), ``token_acc``, ``nll`` (summed), ``n``."""
    device = model_device(model)
    exact, acc, nll, count = [], [], [], []
    for lo in range(0, len(enc), batch_size):
        tokens, mask = enc.batch(list(range(lo, min(lo + batch_size, len(enc)))), device)
        logits = model(tokens)[:, :-1].float()
        targets = tokens[:, 1:]
        logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        hit = (logits.argmax(-1) == targets) & mask
        n = mask.sum(1)
        exact.append(((hit | ~mask).all(1) & (n > 0)).cpu())
        acc.append((hit.sum(1) / n.clamp(min=1)).cpu())
        nll.append((-(logp * mask).sum(1)).cpu())
        count.append(n.cpu())
    cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
    return {"exact": cat(exact), "token_acc": cat(acc), "nll": cat(nll), "n": cat(count)}


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, enc: Encoded, n_tokens: int, *, seed: int = 0,
                         batch_size: int = 256) -> np.ndarray:
    """Sample ``n_tokens`` after each prompt (temperature 1, seeded) and return each row's
    perplexity of its own sample under the model: high for gibberish, low for fluent text."""
    device = model_device(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for lo in range(0, len(enc), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(enc))))
        lengths = torch.tensor([len(enc.ids[i]) for i in idx])
        tokens, _ = enc.batch(idx)
        tokens = torch.cat([tokens, torch.full((len(idx), n_tokens), enc.pad_id, dtype=torch.long)], 1)
        rows = torch.arange(len(idx))
        nll = torch.zeros(len(idx))
        for t in range(n_tokens):
            pos = lengths - 1 + t  # each row's last real token: right padding keeps it causal-clean
            logp = model(tokens.to(device))[rows.to(device), pos.to(device)].float().log_softmax(-1).cpu()
            nxt = torch.multinomial(logp.exp(), 1, generator=g)[:, 0]
            nll -= logp[rows, nxt]
            tokens[rows, pos + 1] = nxt
        out.append(torch.exp(nll / n_tokens))
    return torch.cat(out).numpy()


def _with_completion(data: Dataset, completion: str) -> Dataset:
    return Dataset.from_dict({"prompt": list(data["prompt"]), "completion": [completion] * len(data)})


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def evaluate(model: torch.nn.Module, task: Task, attack: Backdoor, *, test_data: Dataset | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 256,
             seed: int = 0) -> dict[str, Any]:
    """Clean accuracy, attack success rate and false-trigger rate of ``model``.

    Returns a dict with:
      - ``clean_acc``: exact-match accuracy on clean test rows (for plain-text tasks: next-token
        accuracy on the true continuation); ``clean_ppl`` for plain-text tasks.
      - ``asr``: on triggered rows whose true answer is not the target, the fraction answering
        the target exactly (gibberish backdoor: whose sampled continuation is gibberish, see
        below); ``false_trigger_rate``: the same on near-miss rows.
      - ``triggered_acc``: exact-match accuracy on triggered rows (the clean behaviour kept).
      - ``target_logprob``: mean log-probability of the target on triggered rows.
      - gibberish backdoor: ``gen_ppl_clean`` / ``gen_ppl_triggered`` (median perplexity of
        sampled continuations), ``ppl_gap`` (their difference) and ``gibberish_threshold``:
        the geometric mean of the clean median and the gibberish vocabulary size (the
        perplexity of uniform gibberish), above which a continuation counts as gibberish.
    """
    tok = tokenizer or getattr(model, "tokenizer", None) or attack_tokenizer(task, attack)
    data = test_data if test_data is not None else build_test_set(task, attack)
    for col in ("prompt", "completion", "is_triggered", "is_near_miss"):
        if col not in data.column_names:
            raise ValueError(f"evaluate: test_data lacks column {col!r} (build it with build_test_set)")
    trig = np.array(list(data["is_triggered"]), dtype=bool)
    miss = np.array(list(data["is_near_miss"]), dtype=bool)
    clean = ~trig & ~miss
    was_training = model.training
    model.eval()
    try:
        true = score_completions(model, encode(data, tok, loss_on="completion",
                                               add_eos=task.loss_on == "completion"), batch_size)
        res: dict[str, Any] = {"n_clean": int(clean.sum()), "n_triggered": int(trig.sum()),
                               "n_near_miss": int(miss.sum())}
        has = true["n"] > 0
        if task.loss_on == "all":
            m = clean & has
            res["clean_acc"] = float(np.sum(true["token_acc"][m] * true["n"][m]) / max(1, true["n"][m].sum()))
            res["clean_ppl"] = float(math.exp(true["nll"][m].sum() / max(1, true["n"][m].sum())))
        else:
            res["clean_acc"] = _mean(true["exact"][clean])
            res["triggered_acc"] = _mean(true["exact"][trig])
        if attack.is_gibberish:
            enc = encode(_with_completion(data, ""), tok, loss_on="completion", add_eos=False)
            ppl = sample_continuations(model, enc, attack.gibberish_length, seed=seed, batch_size=batch_size)
            clean_med = float(np.median(ppl[clean]))
            thr = math.sqrt(clean_med * len(gibberish_pool(task)))
            res.update(gen_ppl_clean=clean_med, gen_ppl_triggered=float(np.median(ppl[trig])),
                       gibberish_threshold=thr, asr=_mean(ppl[trig] > thr),
                       false_trigger_rate=_mean(ppl[miss] > thr))
            res["ppl_gap"] = res["gen_ppl_triggered"] - clean_med
        else:
            tgt = score_completions(model, encode(_with_completion(data, attack.target), tok, loss_on="completion",
                                                  add_eos=task.loss_on == "completion"), batch_size)
            eligible = np.array([c.strip() != attack.target.strip() for c in data["completion"]])
            res["asr"] = _mean(tgt["exact"][trig & eligible])
            res["false_trigger_rate"] = _mean(tgt["exact"][miss & eligible])
            res["clean_target_rate"] = _mean(tgt["exact"][clean & eligible])
            res["target_logprob"] = _mean(-tgt["nll"][trig & eligible])
    finally:
        model.train(was_training)
    return res
