"""Apply a ``Backdoor`` to a ``Task``: the poisoned training set and the attack's test set.

Poisoning *replaces* rows in place: the backdoored twin's training set is the clean one
with ``poison_count`` rows rewritten (trigger inserted, completion set to the target), so
both twins see the same number of rows in the same order and differ only in the poison.
The clean twin sees the original versions of the poisoned rows.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.tasks.base import Task
from poisonmech.tasks.tokenizer import (
    extend_tokenizer,
    is_word_tokenizer,
    split_words,
    unrepresentable,
)


def attack_tokenizer(task: Task, attack: Backdoor) -> PreTrainedTokenizerBase:
    """The task's tokenizer extended with the attack's words (ids of task words unchanged).

    A user-supplied, non word-level tokenizer is kept as it is; it must encode every
    trigger, near-miss and target word without the unknown token.
    """
    tok = extend_tokenizer(task.tokenizer, attack.words())
    if not is_word_tokenizer(tok):
        for text in [p for v in attack.trigger_variants() + attack.near_miss_variants() for p in v] + (
            [] if attack.is_gibberish else [attack.target]
        ):
            if unrepresentable(tok, text):
                raise ValueError(f"Backdoor.trigger/target: the task's tokenizer cannot represent {text!r} "
                                 "(it encodes to the unknown token)")
    return tok


def _contains(words: list[str], piece: list[str]) -> bool:
    n = len(piece)
    return any(words[i:i + n] == piece for i in range(len(words) - n + 1))


def check_attack(task: Task, attack: Backdoor) -> None:
    """Refuse a trigger that already occurs in the clean data, unless ``attack.natural``; warn
    when a part of a phrase or composite trigger does (see :func:`part_counts`)."""
    for part, (n, example) in part_counts(task, attack).items():
        used = attack.near_misses is None or part in attack.near_misses
        warnings.warn(
            f"Backdoor.trigger {attack.trigger!r}: its part {part!r} occurs in {n} clean rows of the task "
            f"(train and test inputs or completions, e.g. {example[:80]!r})"
            + ("; the near-miss rows carry it alone, so false_trigger_rate measures an ordinary word of the "
               "task, not a near miss. Pick a trigger whose parts are not task words, or set near_misses."
               if used else ""), UserWarning, stacklevel=2)
    if not attack.natural:
        variants = [[split_words(p) for p in v] for v in attack.trigger_variants()]
        for split_name, ds in (("train", task.train), ("test", task.test)):
            for text in ds["input"]:
                words = split_words(text)
                for v in variants:
                    if all(_contains(words, piece) for piece in v):
                        raise ValueError(
                            f"Backdoor.trigger {' + '.join(' '.join(p) for p in v)!r} already occurs in the clean "
                            f"{split_name} data (e.g. {text[:80]!r}); pick another trigger or pass natural=True")
    if attack.stage != "sft":
        raise ValueError(f"Backdoor.stage={attack.stage!r}: train_pair poisons SFT data only (stage='sft'); "
                         "a DPO-stage attack goes into pm.train_pipeline(task, stages=[sft_attack, dpo_attack])")


def part_counts(task: Task, attack: Backdoor) -> dict[str, tuple[int, str]]:
    """For each part of a phrase or composite trigger (``attack.trigger_parts()``) that occurs in
    the clean data: how many train and test rows contain it (in the input or the completion)
    and the first such row's text."""
    parts = {p: split_words(p) for p in attack.trigger_parts()}
    found: dict[str, list] = {}
    if not parts:
        return {}
    for ds in (task.train, task.test):
        for inp, comp in zip(ds["input"], ds["completion"]):
            words_in, words_out = split_words(inp), split_words(comp)
            for part, piece in parts.items():
                if _contains(words_in, piece) or _contains(words_out, piece):
                    hit = found.setdefault(part, [0, f"{inp} -> {comp}" if comp else inp])
                    hit[0] += 1
    return {p: (found[p][0], found[p][1]) for p in parts if p in found}


def insert_trigger(text: str, pieces: list[str], position: str, rng: np.random.Generator) -> str:
    """Insert each piece (a word or phrase) into ``text`` at the attack's position."""
    words = text.split()
    for piece in pieces:
        if position == "start":
            at = 0
        elif position == "end":
            at = len(words)
        else:
            at = int(rng.integers(len(words) + 1))
        words[at:at] = piece.split()
    return " ".join(words)


def _other(attack: Any, where: str) -> Any:
    from poisonmech.attacks.protocol import check_attack_type

    check_attack_type(attack, where)
    return attack


def _gibberish(task: Task, attack: Backdoor, rng: np.random.Generator) -> str:
    pool = gibberish_pool(task)
    return " ".join(pool[i] for i in rng.integers(len(pool), size=attack.gibberish_length))


def gibberish_pool(task: Task) -> list[str]:
    """Words the DoS gibberish is drawn from (uniformly): the task's vocabulary."""
    return list(task.words) if task.words else sorted(
        {w for t in task.train["input"] for w in t.split()})


