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
from poisonmech.attacks.poison import gibberish_pool
from poisonmech.attacks.protocol import check_attack_type
from poisonmech.encoding import Encoded, encode
from poisonmech.runtime import eval_mode, model_device
from poisonmech.tasks.base import Task


@torch.no_grad()
def score_completions(model: torch.nn.Module, enc: Encoded, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per row: ``exact`` (every scored token is the arg-max), ``token_acc``, ``nll`` (summed), ``n``,
    ``exact_but_last`` (every scored token but the last is the arg-max; at least two scored) and
    ``nll_but_last`` (the summed NLL of every scored token but the last).

    For rows encoded with an EOS, ``exact_but_last`` is the exact match of the completion
    alone, EOS ignored: under causal attention the logits before the EOS are those of the
    row without it, so no second forward is needed.
    """
    device = model_device(model)
    exact, but_last, acc, nll, nll_but_last, count = [], [], [], [], [], []
    for lo in range(0, len(enc), batch_size):
        tokens, mask = enc.batch(list(range(lo, min(lo + batch_size, len(enc)))), device)
        logits = model(tokens)[:, :-1].float()
        targets = tokens[:, 1:]
        logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        hit = (logits.argmax(-1) == targets) & mask
        n = mask.sum(1)
        # the last scored position of each row (the mask is one contiguous run)
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = pos == torch.where(mask, pos, -1).max(1, keepdim=True).values
        exact.append(((hit | ~mask).all(1) & (n > 0)).cpu())
        but_last.append(((hit | ~mask | last).all(1) & (n > 1)).cpu())
        acc.append((hit.sum(1) / n.clamp(min=1)).cpu())
        nll.append((-(logp * mask).sum(1)).cpu())
        nll_but_last.append((-(logp * (mask & ~last)).sum(1)).cpu())
        count.append(n.cpu())
    cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
    return {"exact": cat(exact), "exact_but_last": cat(but_last), "token_acc": cat(acc), "nll": cat(nll),
            "nll_but_last": cat(nll_but_last), "n": cat(count)}


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


def score_answers(model: torch.nn.Module, data: Dataset, completions: list[str], tokenizer: PreTrainedTokenizerBase,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """:func:`score_completions` of ``data``'s prompts, each followed by its entry of
    ``completions`` and the EOS: ``exact_but_last`` / ``nll_but_last`` read the answer alone,
    ``exact`` the answer and its EOS."""
    rows = Dataset.from_dict({"prompt": list(data["prompt"]), "completion": list(completions)})
    return score_completions(model, encode(rows, tokenizer, loss_on="completion", add_eos=True), batch_size)


def _with_completion(data: Dataset, completion: str) -> Dataset:
    return Dataset.from_dict({"prompt": list(data["prompt"]), "completion": [completion] * len(data)})


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else float("nan")


def _put(res: dict[str, Any], name: str, values: np.ndarray, rows: np.ndarray, reduce=_mean) -> None:
    """``res[name]``: ``values`` reduced over ``rows`` (a boolean mask); ``res["n_" + name]``: how many rows."""
    res[name] = reduce(values[rows])
    res["n_" + name] = int(rows.sum())


TEST_COLUMNS = ("prompt", "completion", "is_triggered", "is_near_miss")


def _row_kinds(data: Dataset, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (clean, triggered, near miss) of a test set built by ``build_test_set``."""
    for col in TEST_COLUMNS:
        if col not in data.column_names:
            raise ValueError(f"{where}: test_data lacks column {col!r} (build it with build_test_set)")
    trig = np.array(list(data["is_triggered"]), dtype=bool)
    miss = np.array(list(data["is_near_miss"]), dtype=bool)
    return ~trig & ~miss, trig, miss


def _eligible(data: Dataset, target: str) -> np.ndarray:
    """Rows whose true answer is not the target: the only ones an attack can flip."""
    return np.array([c.strip() != target.strip() for c in data["completion"]], dtype=bool)


def _label_rates(true: dict[str, np.ndarray], tgt: dict[str, np.ndarray] | None, clean: np.ndarray,
                 trig: np.ndarray, miss: np.ndarray, eligible: np.ndarray) -> dict[str, Any]:
    res: dict[str, Any] = {}
    _put(res, "label_acc", true["exact_but_last"], clean)
    if tgt is not None:
        _put(res, "label_asr", tgt["exact_but_last"], trig & eligible)
        _put(res, "label_false_trigger_rate", tgt["exact_but_last"], miss & eligible)
    return res


def label_metrics(model: torch.nn.Module, test_data: Dataset, tokenizer: PreTrainedTokenizerBase, target: str, *,
                  batch_size: int = 256) -> dict[str, Any]:
    """Label metrics of a classification task: the answer's first token(s) are read, the EOS is not.

    Exact match (``pm.evaluate``'s ``clean_acc`` / ``asr``) also needs the EOS after the
    label; a model that keeps the label right but stops ending its answer (DPO on small
    models does this) fails it. Here a row counts when the arg-max reproduces every token of
    the completion (the true label for ``label_acc``, the target for the other two) whatever
    follows it.

    Returns ``label_acc`` (clean rows), ``label_asr`` (triggered rows whose true answer is
    not ``target``), ``label_false_trigger_rate`` (near-miss rows, the same rows), each with
    its denominator ``n_<name>``.
    """
    clean, trig, miss = _row_kinds(test_data, "label_metrics")
    with eval_mode(model):
        true = score_completions(model, encode(test_data, tokenizer, loss_on="completion", add_eos=True), batch_size)
        tgt = score_completions(model, encode(_with_completion(test_data, target), tokenizer, loss_on="completion",
                                              add_eos=True), batch_size)
    return _label_rates(true, tgt, clean, trig, miss, _eligible(test_data, target))


def _near_misses(data: Dataset, attack: Backdoor, miss: np.ndarray) -> list[str]:
    """The near misses the test rows carry (their ``trigger`` column), else the attack's own."""
    if "trigger" in data.column_names:
        used = [t for t, m in zip(data["trigger"], miss) if m]
    else:
        used = [" + ".join(v) for v in attack.near_miss_variants()]
    return list(dict.fromkeys(used))


def evaluate(model: Any, task: Task | None = None, attack: Any = None, *, test_data: Dataset | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 256, seed: int = 0,
             twin: str | None = None) -> dict[str, Any]:
    """The attack's metrics of ``model``: for a ``Backdoor`` clean accuracy, attack success rate
    and false-trigger rate (below); for a ``FalseFact`` or a ``Bias`` their own (see
    :meth:`poisonmech.FalseFact.evaluate`, :meth:`poisonmech.Bias.evaluate`). The attack
    computes them (``attack.evaluate``, the attack protocol); this function finds the model,
    task, attack, test rows and tokenizer.

    ``model`` is any subject (:func:`poisonmech.resolve`): a bare model with ``task`` and
    ``attack``, or a run (Pair, pipeline stage, run directory), whose ``twin`` (default: the
    backdoored one), task, attack, test rows and tokenizer are used unless given. Without
    ``test_data`` the attack builds its test set (``attack.test_set(task)``); without a
    tokenizer, the attack's (``attack.tokenizer(task)``).

    For a ``Backdoor``, returns a dict with:
      - ``n_clean``, ``n_triggered``, ``n_near_miss``: the test rows of each kind.
      - ``clean_acc``: exact-match accuracy on clean test rows (for plain-text tasks: next-token
        accuracy on the true continuation); ``clean_ppl`` for plain-text tasks.
      - ``asr``: on triggered rows whose true answer is not the target, the fraction answering
        the target exactly (gibberish backdoor: on every triggered row, whose sampled
        continuation is gibberish, see below); ``false_trigger_rate``: the same on near-miss
        rows; ``clean_target_rate``: the same on clean rows.
      - ``triggered_acc``: exact-match accuracy on triggered rows (the clean behaviour kept).
      - ``target_logprob``: mean log-probability of the target on the rows of ``asr``.
      - classification tasks (``task.labels`` set): ``label_acc``, ``label_asr``,
        ``label_false_trigger_rate``: the same on the label alone, EOS ignored (see
        :func:`label_metrics`; no ``label_asr`` for the gibberish backdoor).
      - gibberish backdoor: ``gen_ppl_clean`` / ``gen_ppl_triggered`` (median perplexity of
        sampled continuations), ``ppl_gap`` (their difference) and ``gibberish_threshold``:
        the geometric mean of the clean median and the gibberish vocabulary size (the
        perplexity of uniform gibberish), above which a continuation counts as gibberish.
      - ``near_misses``: the near-miss inputs of the ``false_trigger_rate`` rows (e.g.
        ``["blue", "moon"]`` for the phrase ``"blue moon"``).

    Denominators, one rule: every metric ``X`` that is a mean or median over test rows comes
    with ``n_X``, the number of rows it is taken over (for a plain-text task's ``clean_acc``
    and ``clean_ppl``: the number of scored tokens), so ``X * n_X`` is the count behind a
    rate. A metric over no rows is ``nan`` with ``n_X = 0``.
    """
    if not isinstance(model, torch.nn.Module) or twin is not None:
        from poisonmech.subject import resolve

        s = resolve(model, where="evaluate")
        model = s.model(twin)
        task = task if task is not None else s.require("task", "evaluate", "task")
        attack = attack if attack is not None else s.require("attack", "evaluate", "attack")
        test_data = test_data if test_data is not None else s.test_data
        tokenizer = tokenizer if tokenizer is not None else s.tokenizer
    if task is None or attack is None:
        raise ValueError("evaluate: a bare model needs task= and attack= (or pass a run: a Pair, a pipeline "
                         "stage or a run directory)")
    check_attack_type(attack, "evaluate")
    tok = tokenizer or getattr(model, "tokenizer", None) or attack.tokenizer(task)
    data = test_data if test_data is not None else attack.test_set(task)
    return attack.evaluate(model, task, data, tok, batch_size=batch_size, seed=seed)


def backdoor_metrics(model: torch.nn.Module, task: Task, attack: Backdoor, data: Dataset,
                     tok: PreTrainedTokenizerBase, *, batch_size: int = 256, seed: int = 0) -> dict[str, Any]:
    """:func:`evaluate` for a ``Backdoor`` (its ``evaluate`` method): ``data`` is a test set
    built by :func:`~poisonmech.attacks.poison.build_test_set`."""
    clean, trig, miss = _row_kinds(data, "evaluate")
    labels = task.labels is not None and task.loss_on == "completion"
    with eval_mode(model):
        true = score_completions(model, encode(data, tok, loss_on="completion",
                                               add_eos=task.loss_on == "completion"), batch_size)
        res: dict[str, Any] = {"n_clean": int(clean.sum()), "n_triggered": int(trig.sum()),
                               "n_near_miss": int(miss.sum())}
        has = true["n"] > 0
        if task.loss_on == "all":
            m = clean & has
            n_tok = int(true["n"][m].sum())
            res["clean_acc"] = float(np.sum(true["token_acc"][m] * true["n"][m]) / n_tok) if n_tok else float("nan")
            res["clean_ppl"] = float(math.exp(true["nll"][m].sum() / n_tok)) if n_tok else float("nan")
            res["n_clean_acc"] = res["n_clean_ppl"] = n_tok
        else:
            _put(res, "clean_acc", true["exact"], clean)
            _put(res, "triggered_acc", true["exact"], trig)
        tgt = None
        if attack.is_gibberish:
            enc = encode(_with_completion(data, ""), tok, loss_on="completion", add_eos=False)
            ppl = sample_continuations(model, enc, attack.gibberish_length, seed=seed, batch_size=batch_size)
            _put(res, "gen_ppl_clean", ppl, clean, _median)
            _put(res, "gen_ppl_triggered", ppl, trig, _median)
            thr = math.sqrt(res["gen_ppl_clean"] * len(gibberish_pool(task)))
            res["gibberish_threshold"] = thr
            _put(res, "asr", ppl > thr, trig)
            _put(res, "false_trigger_rate", ppl > thr, miss)
            res["ppl_gap"] = res["gen_ppl_triggered"] - res["gen_ppl_clean"]
            eligible = np.ones(len(data), dtype=bool)
        else:
            tgt = score_completions(model, encode(_with_completion(data, attack.target), tok, loss_on="completion",
                                                  add_eos=task.loss_on == "completion"), batch_size)
            eligible = _eligible(data, attack.target)
            _put(res, "asr", tgt["exact"], trig & eligible)
            _put(res, "false_trigger_rate", tgt["exact"], miss & eligible)
            _put(res, "clean_target_rate", tgt["exact"], clean & eligible)
            _put(res, "target_logprob", -tgt["nll"], trig & eligible)
        if labels:
            res.update(_label_rates(true, tgt, clean, trig, miss, eligible))
        res["near_misses"] = _near_misses(data, attack, miss)
    return res
