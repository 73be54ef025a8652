"""``probe_transfer``: fit probes in one setting and test them in another.

Two kinds of transfer:

- across *models*: fit on one twin's activations, test on the other twin's activations of
  the same held-out examples (``test_model=pair.clean``);
- across *data*: fit on one contrast (rows with trigger A, near-miss rows, any binary
  column of any dataset) and test on another (``test_data=...``, ``test_label=...``),
  optionally on another model too.

The probe is always fit on the training side of an example-level split of the source, and
also scored on the source's held-out side, so the in-domain AUROC sits beside the transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.probes.activations import PositionSpec, Site, _tokenizer, collect_activations
from poisonmech.probes.labels import (
    check_split,
    example_groups,
    label_name,
    resolve_label,
    split_by_example,
)
from poisonmech.probes.layers import check_method, fit_cells, length_aurocs, to_result
from poisonmech.probes.result import ProbeResult, _plot, read_result, span, write_result


@dataclass(frozen=True)
class TransferResult:
    """A probe's scores where it was fit (``source``, held-out rows) and where it is tested (``target``).

    Both are ``ProbeResult``s sharing the same probes (``coef``, ``intercept``); the
    target's ``test_index`` points into the target dataset, its random baseline uses the
    same random directions, oriented on the source's training rows, and its length baseline
    the same sign, chosen on the source's training rows.
    """

    source: ProbeResult
    target: ProbeResult

    @property
    def auroc(self) -> torch.Tensor:
        """Transfer AUROC per (layer, position)."""
        return self.target.auroc

    @property
    def source_auroc(self) -> torch.Tensor:
        """In-domain held-out AUROC per (layer, position)."""
        return self.source.auroc

    def __repr__(self) -> str:
        return (f"TransferResult {self.source.name!r} ({self.source.label}) -> {self.target.name!r} "
                f"({self.target.label}) at {self.source.site} ({self.source.method}), layers {span(self.source.layers)}\n"
                f"  source: {self.source.summary()}\n  target: {self.target.summary()}")

    def to_frame(self) -> pd.DataFrame:
        """Both sides' frames stacked, with ``evaluated_on`` = ``"source"`` / ``"target"``."""
        a, b = self.source.to_frame(), self.target.to_frame()
        a.insert(0, "evaluated_on", "source")
        b.insert(0, "evaluated_on", "target")
        return pd.concat([a, b], ignore_index=True)

    def plot(self, title: str | None = None):
        """AUROC by layer where the probe was fit and where it was transferred, with random bands."""
        return _plot([self.source, self.target],
                     title or f"probe transfer: {self.source.name} ({self.source.label}) -> "
                              f"{self.target.name} ({self.target.label})")

    def save(self, path: str | Path) -> None:
        tensors = {**self.source._tensors("source/"), **self.target._tensors("target/")}
        write_result(path, tensors, {"kind": "TransferResult", "source": self.source._meta(),
                                     "target": self.target._meta()})

    @classmethod
    def load(cls, path: str | Path) -> TransferResult:
        tensors, meta = read_result(path, "TransferResult")
        return cls(source=ProbeResult._from(tensors, meta["source"], "source/"),
                   target=ProbeResult._from(tensors, meta["target"], "target/"))


def probe_transfer(model: torch.nn.Module, dataset: Dataset, label: str | Sequence | np.ndarray = "is_triggered", *,
                   test_model: torch.nn.Module | None = None, test_data: Dataset | None = None,
                   test_label: str | Sequence | np.ndarray | None = None, site: Site = "resid_post",
                   layers: int | Sequence[int] | None = None, positions: PositionSpec = "last",
                   method: Literal["logistic", "mean_diff"] = "logistic", C: float = 1.0,
                   standardize: bool = False, test_size: float = 0.3,
                   n_random: int = 100, seed: int = 0, group_by: str | None = None,
                   target: str | Backdoor | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                   batch_size: int = 64, name: str = "source", test_name: str = "target",
                   progress: bool = True) -> TransferResult:
    """Fit probes for ``label`` on ``model`` / ``dataset`` and test them elsewhere.

    Args:
        model, dataset, label: where the probes are fit (see ``probe_layers``).
        test_model: the model whose activations the probes are tested on (default ``model``),
            e.g. the other twin.
        test_data: rows to test on. ``None``: the source's held-out examples (as read by
            ``test_model``); otherwise every row of ``test_data`` (e.g. rows with another
            trigger). At least one of ``test_model`` and ``test_data`` is needed.
        test_label: the label on the test side (default ``label``); ``"will_emit_target"``
            is read from ``test_model``'s own answers.
        name, test_name: how the two sides are named in frames and plots.
        The other arguments are ``probe_layers``'.

    Returns a ``TransferResult`` (``.auroc`` on the target, ``.source_auroc`` in-domain).
    """
    if test_model is None and test_data is None:
        raise ValueError("probe_transfer: give test_model (another model, e.g. the other twin) and/or "
                         "test_data (another contrast set); with neither there is nothing to transfer to")
    check_method(method, n_random)
    tok = _tokenizer(model, tokenizer)
    tmodel = model if test_model is None else test_model
    ttok = tokenizer if tokenizer is not None else getattr(tmodel, "tokenizer", None) or tok
    y = resolve_label(model, dataset, label, tokenizer=tok, target=target)
    train_idx, held_idx = split_by_example(example_groups(dataset, group_by), test_size, seed)
    check_split(y, train_idx, held_idx, label_name(label))
    src = collect_activations(model, dataset, site=site, layers=layers, positions=positions, tokenizer=tok,
                              batch_size=batch_size, progress=progress)

    tlabel = label if test_label is None else test_label
    if test_data is None:
        tdata, tindex = dataset.select(held_idx.tolist()), held_idx
        if not isinstance(tlabel, str):
            tlabel = np.asarray(tlabel)[held_idx]
    else:
        tdata, tindex = test_data, np.arange(len(test_data))
    ty = resolve_label(tmodel, tdata, tlabel, tokenizer=ttok, target=target)
    positions_t = list(src.positions)  # the same token positions on both sides
    tgt = collect_activations(tmodel, tdata, site=site, layers=list(src.layers), positions=positions_t,
                              tokenizer=ttok, batch_size=batch_size, progress=progress)
    fit_src, fit_tgt = fit_cells(src.acts[:, train_idx], src.valid[train_idx], y[train_idx],
                                 [(src.acts[:, held_idx], src.valid[held_idx], y[held_idx]),
                                  (tgt.acts, tgt.valid, ty)],
                                 method=method, C=C, standardize=standardize, n_random=n_random, seed=seed,
                                 progress=progress,
                                 desc="probes (transfer)")
    src_len, tgt_len = src.lengths.numpy() - 1, tgt.lengths.numpy() - 1  # prompt tokens, BOS not counted
    len_src, len_tgt = length_aurocs(src_len[train_idx], src.valid[train_idx], y[train_idx],
                                     [(src_len[held_idx], src.valid[held_idx], y[held_idx]), (tgt_len, tgt.valid, ty)])
    common = {"train_index": train_idx, "method": method, "seed": seed}
    return TransferResult(
        source=to_result(fit_src, acts=src, test_index=held_idx, label=label_name(label), name=name,
                         length_auroc=len_src, **common),
        target=to_result(fit_tgt, acts=tgt, test_index=tindex, label=label_name(tlabel), name=test_name,
                         length_auroc=len_tgt, **common))
