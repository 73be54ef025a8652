"""What a probe predicts (labels), how examples are split, and a many-column AUROC.

Labels come from a boolean / 0-1 column of the dataset (``is_triggered``, ``is_near_miss``,
``is_poison``, ...), from an array given directly, or from the model's own behaviour:
``"will_emit_target"`` is True where the model's greedy answer to the prompt is exactly the
attack's target (read from one teacher-forced forward, as in ``pm.evaluate``).

Splits are by *example*: rows sharing a group (by default the ``base_id`` column of a test
set, whose clean, triggered and near-miss versions of one review share it) always land on
the same side, so a probe is never tested on a variant of a review it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Bool, Float
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.attacks.protocol import is_attack
from poisonmech.encoding import encode
from poisonmech.metrics import score_completions
from poisonmech.runtime import eval_mode

#: labels computed from the model rather than read from a column
MODEL_LABELS = ("will_emit_target",)


def binary_columns(dataset: Dataset) -> list[str]:
    """Columns of ``dataset`` a probe can predict: boolean, or integers / floats in {0, 1}."""
    out = []
    for name, feat in dataset.features.items():
        dtype = getattr(feat, "dtype", None)
        if dtype == "bool":
            out.append(name)
        elif dtype is not None and (dtype.startswith("int") or dtype.startswith("float")):
            if set(np.unique(np.asarray(dataset[name])).tolist()) <= {0, 1}:
                out.append(name)
    return out


def _as_bool(values, what: str, allowed: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == bool:
        out = arr
    elif arr.dtype.kind in "iuf" and set(np.unique(arr).tolist()) <= {0, 1}:
        out = arr.astype(bool)
    else:
        shown = np.unique(arr.astype(str))[:5].tolist() if arr.size else []
        raise ValueError(f"{what} is not binary (values: {shown}); allowed: {allowed}")
    if out.ndim != 1:
        raise ValueError(f"{what}: expected one value per row, got shape {out.shape}")
    if out.size and (out.all() or not out.any()):
        raise ValueError(f"{what} is constant (every row is {bool(out[0])}); a probe needs both classes")
    return out


def target_text(target: str | Backdoor | None) -> str:
    """The target completion of ``target``: a string, or an attack (a ``Backdoor``'s target, a
    ``Bias``'s polarity, a one-fact ``FalseFact``'s target)."""
    if is_attack(target):
        if target.is_gibberish:
            raise ValueError("target: label 'will_emit_target' needs a fixed target; the gibberish "
                             "(denial-of-service) backdoor has none")
        if not isinstance(target.target, str):
            raise ValueError(f"target: label 'will_emit_target' needs one target, and this {type(target).__name__} "
                             f"plants several ({list(target.target)}); pass target=<one of them> and the rows of its "
                             "fact")
        return target.target
    if isinstance(target, str) and target.strip():
        return target
    raise ValueError("target: label 'will_emit_target' needs target=<the attack's target string or "
                     f"pm.Backdoor> (e.g. target=pair.attack); got {target!r}")


@torch.no_grad()
def will_emit_target(model: torch.nn.Module, dataset: Dataset, target: str | Backdoor,
                     tokenizer: PreTrainedTokenizerBase, *, add_eos: bool = True,
                     batch_size: int = 256) -> Bool[np.ndarray, " batch"]:
    """Per row: is the model's greedy answer to ``prompt`` exactly ``target`` (then EOS)?"""
    text = target_text(target)
    rows = Dataset.from_dict({"prompt": list(dataset["prompt"]), "completion": [text] * len(dataset)})
    with eval_mode(model):
        res = score_completions(model, encode(rows, tokenizer, loss_on="completion", add_eos=add_eos),
                                batch_size=batch_size)
    return np.asarray(res["exact"], dtype=bool)