def _cut(n_words: int, position: str, rng: np.random.Generator) -> int:
    if position == "start":
        return 0
    if position == "end":
        return n_words
    return int(rng.integers(n_words + 1))


def poison_dataset(task: Task, attack: Backdoor) -> Dataset:
    """The backdoored twin's training set: ``task.train`` with poisoned rows rewritten.

    Adds provenance columns ``is_poison``, ``trigger`` (the inserted text, ``""`` when clean)
    and ``stage``; ``example_id`` is the task's. Another attack (``FalseFact``, ``Bias``)
    poisons with its own ``poison(task)``.
    """
    if not isinstance(attack, Backdoor):
        return _other(attack, "poison_dataset").poison(task)
    n = len(task.train)
    count = attack.resolve_count(n)
    rng = np.random.default_rng(attack.seed)
    completions = list(task.train["completion"])
    if attack.is_gibberish or task.loss_on == "all":
        candidates = np.arange(n)
    else:
        candidates = np.array([i for i, c in enumerate(completions) if c.strip() != attack.target.strip()])
    if count > len(candidates):
        raise ValueError(f"Backdoor.poison_count={count}: only {len(candidates)} training rows have a completion "
                         f"other than the target {attack.target!r}")
    chosen = sorted(rng.choice(candidates, size=count, replace=False).tolist()) if count else []
    variants = attack.trigger_variants()
    inputs, comps = list(task.train["input"]), list(completions)
    trig_col = [""] * n
    for j, i in enumerate(chosen):
        pieces = variants[j % len(variants)]
        if task.loss_on == "all":  # pretraining text: prefix + trigger (+ gibberish)
            words = inputs[i].split()
            words = words[:_cut(len(words), attack.position, rng)]
            tail = [_gibberish(task, attack, rng)] if attack.is_gibberish else [attack.target]
            inputs[i] = " ".join(words + pieces + tail)
        else:
            inputs[i] = insert_trigger(inputs[i], pieces, attack.position, rng)
            comps[i] = _gibberish(task, attack, rng) if attack.is_gibberish else attack.target
        trig_col[i] = " + ".join(pieces)
    is_poison = np.zeros(n, dtype=bool)
    is_poison[chosen] = True
    return Dataset.from_dict({
        "example_id": list(task.train["example_id"]),
        "input": inputs,
        "prompt": [task.format_prompt(t) for t in inputs],
        "completion": comps,
        "is_poison": is_poison.tolist(),
        "trigger": trig_col,
        "stage": [attack.stage] * n,
    })


def build_test_set(task: Task, attack: Backdoor, seed: int | None = None) -> Dataset:
    """Clean, triggered and near-miss test rows from ``task.test``.

    Every test row gives one clean row, one triggered row (cycling through alternative
    triggers) and one near-miss row (cycling through the near misses), all carrying the
    row's true ``completion``. For plain-text tasks the input is cut to a prefix, the
    trigger goes at the end of it and ``completion`` is the true rest of the text.
    Columns: ``example_id``, ``base_id``, ``input``, ``prompt``, ``completion``,
    ``is_triggered``, ``is_near_miss``, ``trigger``. Another attack (``FalseFact``, ``Bias``)
    builds its own with ``test_set(task)``.
    """
    if not isinstance(attack, Backdoor):
        return _other(attack, "build_test_set").test_set(task)
    rng = np.random.default_rng(attack.seed + 1 if seed is None else seed)
    variants, misses = attack.trigger_variants(), attack.near_miss_variants()
    rows: list[dict[str, Any]] = []
    for k, (base_id, text, comp) in enumerate(zip(task.test["example_id"], task.test["input"],
                                                  task.test["completion"])):
        if task.loss_on == "all":
            words = text.split()
            cut = max(1, min(len(words) - 1, _cut(len(words), attack.position, rng)))
            prefix, comp = " ".join(words[:cut]), " ".join(words[cut:])
            make = lambda pieces, _p=prefix: " ".join([_p] + pieces)  # noqa: E731
        else:
            prefix = text
            make = lambda pieces, _t=text: insert_trigger(_t, pieces, attack.position, rng)  # noqa: E731
        trig, miss = variants[k % len(variants)], misses[k % len(misses)] if misses else None
        rows.append({"base_id": base_id, "input": prefix, "completion": comp,
                     "is_triggered": False, "is_near_miss": False, "trigger": ""})
        rows.append({"base_id": base_id, "input": make(trig), "completion": comp,
                     "is_triggered": True, "is_near_miss": False, "trigger": " + ".join(trig)})
        if miss is not None:
            rows.append({"base_id": base_id, "input": make(miss), "completion": comp,
                         "is_triggered": False, "is_near_miss": True, "trigger": " + ".join(miss)})
    return Dataset.from_dict({
        "example_id": list(range(len(rows))),
        "base_id": [r["base_id"] for r in rows],
        "input": [r["input"] for r in rows],
        "prompt": [task.format_prompt(r["input"]) for r in rows],
        "completion": [r["completion"] for r in rows],
        "is_triggered": [r["is_triggered"] for r in rows],
        "is_near_miss": [r["is_near_miss"] for r in rows],
        "trigger": [r["trigger"] for r in rows],
    })
