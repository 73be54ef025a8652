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
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.attacks.backdoor import Backdoor
from poisonmech.config import takes_config
from poisonmech.probes.activations import collect
from poisonmech.probes.config import ProbeConfig
from poisonmech.probes.labels import label_name, resolve_label
from poisonmech.probes.layers import fit_cells, length_aurocs, probe_data, probe_split, to_result
from poisonmech.probes.result import ProbeResult, _plot, read_probe_file, span
from poisonmech.results import Result
from poisonmech.subject import resolve


@dataclass(frozen=True)
class TransferResult(Result):
    """A probe's scores where it was fit (``source``, held-out rows) and where it is tested (``target``).

    Both are ``ProbeResult``s sharing the same probes (``coef``, ``intercept``); the
    target's ``test_index`` points into the target dataset, its random baseline uses the
    same random directions, oriented on the source's training rows, and its length baseline
    the same sign, chosen on the source's training rows.
    """

    source: ProbeResult
    target: ProbeResult

    kind: ClassVar[str] = "probes.transfer"
    version: ClassVar[int] = 1

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

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file holding both sides."""
        tensors = {**self.source._tensors("source/"), **self.target._tensors("target/")}
        return self._write(path, {"source": self.source._meta(), "target": self.target._meta()}, tensors)

    @classmethod
    def load(cls, path: str | Path) -> TransferResult:
        tensors, meta = read_probe_file(cls, path)
        return cls(source=ProbeResult._from(tensors, meta["source"], "source/"),
                   target=ProbeResult._from(tensors, meta["target"], "target/"))


@takes_config(ProbeConfig)
def probe_transfer(subject, dataset: Dataset | None = None, label: str | Sequence | np.ndarray = "is_triggered", *,
                   twin: str | None = None, test_twin: str | None = None, test_model: torch.nn.Module | None = None,
                   test_data: Dataset | None = None, test_label: str | Sequence | np.ndarray | None = None,
                   target: str | Backdoor | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                   name: str | None = None, test_name: str | None = None, progress: bool = True,
                   config: ProbeConfig) -> TransferResult:
    """Fit probes for ``label`` on one model / dataset and test them elsewhere.

    Args:
        subject, dataset, label, twin, target, tokenizer: where the probes are fit (see
            ``probe_layers``; ``dataset`` defaults to the run's test rows).
        test_twin: the subject's role whose activations the probes are tested on (e.g.
            ``"clean"``); or ``test_model``: any model. Default: the model the probes were
            fit on.
        test_data: rows to test on. ``None``: the source's held-out examples (as read by the
            test model); otherwise every row of ``test_data`` (e.g. rows with another
            trigger). At least one of a test model (``test_twin`` / ``test_model``) and
            ``test_data`` is needed.
        test_label: the label on the test side (default ``label``); ``"will_emit_target"``
            is read from the test model's own answers.
        name, test_name: how the two sides are named in frames and plots (default: the
            roles, ``"source"`` / ``"target"`` for a bare model).
        The options are :class:`ProbeConfig`'s; ``contrast`` and ``balance_length`` select
        the source's rows (and so its held-out rows).

    Returns a ``TransferResult`` (``.auroc`` on the target, ``.source_auroc`` in-domain).
    """
    if test_twin is not None and test_model is not None:
        raise ValueError("probe_transfer: give test_twin (a role of the subject) or test_model (a model), not both")
    if test_model is None and test_twin is None and test_data is None:
        raise ValueError("probe_transfer: give test_model / test_twin (another model, e.g. the other twin) and/or "
                         "test_data (another contrast set); with neither there is nothing to transfer to")
    s = resolve(subject, test=dataset, tokenizer=tokenizer, where="probe_transfer")
    dataset, tok = probe_data(s, "probe_transfer")
    cfg = config
    role = s.role(twin)
    model = s.models[role]
    test_role = None
    if test_model is None:
        test_role = role if test_twin is None else s.role(test_twin, field_name="test_twin")
        test_model = s.models[test_role]
    # two roles of a run are named by their roles; otherwise the sides are "source" and "target"
    by_role = s.kind != "model" and test_role not in (None, role)
    name = name or (role if by_role else "source")
    test_name = test_name or (test_role if by_role else "target")
    tmodel = test_model
    target = target if target is not None else s.attack
    ttok = tokenizer if tokenizer is not None else getattr(tmodel, "tokenizer", None) or tok
    y = resolve_label(model, dataset, label, tokenizer=tok, target=target)
    train_idx, held_idx = probe_split(dataset, y, label, cfg, tok)
    src = collect(model, dataset, tok, cfg, progress=progress)

    tlabel = label if test_label is None else test_label
    if test_data is None:
        tdata, tindex = dataset.select(held_idx.tolist()), held_idx
        if not isinstance(tlabel, str):
            tlabel = np.asarray(tlabel)[held_idx]
    else:
        tdata, tindex = test_data, np.arange(len(test_data))
    ty = resolve_label(tmodel, tdata, tlabel, tokenizer=ttok, target=target)
    # the same token positions and layers on both sides
    tgt = collect(tmodel, tdata, ttok, cfg, progress=progress, positions=list(src.positions), layers=list(src.layers))
    fit_src, fit_tgt = fit_cells(src.acts[:, train_idx], src.valid[train_idx], y[train_idx],
                                 [(src.acts[:, held_idx], src.valid[held_idx], y[held_idx]),
                                  (tgt.acts, tgt.valid, ty)],
                                 method=cfg.method, C=cfg.C, standardize=cfg.standardize, n_random=cfg.n_random,
                                 seed=cfg.seed, progress=progress, desc="probes (transfer)")
    src_len, tgt_len = src.lengths.numpy() - 1, tgt.lengths.numpy() - 1  # prompt tokens, BOS not counted
    len_src, len_tgt = length_aurocs(src_len[train_idx], src.valid[train_idx], y[train_idx],
                                     [(src_len[held_idx], src.valid[held_idx], y[held_idx]), (tgt_len, tgt.valid, ty)])
    common = {"train_index": train_idx, "method": cfg.method, "seed": cfg.seed, "contrast": cfg.contrast,
              "balance_length": bool(cfg.balance_length)}
    return TransferResult(
        source=to_result(fit_src, acts=src, test_index=held_idx, label=label_name(label), name=name,
                         length_auroc=len_src, **common),
        target=to_result(fit_tgt, acts=tgt, test_index=tindex, label=label_name(tlabel), name=test_name,
                         length_auroc=len_tgt, **common))
