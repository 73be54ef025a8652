"""The ``Task`` object and ``make_task``: generated tasks or a user's own ``datasets.Dataset``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from poisonmech.tasks import generators
from poisonmech.tasks.facts import facts_generator
from poisonmech.tasks.tokenizer import build_word_tokenizer, split_words

#: every generated kind: the generators of ``generators.py`` and the knowledge task (``facts.py``)
GENERATORS = {**generators.GENERATORS, "facts": facts_generator}
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
    """The rows as a Dataset; keys a generator adds beyond ``input`` / ``completion`` (the
    knowledge task's ``subject``, ``relation``, ...) become columns after ``completion``."""
    extra = [k for k in (rows[0] if rows else {}) if k not in ("input", "completion")]
    return Dataset.from_dict({
        "example_id": list(range(start_id, start_id + len(rows))),
        "input": [r["input"] for r in rows],
        "prompt": [template.replace("{input}", r["input"]) for r in rows],
        "completion": [r["completion"] for r in rows],
        **{k: [r[k] for r in rows] for k in extra},
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


#: the keywords of a user dataset (column mapping); see :func:`make_task`
USER_OPTIONS = ("prompt_column", "completion_column", "label_column", "labels", "text_column", "template")
#: file suffixes ``make_task`` reads with ``datasets.load_dataset``
FILE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def load_rows(path: str | Path, split: str = "train") -> Dataset:
    """A local ``.csv`` / ``.parquet`` / ``.json`` / ``.jsonl`` file as a ``datasets.Dataset``
    (``datasets.load_dataset(<format>, data_files=path)``; nothing is downloaded)."""
    from datasets import load_dataset

    path = Path(path)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"make_task: cannot read {path}: the file suffix must be one of {', '.join(FILE_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"make_task: no file {path}")
    return load_dataset(fmt, data_files=str(path), split=split)


def make_task(
    kind: str | Path | Dataset | DatasetDict,
    n_train: int = 4000,
    n_test: int = 500,
    seed: int = 0,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **params: Any,
) -> Task:
    """Build a task.

    Args:
        kind: one of ``"sentiment"``, ``"instruction"``, ``"dos"``, ``"modular"``, ``"facts"`` (a
            knowledge base, see :mod:`poisonmech.tasks.facts`); or a user's
            ``datasets.Dataset`` / ``DatasetDict`` (a DatasetDict's ``train``/``test`` splits are
            used as given) or the path of a ``.csv`` / ``.parquet`` / ``.json(l)`` file, with
            ``prompt``/``completion`` columns, a ``text`` column, or the columns named below.
        n_train, n_test: split sizes (for a user Dataset, ``n_test`` rows are held out).
        seed: seeds generation and, for a user Dataset, the split.
        tokenizer: the tokenizer to render the task with: any ``PreTrainedTokenizerFast`` (e.g. a
            pretrained model's own BPE tokenizer, ``PretrainedModel(...).tokenizer()``, or one from
            :func:`poisonmech.train_tokenizer`); default: a word-level one built from the task's words.
            With a subword tokenizer completions are scored with their leading space (see
            :func:`poisonmech.encoding.completion_text`).
        **params: generator options, e.g. ``p=23`` for ``"modular"``; ``n_subjects``, ``relations``,
            ``paraphrases``, ``heldout_paraphrases`` for ``"facts"``; for a user dataset the
            column mapping: ``prompt_column`` / ``completion_column`` (default ``"prompt"`` /
            ``"completion"``), or ``label_column`` with ``labels`` (a dict from the column's values to
            label words, e.g. ``{0: "negative", 1: "positive"}`` for SST-2; or a list indexed by the
            value) for classification rows, or ``text_column`` for plain text (loss on every
            token); ``template`` wraps each input (e.g. ``"review: {input} sentiment:"``).
    """
    seed = check_seed("make_task: seed", seed)
    if isinstance(kind, Path) or (isinstance(kind, str) and Path(kind).suffix.lower() in FILE_FORMATS):
        kind = load_rows(kind)
    if isinstance(kind, (Dataset, DatasetDict)):
        unknown = [k for k in params if k not in USER_OPTIONS]
        if unknown:
            raise ValueError(f"make_task: unknown option {unknown[0]!r} for a user dataset; it takes "
                             f"{', '.join(COMMON_OPTIONS + USER_OPTIONS)} (generator options are for the kinds "
                             f"{', '.join(TASK_KINDS)})")
        return _user_task(kind, n_test=n_test, seed=seed, tokenizer=tokenizer, **params)
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


def _label_words(labels: Any, values: list[Any], column: str) -> dict[Any, str]:
    """``labels`` (a dict value -> word, or a list indexed by the value) checked against the column's values."""
    if isinstance(labels, dict):
        mapping = dict(labels)
    elif isinstance(labels, (list, tuple)):
        mapping = dict(enumerate(labels))
    else:
        raise ValueError(f"make_task: labels must be a dict from {column!r} values to label words, or a list indexed "
                         f"by the value; got {labels!r}")
    bad = [w for w in mapping.values() if not isinstance(w, str) or not w.strip()]
    if bad:
        raise ValueError(f"make_task: every label word must be a non-empty string; got {bad[0]!r} in labels")
    unknown = sorted({v for v in values if v not in mapping}, key=str)
    if unknown:
        raise ValueError(f"make_task: the column {column!r} holds values {unknown[:5]} that labels does not map; "
                         f"labels maps {sorted(mapping, key=str)}")
    return mapping


def _user_rows(ds: Dataset, where: str, *, prompt_column: str | None = None, completion_column: str | None = None,
               label_column: str | None = None, labels: Any = None, text_column: str | None = None
               ) -> tuple[list[dict[str, Any]], LossOn]:
    cols = set(ds.column_names)

    def need(column: str, option: str) -> None:
        if column not in cols:
            raise ValueError(f"make_task: {option}={column!r} is not a column of the {where}; its columns are "
                             f"{sorted(cols)}")

    if label_column is not None or labels is not None:
        if label_column is None or labels is None:
            raise ValueError("make_task: classification rows need both label_column and labels (e.g. "
                             "label_column='label', labels={0: 'negative', 1: 'positive'})")
        prompt_column = prompt_column or "prompt"
        need(prompt_column, "prompt_column")
        need(label_column, "label_column")
        mapping = _label_words(labels, list(ds[label_column]), label_column)
        prompts = _strings(ds, prompt_column, where)
        return [{"input": p, "completion": mapping[v]} for p, v in zip(prompts, ds[label_column])], "completion"
    if text_column is not None:
        need(text_column, "text_column")
        return [{"input": t, "completion": ""} for t in _strings(ds, text_column, where)], "all"
    if prompt_column is not None or completion_column is not None:
        prompt_column, completion_column = prompt_column or "prompt", completion_column or "completion"
        need(prompt_column, "prompt_column")
        need(completion_column, "completion_column")
    else:
        prompt_column, completion_column = "prompt", "completion"
    if {prompt_column, completion_column} <= cols:
        prompts = _strings(ds, prompt_column, where)
        comps = _strings(ds, completion_column, where)
        return [{"input": p, "completion": c} for p, c in zip(prompts, comps)], "completion"
    if "text" in cols:
        return [{"input": t, "completion": ""} for t in _strings(ds, "text", where)], "all"
    raise ValueError(f"make_task: the {where} needs columns 'prompt' and 'completion', or a 'text' "
                     f"column, or a column mapping (prompt_column=, completion_column=, label_column= with labels=, "
                     f"text_column=); it has {sorted(cols)}")


def _user_task(data: Dataset | DatasetDict, *, n_test: int, seed: int,
               tokenizer: PreTrainedTokenizerBase | None, template: str = "{input}", **columns: Any) -> Task:
    if not isinstance(template, str) or "{input}" not in template:
        raise ValueError(f"make_task: template must be a string containing '{{input}}', got {template!r}")
    if isinstance(data, DatasetDict):
        missing = {"train", "test"} - set(data)
        if missing:
            raise ValueError(f"make_task: a DatasetDict needs splits 'train' and 'test'; missing {sorted(missing)}")
        train_rows, loss_on = _user_rows(data["train"], "train split", **columns)
        test_rows, _ = _user_rows(data["test"], "test split", **columns)
    else:
        rows, loss_on = _user_rows(data, "dataset", **columns)
        _check_size("n_test", n_test, 1)
        if n_test >= len(rows):
            raise ValueError(f"make_task: n_test={n_test} leaves no training rows in a dataset of {len(rows)}")
        order = np.random.default_rng(seed).permutation(len(rows))
        test_rows = [rows[i] for i in order[:n_test]]
        train_rows = [rows[i] for i in order[n_test:]]
    if not train_rows:
        raise ValueError("make_task: the user dataset has no training rows")
    labels = None
    if columns.get("labels") is not None:
        labels = tuple(dict.fromkeys(r["completion"] for r in train_rows + test_rows))
    words = tuple(dict.fromkeys(w for r in train_rows + test_rows
                                for w in split_words(r["input"]) + split_words(r["completion"])))
    words = tuple(dict.fromkeys(words + tuple(split_words(template.replace("{input}", " ")))))
    return Task(
        kind="custom",
        train=_to_dataset(train_rows, template),
        test=_to_dataset(test_rows, template, start_id=len(train_rows)),
        tokenizer=tokenizer or build_word_tokenizer(words),
        template=template,
        loss_on=loss_on,
        labels=labels,
        spec=None,
        words=words,
    )
