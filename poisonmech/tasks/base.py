"""The ``Task`` object and ``make_task``: generated tasks or a user's own ``datasets.Dataset``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from poisonmech.tasks.generators import GENERATORS
from poisonmech.tasks.tokenizer import build_word_tokenizer, split_words

TASK_KINDS = tuple(GENERATORS)
LossOn = Literal["completion", "all"]


@dataclass(frozen=True)
class Task:
    """A task: clean train/test splits, a prompt template and a tokenizer.

    Rows have ``example_id``, ``input`` (the free text a trigger goes into), ``prompt``
    (``template`` applied to ``input``) and ``completion`` (the answer; empty for plain text
    tasks, whose loss is on every token: ``loss_on="all"``).
    """

    kind: str
    train: Dataset
    test: Dataset
    tokenizer: PreTrainedTokenizerBase
    template: str = "{input}"
    loss_on: LossOn = "completion"
    labels: tuple[str, ...] | None = None
    #: how to regenerate the task (None for a user dataset: its rows are saved with a run)
    spec: dict[str, Any] | None = None
    words: tuple[str, ...] = field(default=(), repr=False)

    def format_prompt(self, text: str) -> str:
        return self.template.replace("{input}", text)

    def __repr__(self) -> str:
        return (f"Task(kind={self.kind!r}, n_train={len(self.train)}, n_test={len(self.test)}, "
                f"vocab={len(self.tokenizer)}, loss_on={self.loss_on!r})")


def _to_dataset(rows: list[dict[str, Any]], template: str, start_id: int = 0) -> Dataset:
    return Dataset.from_dict({
        "example_id": list(range(start_id, start_id + len(rows))),
        "input": [r["input"] for r in rows],
        "prompt": [template.replace("{input}", r["input"]) for r in rows],
        "completion": [r["completion"] for r in rows],
    })


def _check_size(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"make_task: {name} must be an integer >= {minimum}, got {value!r}")


def make_task(
    kind: str | Dataset | DatasetDict,
    n_train: int = 4000,
    n_test: int = 500,
    seed: int = 0,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **params: Any,
) -> Task:
    """Build a task.

    Args:
        kind: one of ``"sentiment"``, ``"instruction"``, ``"dos"``, ``"modular"``, or a user's
            ``datasets.Dataset`` / ``DatasetDict`` with ``prompt``/``completion`` columns or a
            ``text`` column (a DatasetDict's ``train``/``test`` splits are used as given).
        n_train, n_test: split sizes (for a user Dataset, ``n_test`` rows are held out).
        seed: seeds generation and, for a user Dataset, the split.
        tokenizer: for a user dataset, a tokenizer to use instead of a word-level one built
            from its words.
        **params: generator options, e.g. ``p=23`` for ``"modular"``.
    """
    if isinstance(kind, (Dataset, DatasetDict)):
        return _user_task(kind, n_test=n_test, seed=seed, tokenizer=tokenizer)
    if kind not in GENERATORS:
        raise ValueError(f"make_task: unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)} "
                         "or a datasets.Dataset")
    _check_size("n_train", n_train, 1)
    _check_size("n_test", n_test, 1)
    rng = np.random.default_rng(seed)
    try:
        train_rows, test_rows, meta = GENERATORS[kind](n_train, n_test, rng, **params)
    except TypeError as exc:
        raise ValueError(f"make_task: bad option for kind {kind!r}: {exc}") from exc
    words = tuple(dict.fromkeys(meta["words"] + split_words(meta["template"].replace("{input}", ""))))
    spec = {"kind": kind, "n_train": n_train, "n_test": n_test, "seed": seed, **meta.get("params", params)}
    return Task(
        kind=kind,
        train=_to_dataset(train_rows, meta["template"]),
        test=_to_dataset(test_rows, meta["template"], start_id=n_train),
        tokenizer=tokenizer or build_word_tokenizer(words),
        template=meta["template"],
        loss_on=meta["loss_on"],
        labels=tuple(meta["labels"]) if meta["labels"] else None,
        spec=spec,
        words=words,
    )


def _user_rows(ds: Dataset, where: str) -> tuple[list[dict[str, Any]], LossOn]:
    cols = set(ds.column_names)
    if {"prompt", "completion"} <= cols:
        return [{"input": p, "completion": c} for p, c in zip(ds["prompt"], ds["completion"])], "completion"
    if "text" in cols:
        return [{"input": t, "completion": ""} for t in ds["text"]], "all"
    raise ValueError(f"make_task: the {where} needs columns 'prompt' and 'completion', or a 'text' "
                     f"column; it has {sorted(cols)}")


def _user_task(data: Dataset | DatasetDict, *, n_test: int, seed: int,
               tokenizer: PreTrainedTokenizerBase | None) -> Task:
    if isinstance(data, DatasetDict):
        missing = {"train", "test"} - set(data)
        if missing:
            raise ValueError(f"make_task: a DatasetDict needs splits 'train' and 'test'; missing {sorted(missing)}")
        train_rows, loss_on = _user_rows(data["train"], "train split")
        test_rows, _ = _user_rows(data["test"], "test split")
    else:
        rows, loss_on = _user_rows(data, "dataset")
        _check_size("n_test", n_test, 1)
        if n_test >= len(rows):
            raise ValueError(f"make_task: n_test={n_test} leaves no training rows in a dataset of {len(rows)}")
        order = np.random.default_rng(seed).permutation(len(rows))
        test_rows = [rows[i] for i in order[:n_test]]
        train_rows = [rows[i] for i in order[n_test:]]
    if not train_rows:
        raise ValueError("make_task: the user dataset has no training rows")
    words = tuple(dict.fromkeys(w for r in train_rows + test_rows
                                for w in split_words(r["input"]) + split_words(r["completion"])))
    return Task(
        kind="custom",
        train=_to_dataset(train_rows, "{input}"),
        test=_to_dataset(test_rows, "{input}", start_id=len(train_rows)),
        tokenizer=tokenizer or build_word_tokenizer(words),
        template="{input}",
        loss_on=loss_on,
        labels=None,
        spec=None,
        words=words,
    )