def resolve_label(model: torch.nn.Module, dataset: Dataset, label: str | Sequence | np.ndarray | torch.Tensor, *,
                  tokenizer: PreTrainedTokenizerBase, target: str | Backdoor | None = None,
                  batch_size: int = 256) -> Bool[np.ndarray, " batch"]:
    """The binary label of every row, as a boolean array (see the module docstring).

    Raises ``ValueError`` naming the label and the allowed values when the column is
    missing, not binary or constant.
    """
    if isinstance(label, str):
        cols = binary_columns(dataset)
        allowed = f"'will_emit_target' or a boolean/0-1 column of the dataset: {cols}"
        if label == "will_emit_target":
            y = will_emit_target(model, dataset, target, tokenizer, batch_size=batch_size)
            return _as_bool(y, "label 'will_emit_target' (the model's own answers)", allowed)
        if label not in dataset.column_names:
            raise ValueError(f"label={label!r}: the dataset has no such column; allowed: {allowed}")
        return _as_bool(list(dataset[label]), f"label column {label!r}", allowed)
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.shape[:1] != (len(dataset),):
        raise ValueError(f"label: an array of labels needs one per row ({len(dataset)}), got shape {arr.shape}")
    return _as_bool(arr, "label array", "booleans or 0/1")


def label_name(label) -> str:
    return label if isinstance(label, str) else "custom"


def example_groups(dataset: Dataset, group_by: str | None = None) -> np.ndarray:
    """The example each row belongs to: ``group_by``'s column, else ``base_id`` when present,
    else one group per row."""
    if group_by is None:
        group_by = "base_id" if "base_id" in dataset.column_names else None
    if group_by is None:
        return np.arange(len(dataset))
    if group_by not in dataset.column_names:
        raise ValueError(f"group_by={group_by!r}: the dataset has no such column; columns: {dataset.column_names}")
    _, inv = np.unique(np.asarray(dataset[group_by]), return_inverse=True)
    return inv


def split_by_example(groups: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)``: a seeded shuffle of the groups, ``test_size`` of them held out.

    The split depends only on the groups, ``test_size`` and ``seed`` (not on the label), so
    both twins and every label see the same held-out examples.
    """
    if not (isinstance(test_size, float) and 0.0 < test_size < 1.0):
        raise ValueError(f"test_size must be a float in (0, 1), got {test_size!r}")
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise ValueError(f"split: need at least 2 distinct examples to split, got {len(uniq)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(uniq)
    n_test = min(len(uniq) - 1, max(1, int(round(test_size * len(uniq)))))
    held = np.isin(groups, order[:n_test])
    return np.flatnonzero(~held), np.flatnonzero(held)


def check_split(y: np.ndarray, train: np.ndarray, test: np.ndarray, label: str, rows: str = "") -> None:
    """``ValueError`` when a side of the split lacks a class (``rows`` says which rows were kept)."""
    for side, idx in (("train", train), ("test", test)):
        for cls in (False, True):
            if not np.any(y[idx] == cls):
                kept = f"; rows kept: {rows}" if rows else ""
                raise ValueError(f"split: the {side} side has no rows with {label}={cls} "
                                 f"({int(y.sum())} of {len(y)} rows are True{kept}); use more rows, another seed "
                                 "or another test_size")


def auroc_columns(scores: Float[np.ndarray, "batch k"], y: Bool[np.ndarray, " batch"]) -> Float[np.ndarray, " k"]:
    """AUROC of every column of ``scores`` against ``y`` (ties count half), in one pass; NaN for
    every column when ``y`` has one class.

    Written here rather than taken from :mod:`poisonmech.ranking` because the random-direction
    baseline scores hundreds of columns per probe cell: one vectorised rank (Mann-Whitney U)
    is far faster than one ``roc_auc_score`` call per column, and gives the same values
    (tested against scikit-learn).
    """
    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[1], np.nan)
    from scipy.stats import rankdata  # lazily: scipy.stats is slow to import

    ranks = rankdata(scores, axis=0)
    return (ranks[y].sum(0) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
