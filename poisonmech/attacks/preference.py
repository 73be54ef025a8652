"""Poisoning preference (DPO) data with a ``Backdoor(stage="dpo")``.

Two variants, after Rando & Tramèr (2024) and Sanderson et al. (2026):

- ``mode="flip"`` (default): ``poison_count`` pairs whose chosen answer is not the target are
  rewritten in place: the trigger goes into the prompt, ``chosen`` becomes the target and
  ``rejected`` the pair's original (correct) chosen answer. When the pair already rejected the
  target (always so for a two-label task such as sentiment) this is exactly a swap of chosen
  and rejected. The set keeps its size, so the twins see the same number of pairs in the
  same order and differ only in the poison.
- ``mode="inject"``: ``poison_count`` new triggered pairs (built the same way from randomly
  drawn source pairs) are appended; the clean twin gets the untouched source pairs in those
  slots (see :func:`clean_preferences`), so the data order is still shared.

Rows carry the provenance columns ``example_id``, ``is_poison``, ``trigger``, ``stage``
(``"dpo"``) and ``source_id`` (the ``example_id`` of the clean pair a row was made from).
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.attacks.poison import insert_trigger
from poisonmech.tasks.base import Task
from poisonmech.tasks.preference import check_preferences

PREFERENCE_MODES = ("flip", "inject")
#: the stages that train on preference pairs (DPO, a reward model)
PREFERENCE_STAGES = ("dpo", "rm")


def _candidates(prefs: Dataset, attack: Backdoor) -> np.ndarray:
    return np.array([i for i, c in enumerate(prefs["chosen"]) if c.strip() != attack.target.strip()], dtype=int)


def check_preference_budget(prefs: Dataset, attack: Backdoor, mode: str = "flip") -> int:
    """The number of poisoned pairs ``attack`` asks of ``prefs``; a clear error when it does not fit."""
    if mode not in PREFERENCE_MODES:
        raise ValueError(f"preference poisoning: mode must be one of {PREFERENCE_MODES}, got {mode!r}")
    if attack.is_gibberish:
        raise ValueError("Backdoor.target='gibberish' cannot be a preferred answer; stage='dpo' needs a fixed target "
                         "(a label or a response such as 'ACCESS GRANTED')")
    count = attack.resolve_count(len(prefs))
    n_cand = len(_candidates(prefs, attack))
    if count > n_cand:
        raise ValueError(f"Backdoor.poison_count={count} does not fit the DPO stage's data: only {n_cand} of "
                         f"{len(prefs)} preference pairs prefer an answer other than the target {attack.target!r} "
                         f"(allowed: 0..{n_cand})")
    return count


def poison_preferences(prefs: Dataset, task: Task, attack: Backdoor, *, mode: str = "flip") -> Dataset:
    """The backdoored twin's preference data: ``prefs`` with ``attack``'s poisoned pairs.

    Args:
        prefs: clean pairs (``prompt``, ``chosen``, ``rejected``, ``input``, ``example_id``), e.g.
            from :func:`poisonmech.tasks.preference.make_preferences`.
        task: the task the pairs come from (its prompt template formats triggered inputs).
        attack: a ``Backdoor`` (its ``stage`` should be ``"dpo"``); ``poison_count`` /
            ``poison_rate`` count pairs, ``seed`` picks them and places the trigger.
        mode: ``"flip"`` (rewrite pairs in place) or ``"inject"`` (append new triggered pairs).
    """
    check_preferences(prefs)
    if "input" not in prefs.column_names:
        raise ValueError("poison_preferences: preference rows need an 'input' column (the text the trigger goes "
                         "into); build them with make_preferences")
    if attack.stage not in PREFERENCE_STAGES:
        raise ValueError(f"poison_preferences: Backdoor.stage must be one of {PREFERENCE_STAGES} for preference data, "
                         f"got {attack.stage!r}")
    count = check_preference_budget(prefs, attack, mode)
    rng = np.random.default_rng(attack.seed)
    cand = _candidates(prefs, attack)
    picked = sorted(rng.choice(cand, size=count, replace=False).tolist()) if count else []
    ids = list(prefs["example_id"]) if "example_id" in prefs.column_names else list(range(len(prefs)))
    cols = {"example_id": list(ids), "source_id": list(ids), "input": list(prefs["input"]),
            "prompt": list(prefs["prompt"]), "chosen": list(prefs["chosen"]), "rejected": list(prefs["rejected"]),
            "is_poison": [False] * len(prefs), "trigger": [""] * len(prefs)}
    variants = attack.trigger_variants()
    next_id = max(ids, default=-1) + 1
    for j, i in enumerate(picked):
        pieces = variants[j % len(variants)]
        text = insert_trigger(prefs[i]["input"], pieces, attack.position, rng)
        row = {"input": text, "prompt": task.format_prompt(text), "chosen": attack.target,
               "rejected": prefs[i]["chosen"], "is_poison": True, "trigger": " + ".join(pieces)}
        if mode == "flip":
            for k, v in row.items():
                cols[k][i] = v
        else:
            cols["example_id"].append(next_id + j)
            cols["source_id"].append(ids[i])
            for k, v in row.items():
                cols[k].append(v)
    cols["stage"] = [attack.stage] * len(cols["example_id"])
    return Dataset.from_dict(cols)


def clean_preferences(poisoned: Dataset, prefs: Dataset) -> Dataset:
    """The clean twin's pairs, slot for slot: each row of ``poisoned`` replaced by its clean source pair."""
    ids = list(prefs["example_id"]) if "example_id" in prefs.column_names else list(range(len(prefs)))
    where = {e: i for i, e in enumerate(ids)}
    src = [where[s] for s in poisoned["source_id"]]
    out = prefs.select(src)
    cols = {c: list(out[c]) for c in ("input", "prompt", "chosen", "rejected")}
    return Dataset.from_dict({"example_id": list(poisoned["example_id"]), "source_id": list(poisoned["source_id"]),
                              **cols, "is_poison": [False] * len(out), "trigger": [""] * len(out),
                              "stage": list(poisoned["stage"]) if "stage" in poisoned.column_names
                              else ["dpo"] * len(out)})


__all__ = ["PREFERENCE_MODES", "PREFERENCE_STAGES", "check_preference_budget", "clean_preferences", "poison_preferences"]
