"""``PatchResult``: per-example patching effects over a grid of cells, with frames, plots and files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from poisonmech.results import META_KEY, Result, ResultFormatError
from poisonmech.storage import load_tensors, tensors_metadata

Tensor = torch.Tensor


@dataclass(frozen=True)
class PatchResult(Result):
    """Patching (or attribution) effects.

    ``values`` has one axis per entry of ``axes`` (``layer``, ``pos``, ``head``, ...) and a
    last ``batch`` axis: the metric of each example with that cell patched. ``baseline`` is the
    metric of the unpatched run being patched into, ``reference`` that of the run patched from
    (for ``mode="denoise"``: corrupted and clean). ``effect`` is ``values - baseline``.

    A metric that returns one scalar for the whole batch (as ``transformer_lens.patching``'s
    do) gives one value per cell: the ``batch`` axis then has size 1 and ``per_example`` is
    False (``baseline`` and ``reference`` are ``[1]`` too), so the tensors keep one rank
    whatever the metric. ``roles`` names the models of a cross-model patch: ``(run,
    patched from)``, e.g. ``("backdoored", "clean")``; ``None`` for one model.

    Causal tracing (:func:`~poisonmech.patching.causal_trace`) averages over noise draws:
    ``values`` and ``baseline`` are then the means over draws, and ``sample_values``
    (``[... batch sample]``) and ``sample_baseline`` (``[batch sample]``) keep each draw's
    metric, from which :attr:`sample_normalized` and :attr:`spread` follow. Other analyses
    leave both ``None``.
    """

    kind: ClassVar[str] = "patch"
    version: ClassVar[int] = 1

    values: Float[Tensor, "... batch"]
    axes: tuple[str, ...]
    site: str
    mode: str
    method: str
    baseline: Float[Tensor, " batch"]
    reference: Float[Tensor, " batch"]
    str_tokens: tuple[str, ...] | None = None
    per_example: bool = True
    roles: tuple[str, str] | None = None
    sample_values: Float[Tensor, "... batch sample"] | None = None
    sample_baseline: Float[Tensor, "batch sample"] | None = None

    @property
    def _roles_text(self) -> str:
        """``", donor -> receiver"`` for a cross-model result, else ``""``."""
        return f", {self.roles[1]} -> {self.roles[0]}" if self.roles else ""

    def __repr__(self) -> str:
        shape = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        gap = float((self.reference - self.baseline).mean())
        batch = f"batch={self.values.shape[-1]}" if self.per_example else "one value per cell (batch metric)"
        if self.sample_values is not None:
            batch += f", samples={self.sample_values.shape[-1]}"
        return (f"PatchResult(site={self.site!r}, mode={self.mode!r}{self._roles_text}, method={self.method!r}, {shape}, "
                f"{batch}, mean gap reference - baseline={gap:.3f})")

    @property
    def mean(self) -> Tensor:
        """Mean over examples of the patched metric, one value per cell."""
        return self.values.mean(-1)

    @property
    def sem(self) -> Tensor:
        """Standard error of the mean over examples."""
        n = self.values.shape[-1]
        return self.values.std(-1, unbiased=True) / np.sqrt(n) if n > 1 else torch.zeros_like(self.mean)

    @property
    def effect(self) -> Tensor:
        return self.values - self.baseline

    @property
    def normalized(self) -> Tensor:
        """Per example, ``(patched - baseline) / (reference - baseline)``: 0 = nothing moved, 1 = full recovery.

        NaN for examples whose two runs agree (``|reference - baseline| < 1e-6``): nothing to recover.
        """
        den = self.reference - self.baseline
        tiny = den.abs() < 1e-6
        return torch.where(tiny, torch.full_like(den, float("nan")), self.values - self.baseline) / \
            torch.where(tiny, torch.ones_like(den), den)

    @property
    def sample_effect(self) -> Tensor | None:
        """Per noise draw, ``sample_values - sample_baseline`` (``[... batch sample]``: each draw's
        raw indirect effect); ``None`` without per-draw values."""
        if self.sample_values is None or self.sample_baseline is None:
            return None
        return self.sample_values - self.sample_baseline

    @property
    def sample_normalized(self) -> Tensor | None:
        """Per noise draw, ``(sample_values - sample_baseline) / (reference - baseline)``
        (``[... batch sample]``): each draw's indirect effect over the mean gap, so its mean over
        draws is :attr:`normalized` exactly. ``None`` without per-draw values."""
        effect = self.sample_effect
        if effect is None:
            return None
        den = self.reference - self.baseline
        den = torch.where(den.abs() < 1e-6, torch.full_like(den, float("nan")), den)
        return effect / den[:, None]

    @property
    def spread(self) -> Tensor | None:
        """Standard deviation over noise draws of :attr:`sample_normalized` (``[... batch]``;
        zeros for one draw); ``None`` without per-draw values."""
        norm = self.sample_normalized
        if norm is None:
            return None
        return norm.std(-1, unbiased=True) if norm.shape[-1] > 1 else torch.zeros_like(norm[..., 0])

    @property
    def recovery(self) -> Tensor:
        """Per cell, mean effect over the mean gap ``mean(patched - baseline) / mean(reference - baseline)``:
        the robust summary of ``normalized`` (NaN when the runs agree on average)."""
        gap = float((self.reference - self.baseline).mean())
        eff = (self.values - self.baseline).mean(-1)
        return eff / gap if abs(gap) > 1e-6 else torch.full_like(eff, float("nan"))

    def to_frame(self, per_example: bool = False) -> pd.DataFrame:
        """Tidy frame: one row per cell (``mean``, ``sem``, ``effect``, ``normalized``), or per cell × example."""
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in self.values.shape[:-1]], indexing="ij"), -1)
        grid = grid.reshape(-1, len(self.axes))
        frame = pd.DataFrame(grid, columns=list(self.axes))
        flat = self.values.reshape(-1, self.values.shape[-1]).detach().cpu()
        eff = (flat - self.baseline.cpu()).numpy()
        norm = self.normalized.reshape(-1, self.values.shape[-1]).detach().cpu().numpy()
        if self.str_tokens is not None and "pos" in self.axes:
            frame["token"] = [self.str_tokens[p] for p in frame["pos"]]
        frame.insert(0, "site", self.site)
        if per_example:
            frame = frame.loc[frame.index.repeat(flat.shape[1])].reset_index(drop=True)
            frame["example"] = np.tile(np.arange(flat.shape[1]), len(grid))
            frame["value"] = flat.numpy().reshape(-1)
            frame["effect"] = eff.reshape(-1)
            frame["normalized"] = norm.reshape(-1)
            if self.spread is not None:
                frame["spread"] = self.spread.reshape(-1).detach().cpu().numpy()
            return frame
        frame["mean"] = flat.mean(1).numpy()
        frame["sem"] = self.sem.reshape(-1).cpu().numpy()
        frame["effect"] = eff.mean(1)
        frame["normalized"] = np.nanmean(norm, 1) if np.isfinite(norm).any() else np.nan
        frame["recovery"] = self.recovery.reshape(-1).detach().cpu().numpy()
        if self.spread is not None:  # the mean over examples of the spread over noise draws
            spread = self.spread.reshape(-1, self.values.shape[-1]).detach().cpu().numpy()
            frame["spread"] = np.nanmean(spread, 1) if np.isfinite(spread).any() else np.nan
        return frame

    def plot(self, value: str = "recovery", title: str | None = None):
        """Heatmap: layer × pos (token labels), layer × head, or one panel per head."""
        import plotly.express as px

        if value not in ("normalized", "recovery", "effect", "mean"):
            raise ValueError(f"plot: value must be one of ('normalized', 'recovery', 'effect', 'mean'), got {value!r}")
        grid = self.recovery if value == "recovery" else \
            {"normalized": self.normalized, "effect": self.effect, "mean": self.values}[value].nanmean(-1)
        grid = grid.detach().cpu().numpy()
        title = title or f"{self.method} patching: {self.site} ({self.mode}{self._roles_text}), {value}"
        ylab = [f"L{i}" for i in range(grid.shape[0])]
        pos_lab = None
        if "pos" in self.axes:
            n_pos = self.values.shape[self.axes.index("pos")]
            pos_lab = [f"{i}: {t}" for i, t in enumerate(self.str_tokens[:n_pos])] if self.str_tokens \
                else [str(i) for i in range(n_pos)]
        common = dict(color_continuous_scale="RdBu", color_continuous_midpoint=0.0, aspect="auto", title=title)
        if self.axes == ("layer", "pos", "head"):
            fig = px.imshow(np.moveaxis(grid, -1, 0), facet_col=0, x=pos_lab, y=ylab,
                            labels={"color": value, "x": "position", "y": "layer", "facet_col": "head"}, **common)
        else:
            if grid.ndim == 1:
                grid = grid[:, None]
            x = pos_lab if len(self.axes) > 1 and self.axes[1] == "pos" else \
                [f"H{h}" for h in range(grid.shape[1])] if "head" in self.axes else ["all"]
            xname = "position" if "pos" in self.axes else "head"
            fig = px.imshow(grid, x=x, y=ylab, labels={"color": value, "x": xname, "y": "layer"}, **common)
        fig.update_layout(template="plotly_white")
        return fig

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (format ``poisonmech.patch/1``, checked by :meth:`load`)."""
        meta = {"axes": list(self.axes), "site": self.site, "mode": self.mode, "method": self.method,
                "str_tokens": list(self.str_tokens) if self.str_tokens is not None else None,
                "per_example": self.per_example, "roles": list(self.roles) if self.roles else None}
        tensors = {"values": self.values, "baseline": self.baseline, "reference": self.reference}
        if self.sample_values is not None and self.sample_baseline is not None:
            tensors.update(sample_values=self.sample_values, sample_baseline=self.sample_baseline)
        return self._write(path, meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        """Read a file written by :meth:`save`; a file of another kind or a newer version is a
        :class:`~poisonmech.results.ResultFormatError`. Files of the untagged format written
        before format tags existed are still read."""
        try:
            meta, t = cls._read(path)
        except ResultFormatError:
            meta, t = _legacy(Path(path))
        toks, roles = meta.get("str_tokens"), meta.get("roles")
        return cls(values=t["values"], axes=tuple(meta["axes"]), site=meta["site"], mode=meta["mode"],
                   method=meta["method"], baseline=t["baseline"], reference=t["reference"],
                   str_tokens=tuple(toks) if toks is not None else None,
                   per_example=bool(meta.get("per_example", True)), roles=tuple(roles) if roles else None,
                   sample_values=t.get("sample_values"), sample_baseline=t.get("sample_baseline"))


_LEGACY_KEYS = ("axes", "site", "mode", "method", "str_tokens")


def _legacy(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """The untagged PatchResult files of earlier versions (string metadata, JSON-encoded
    lists); anything else re-raises the format error."""
    try:
        raw = tensors_metadata(path)
    except Exception:  # not a safetensors file at all: the format check's error says so
        raw = {}
    if META_KEY in raw or not all(k in raw for k in _LEGACY_KEYS):
        PatchResult._read(path)  # raises the ResultFormatError naming what the file is
    meta = {"axes": json.loads(raw["axes"]), "site": raw["site"], "mode": raw["mode"], "method": raw["method"],
            "str_tokens": json.loads(raw["str_tokens"])}
    return meta, load_tensors(path)
