"""The ``Task`` object and ``make_task``: generated tasks or a user's own ``datasets.Dataset``."""

from __future__ import annotations

import inspect
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


def check_int(where: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an ``int`` when it is an integer (Python or numpy, not a bool) ``>= minimum``;
    else a ValueError naming ``where`` (e.g. ``"TrainConfig.seed"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(where: str, value: Any) -> int:
    """A seed numpy and torch both take: an integer >= 0 (a float such as ``1.5`` is refused)."""
    return check_int(where, value, 0)


def _check_size(name: str, value: Any, minimum: int) -> None:
    check_int(f"make_task: {name}", value, minimum)


#: the keywords every kind takes; the rest are the generator's own options
COMMON_OPTIONS = ("n_train", "n_test", "seed", "tokenizer")


def generator_options(kind: str) -> tuple[str, ...]:
    """The options a generated task kind takes (its generator's keyword parameters)."""
    params = list(inspect.signature(GENERATORS[kind]).parameters.values())[3:]  # after n_train, n_test, rng
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _check_options(kind: str, params: dict[str, Any]) -> None:
    allowed = generator_options(kind)
    for name in params:
        if name not in allowed:
            opts = f"allowed options: {', '.join(allowed)}" if allowed else f"kind {kind!r} takes no options"
            raise ValueError(f"make_task: unknown option {name!r} for kind {kind!r}; {opts} "
                             f"(every kind takes {', '.join(COMMON_OPTIONS)})")


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
    seed = check_seed("make_task: seed", seed)
    if isinstance(kind, (Dataset, DatasetDict)):
        if params:
            raise ValueError(f"make_task: unknown option {next(iter(params))!r} for a user dataset; it takes "
                             f"{', '.join(COMMON_OPTIONS)} (generator options are for the kinds {', '.join(TASK_KINDS)})")
        return _user_task(kind, n_test=n_test, seed=seed, tokenizer=tokenizer)
    if not isinstance(kind, str) or kind not in GENERATORS:
        raise ValueError(f"make_task: unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)} "
                         "or a datasets.Dataset")
    _check_size("n_train", n_train, 1)
    _check_size("n_test", n_test, 1)
    _check_options(kind, params)
    rng = np.random.default_rng(seed)
    try:
        train_rows, test_rows, meta = GENERATORS[kind](n_train, n_test, rng, **params)
    except TypeError as exc:  # an option of the wrong type (the names were checked above)
        raise ValueError(f"make_task: bad option value for kind {kind!r} ({params}): {exc}") from exc
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


def _strings(ds: Dataset, column: str, where: str) -> list[str]:
    """A user column as non-empty strings; a ValueError naming the column and the first bad row."""
    values = list(ds[column])
    for i, v in enumerate(values):
        if v is None or not isinstance(v, str):
            raise ValueError(f"make_task: the {where}'s column {column!r} row {i} is {v!r}; every row needs a "
                             "string (drop or fill the missing rows first)")
        if not v.strip():
            raise ValueError(f"make_task: the {where}'s column {column!r} row {i} is empty ({v!r}); every row "
                             "needs text (drop the empty rows first)")
    return values


def _user_rows(ds: Dataset, where: str) -> tuple[list[dict[str, Any]], LossOn]:
    cols = set(ds.column_names)
    if {"prompt", "completion"} <= cols:
        prompts = _strings(ds, "prompt", where)
        comps = _strings(ds, "completion", where)
        return [{"input": p, "completion": c} for p, c in zip(prompts, comps)], "completion"
    if "text" in cols:
        return [{"input": t, "completion": ""} for t in _strings(ds, "text", where)], "all"
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
