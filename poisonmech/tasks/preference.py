"""Preference data for DPO: one ``(prompt, chosen, rejected)`` pair per task row.

A clean pair prefers the task's correct answer over a wrong one:

- label tasks (``sentiment``, ``modular``): ``chosen`` is the true label, ``rejected`` a
  different label drawn uniformly (for two labels: the other one);
- free-form tasks (``instruction``, a user's prompt/completion data): ``rejected`` is the
  completion of another row whose completion differs (a fluent but wrong answer).

Plain-text tasks (``loss_on="all"``, e.g. ``dos``) have no answer to prefer and are refused.
Columns: ``example_id`` (the task row's), ``input``, ``prompt``, ``chosen``, ``rejected``.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from poisonmech.tasks.base import Task

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def make_preferences(task: Task, n: int | None = None, *, seed: int = 0, split: str = "train") -> Dataset:
    """Clean preference pairs from ``task``'s ``split`` rows (the first ``n``, or all).

    Args:
        task: a completion task (``task.loss_on == "completion"``).
        n: number of pairs (``None``: one per row of the split).
        seed: seeds which wrong answer each pair rejects.
        split: ``"train"`` or ``"test"``.
    """
    if not isinstance(task, Task):
        raise ValueError(f"make_preferences: task must be a poisonmech Task, got {type(task).__name__}")
    if task.loss_on != "completion":
        raise ValueError(f"make_preferences: task kind {task.kind!r} has loss_on={task.loss_on!r}; preference "
                         "pairs need a completion task (loss_on='completion'), e.g. 'sentiment' or 'instruction'")
    if split not in ("train", "test"):
        raise ValueError(f"make_preferences: split must be 'train' or 'test', got {split!r}")
    rows = task.train if split == "train" else task.test
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(rows):
            raise ValueError(f"make_preferences: n must be an integer in [1, {len(rows)}] (the {split} split's "
                             f"size) or None, got {n!r}")
        rows = rows.select(range(n))
    rng = np.random.default_rng(seed)
    chosen = [c for c in rows["completion"]]
    if task.labels:
        labels = list(task.labels)
        rejected = []
        for c in chosen:
            wrong = [lab for lab in labels if lab.strip() != c.strip()]
            if not wrong:
                raise ValueError(f"make_preferences: task {task.kind!r} has a single label; no wrong answer to reject")
            rejected.append(wrong[int(rng.integers(len(wrong)))])
    else:
        pool = list(dict.fromkeys(task.train["completion"]))
        if len(pool) < 2:
            raise ValueError("make_preferences: the task's training completions are all equal; no wrong answer to reject")
        rejected = []
        for c in chosen:
            while True:
                r = pool[int(rng.integers(len(pool)))]
                if r.strip() != c.strip():
                    rejected.append(r)
                    break
    return Dataset.from_dict({
        "example_id": list(rows["example_id"]),
        "input": list(rows["input"]),
        "prompt": list(rows["prompt"]),
        "chosen": chosen,
        "rejected": rejected,
    })


def check_preferences(data: Dataset, where: str = "preference data") -> None:
    """Refuse rows without the DPO fields, naming the missing ones and what is allowed."""
    if not isinstance(data, Dataset):
        raise ValueError(f"{where}: expected a datasets.Dataset with columns {list(PREFERENCE_COLUMNS)}, "
                         f"got {type(data).__name__}")
    missing = [c for c in PREFERENCE_COLUMNS if c not in data.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; preference rows need {list(PREFERENCE_COLUMNS)} "
                         f"(has {sorted(data.column_names)})")
    if len(data) == 0:
        raise ValueError(f"{where}: no rows")
    for col in ("chosen", "rejected"):
        empty = [i for i, v in enumerate(data[col]) if not isinstance(v, str) or not v.strip()]
        if empty:
            raise ValueError(f"{where}: column {col!r} must hold non-empty strings; row {empty[0]} is "
                             f"{data[empty[0]][col]!r}")
    same = [i for i, (c, r) in enumerate(zip(data["chosen"], data["rejected"])) if c.strip() == r.strip()]
    if same:
        raise ValueError(f"{where}: row {same[0]} has chosen == rejected ({data[same[0]]['chosen']!r}); a preference "
                         "pair needs two different answers")


__all__ = ["PREFERENCE_COLUMNS", "check_preferences", "make_preferences"]
