"""``PatchResult``: per-example patching effects over a grid of cells, with frames and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from poisonmech.storage import load_tensors, save_tensors, tensors_metadata

Tensor = torch.Tensor


@dataclass(frozen=True)
class PatchResult:
    """Patching (or attribution) effects.

    ``values`` has one axis per entry of ``axes`` (``layer``, ``pos``, ``head``, ...) and a
    last ``batch`` axis: the metric of each example with that cell patched. ``baseline`` is the
    metric of the unpatched run being patched into, ``reference`` that of the run patched from
    (for ``mode="denoise"``: corrupted and clean). ``effect`` is ``values - baseline``.
    """

    values: Float[Tensor, "... batch"]
    axes: tuple[str, ...]
    site: str
    mode: str
    method: str
    baseline: Float[Tensor, " batch"]
    reference: Float[Tensor, " batch"]
    str_tokens: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        shape = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        gap = float((self.reference - self.baseline).mean())
        return (f"PatchResult(site={self.site!r}, mode={self.mode!r}, method={self.method!r}, {shape}, "
                f"batch={self.values.shape[-1]}, mean gap reference - baseline={gap:.3f})")

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
            return frame
        frame["mean"] = flat.mean(1).numpy()
        frame["sem"] = self.sem.reshape(-1).cpu().numpy()
        frame["effect"] = eff.mean(1)
        frame["normalized"] = np.nanmean(norm, 1) if np.isfinite(norm).any() else np.nan
        frame["recovery"] = self.recovery.reshape(-1).detach().cpu().numpy()
        return frame

    def plot(self, value: str = "recovery", title: str | None = None):
        """Heatmap: layer × pos (token labels), layer × head, or one panel per head."""
        import plotly.express as px

        if value not in ("normalized", "recovery", "effect", "mean"):
            raise ValueError(f"plot: value must be one of ('normalized', 'recovery', 'effect', 'mean'), got {value!r}")
        grid = self.recovery if value == "recovery" else \
            {"normalized": self.normalized, "effect": self.effect, "mean": self.values}[value].nanmean(-1)
        grid = grid.detach().cpu().numpy()
        title = title or f"{self.method} patching: {self.site} ({self.mode}), {value}"
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

    def save(self, path: str | Path) -> None:
        meta = {"axes": json.dumps(list(self.axes)), "site": self.site, "mode": self.mode, "method": self.method,
                "str_tokens": json.dumps(list(self.str_tokens) if self.str_tokens is not None else None)}
        save_tensors(Path(path), {"values": self.values, "baseline": self.baseline, "reference": self.reference},
                     metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        t, meta = load_tensors(Path(path)), tensors_metadata(Path(path))
        toks = json.loads(meta["str_tokens"])
        return cls(values=t["values"], axes=tuple(json.loads(meta["axes"])), site=meta["site"], mode=meta["mode"],
                   method=meta["method"], baseline=t["baseline"], reference=t["reference"],
                   str_tokens=tuple(toks) if toks is not None else None)
