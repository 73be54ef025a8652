"""``ProbeResult`` (probes of one model, per layer and position) and ``ProbeComparison``
(several of them, e.g. both twins), with tidy frames, plotly figures and safetensors I/O.

Every result of the package derives from :class:`poisonmech.results.Result`: its file's format
tag (``"poisonmech.probes.<kind>/<version>"``) is checked on load, so a file of another kind or
of a newer version is a clear error. Files written before that (format ``"poisonmech.probes/1"``
with a separate ``"kind"`` key) still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from poisonmech.results import META_KEY, Result, ResultFormatError
from poisonmech.storage import load_tensors, read_json, tensors_metadata

Tensor = torch.Tensor
#: the format every probes result file had before format tags named their kind
LEGACY_FORMAT = "poisonmech.probes/1"


def position_label(p: int) -> str:
    """``-1`` -> ``"last"``, ``-2`` -> ``"last-1"``, ``3`` -> ``"3"``."""
    return "last" if p == -1 else (f"last{p + 1}" if p < 0 else str(p))


def span(values, label=str) -> str:
    """A short text for integer layers or positions (each shown by ``label``): ``[0, 1]``,
    ``0..11`` for a long consecutive run, else the first two and the last."""
    v = [int(x) for x in values]
    if len(v) > 3 and v == list(range(v[0], v[0] + len(v))):
        return f"{label(v[0])}..{label(v[-1])} ({len(v)})"
    shown = [label(x) for x in v]
    return "[" + ", ".join(shown) + "]" if len(v) <= 6 else f"[{shown[0]}, {shown[1]}, ..., {shown[-1]}] ({len(v)})"


def num(x: float) -> str:
    """A metric for a repr: three decimals, ``nan`` when missing."""
    return "nan" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _legacy_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of a file in the old ``"poisonmech.probes/1"`` layout, else ``None``."""
    try:
        with open(path, "rb") as f:
            json_file = f.read(1) == b"{"
        meta = read_json(path) if json_file else json.loads(tensors_metadata(path).get(META_KEY) or "{}")
    except Exception:  # unreadable: the format check's own error is the one to report
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == LEGACY_FORMAT else None


def read_probe_file(cls: type[Result], path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a ``cls`` file, its format checked (old-layout files accepted)."""
    path = Path(path)
    try:
        meta, tensors = cls._read(path)
    except ResultFormatError:
        meta = _legacy_meta(path)
        if meta is None:
            raise
        if meta.get("kind") != cls.__name__:
            raise ResultFormatError(f"{path} holds a {meta.get('kind')!r} result ({LEGACY_FORMAT!r}), not a "
                                    f"{cls.__name__}") from None
        with open(path, "rb") as f:
            tensors = {} if f.read(1) == b"{" else load_tensors(path)
    return tensors, meta


@dataclass(frozen=True)
class ProbeResult(Result):
    """Linear probes of one model: one per layer (and per position where asked).

    Attributes:
        auroc: held-out AUROC of each probe.
        accuracy: held-out accuracy at the probe's own threshold.
        random_auroc: held-out AUROC of ``n_random`` random unit directions per cell (each
            oriented on the training rows); ``baseline_auroc`` (= ``random_auroc_max``) is
            their best, ``random_auroc_median`` and ``random_auroc_p95`` their median and 95th
            percentile (the best of many directions grows with their number: quote the
            distribution, not only the maximum).
        coef, intercept: the probes in raw activation space (score ``x @ coef + intercept``).
        n_train, n_test: rows used per position (rows shorter than a position lack it).
        train_index, test_index: row indices of the example-level split.
        layers, positions: the model layers and token positions (``-1``: last prompt token;
            negative counts from the end of each prompt, non-negative are absolute).
        site, label, method, name: what was probed, for what, how, and on which model.
        length_auroc: per position, the held-out AUROC of the prompt's token count alone (its
            sign chosen on the training rows), on the same rows as the probe: what a probe
            could reach by reading length only (a triggered row is one token longer than its
            clean twin). ``None`` in results saved before it existed.
        contrast: which rows were probed: ``"untriggered"`` (every row) or ``"near_miss"``
            (triggered and near-miss rows only).
        balance_length: whether rows were subsampled so that both classes have the same
            length distribution on each side of the split.
    """

    auroc: Float[Tensor, "layer pos"]
    accuracy: Float[Tensor, "layer pos"]
    random_auroc: Float[Tensor, "layer pos n_random"]
    coef: Float[Tensor, "layer pos d_model"]
    intercept: Float[Tensor, "layer pos"]
    n_train: Int[Tensor, " pos"]
    n_test: Int[Tensor, " pos"]
    train_index: Int[Tensor, " n_train"]
    test_index: Int[Tensor, " n_test"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    site: str
    label: str
    method: str
    name: str = "model"
    seed: int = 0
    length_auroc: Float[Tensor, " pos"] | None = None
    contrast: str = "untriggered"
    balance_length: bool = False

    kind: ClassVar[str] = "probes.result"
    version: ClassVar[int] = 1

    # ---- derived views -------------------------------------------------------------------
    @property
    def directions(self) -> Float[Tensor, "layer pos d_model"]:
        """Unit-norm probe directions (a higher projection means the positive class)."""
        norm = self.coef.norm(dim=-1, keepdim=True)
        return self.coef / torch.where(norm > 0, norm, torch.ones_like(norm))

    @property
    def baseline_auroc(self) -> Float[Tensor, "layer pos"]:
        """Best held-out AUROC among the random directions of each cell."""
        return self.random_auroc.max(-1).values if self.random_auroc.shape[-1] else torch.full_like(self.auroc, float("nan"))

    def random_quantile(self, q: float) -> Float[Tensor, "layer pos"]:
        """The ``q`` quantile (0..1, linear interpolation as ``numpy.quantile``) of each cell's
        random-direction AUROCs; NaN without random directions."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if not self.random_auroc.shape[-1]:
            return torch.full_like(self.auroc, float("nan"))
        return torch.as_tensor(np.quantile(self.random_auroc.double().numpy(), q, axis=-1), dtype=torch.float32)

    @property
    def random_auroc_median(self) -> Float[Tensor, "layer pos"]:
        """Median held-out AUROC of the random directions of each cell."""
        return self.random_quantile(0.5)

    @property
    def random_auroc_p95(self) -> Float[Tensor, "layer pos"]:
        """95th percentile of the random directions' held-out AUROCs of each cell."""
        return self.random_quantile(0.95)

    @property
    def random_auroc_max(self) -> Float[Tensor, "layer pos"]:
        """Best held-out AUROC among the random directions of each cell (``baseline_auroc``)."""
        return self.baseline_auroc

    @property
    def length_baseline(self) -> Float[Tensor, " pos"]:
        """``length_auroc``, NaN where it was not computed (older results)."""
        if self.length_auroc is None:
            return torch.full((len(self.positions),), float("nan"))
        return self.length_auroc

    @property
    def best(self) -> tuple[int, int]:
        """``(layer, position)`` of the highest held-out AUROC (first on ties)."""
        a = torch.nan_to_num(self.auroc, nan=-1.0)
        flat = int(torch.argmax(a))
        li, pi = divmod(flat, a.shape[1])
        return self.layers[li], self.positions[pi]

    @property
    def best_layer(self) -> int:
        return self.best[0]

    def _index(self, layer: int | None, position: int | None) -> tuple[int, int]:
        bl, bp = self.best
        layer = bl if layer is None else layer
        position = bp if position is None else position
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not probed (layers: {self.layers})")
        if position not in self.positions:
            raise ValueError(f"position {position} was not probed (positions: {self.positions})")
        return self.layers.index(layer), self.positions.index(position)

    def direction(self, layer: int | None = None, position: int | None = None) -> Float[Tensor, " d_model"]:
        """The unit direction of one probe (default: the best one)."""
        li, pi = self._index(layer, position)
        return self.directions[li, pi].clone()

    def auroc_at(self, layer: int | None = None, position: int | None = None) -> float:
        li, pi = self._index(layer, position)
        return float(self.auroc[li, pi])

    def summary(self) -> str:
        """One line: the best cell's AUROC beside its baselines (random directions, length)."""
        li, pi = self._index(None, None)
        lay, pos = self.best
        return (f"best layer {lay} pos {position_label(pos)}: AUROC {num(float(self.auroc[li, pi]))} | random "
                f"median {num(float(self.random_auroc_median[li, pi]))}, p95 "
                f"{num(float(self.random_auroc_p95[li, pi]))}, max {num(float(self.random_auroc_max[li, pi]))} "
                f"(n={self.random_auroc.shape[-1]}) | length {num(float(self.length_baseline[pi]))} | "
                f"n_train {int(self.n_train[pi])}, n_test {int(self.n_test[pi])}")

    def __repr__(self) -> str:
        rows = f"contrast {self.contrast}" + (", length-balanced" if self.balance_length else "")
        return (f"ProbeResult {self.name!r}: {self.label!r} at {self.site} ({self.method}), layers "
                f"{span(self.layers)}, positions {span(self.positions, position_label)}, {rows}\n"
                f"  {self.summary()}")

    # ---- frames, figures, files -------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position): AUROC and accuracy, with the baselines beside them: the
        random directions' median, 95th percentile, max (``random_auroc_best`` is the same max)
        and mean, and the length-only AUROC."""
        rows = []
        med, p95, top = self.random_auroc_median, self.random_auroc_p95, self.random_auroc_max
        length = self.length_baseline
        for li, layer in enumerate(self.layers):
            for pi, pos in enumerate(self.positions):
                r = self.random_auroc[li, pi]
                rows.append({"model": self.name, "site": self.site, "label": self.label, "method": self.method,
                             "contrast": self.contrast, "balance_length": self.balance_length,
                             "layer": layer, "pos": pos, "pos_label": position_label(pos),
                             "auroc": float(self.auroc[li, pi]), "accuracy": float(self.accuracy[li, pi]),
                             "random_auroc_median": float(med[li, pi]), "random_auroc_p95": float(p95[li, pi]),
                             "random_auroc_max": float(top[li, pi]), "random_auroc_best": float(top[li, pi]),
                             "random_auroc_mean": float(r.mean()) if r.numel() else float("nan"),
                             "n_random": int(r.numel()), "length_auroc": float(length[pi]),
                             "n_train": int(self.n_train[pi]), "n_test": int(self.n_test[pi])})
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """AUROC by layer with the random-direction band (one position), or a layer × position heatmap."""
        return _plot([self], title)

    def _tensors(self, prefix: str = "") -> dict[str, Tensor]:
        names = ("auroc", "accuracy", "random_auroc", "coef", "intercept", "n_train", "n_test", "train_index",
                 "test_index", "length_auroc")
        return {prefix + k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def _meta(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "positions": list(self.positions), "site": self.site,
                "label": self.label, "method": self.method, "name": self.name, "seed": self.seed,
                "contrast": self.contrast, "balance_length": self.balance_length}

    @classmethod
    def _from(cls, tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str = "") -> ProbeResult:
        # optional tensors (default None) may be absent from files written before they existed
        kw = {f.name: tensors.get(prefix + f.name) if f.default is None else tensors[prefix + f.name]
              for f in fields(cls) if f.type.startswith(("Float", "Int"))}
        return cls(**kw, layers=tuple(meta["layers"]), positions=tuple(meta["positions"]), site=meta["site"],
                   label=meta["label"], method=meta["method"], name=meta["name"], seed=meta["seed"],
                   contrast=meta.get("contrast", "untriggered"), balance_length=bool(meta.get("balance_length", False)))

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON header with the format tag)."""
        return self._write(path, self._meta(), self._tensors())

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a file written by :meth:`save` (another kind of file is an error)."""
        tensors, meta = read_probe_file(cls, path)
        return cls._from(tensors, meta)


@dataclass(frozen=True)
class ProbeComparison(Result):
    """Several ``ProbeResult``s side by side (e.g. the clean and the backdoored twin)."""

    results: tuple[ProbeResult, ...]

    kind: ClassVar[str] = "probes.comparison"
    version: ClassVar[int] = 1

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results)

    def __getitem__(self, name: str) -> ProbeResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no result named {name!r} (names: {self.names})")

    def __repr__(self) -> str:
        first = self.results[0] if self.results else None
        what = f" for {first.label!r} at {first.site} ({first.method}), contrast {first.contrast}" if first else ""
        lines = [f"ProbeComparison of {', '.join(map(repr, self.names))}{what}"]
        lines += [f"  {r.name}: {r.summary()}" for r in self.results]
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        """The results' frames stacked (a ``model`` column tells them apart)."""
        return pd.concat([r.to_frame() for r in self.results], ignore_index=True)

    def plot(self, title: str | None = None):
        """AUROC by layer of every result, each with its random-direction band."""
        return _plot(list(self.results), title)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file holding every result."""
        tensors: dict[str, Tensor] = {}
        metas = []
        for i, r in enumerate(self.results):
            tensors.update(r._tensors(f"{i}/"))
            metas.append(r._meta())
        return self._write(path, {"results": metas}, tensors)

    @classmethod
    def load(cls, path: str | Path) -> ProbeComparison:
        tensors, meta = read_probe_file(cls, path)
        return cls(tuple(ProbeResult._from(tensors, m, f"{i}/") for i, m in enumerate(meta["results"])))


_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _plot(results: list[ProbeResult], title: str | None):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    first = results[0]
    title = title or f"probe AUROC for {first.label!r} at {first.site} ({first.method})"
    if all(len(r.positions) == 1 for r in results):
        fig = go.Figure()
        for k, r in enumerate(results):
            color = _COLORS[k % len(_COLORS)]
            x = list(r.layers)
            ra = r.random_auroc[:, 0].numpy() if r.random_auroc.shape[-1] else np.full((len(x), 1), np.nan)
            lo, hi = ra.min(-1), ra.max(-1)
            fig.add_trace(go.Scatter(x=x + x[::-1], y=list(hi) + list(lo[::-1]), fill="toself",
                                     fillcolor=_rgba(color, 0.15), line={"width": 0}, hoverinfo="skip",
                                     name=f"{r.name}: random directions (min–max of {ra.shape[-1]})"))
            if ra.shape[-1]:
                fig.add_trace(go.Scatter(x=x, y=r.random_auroc_p95[:, 0].tolist(), mode="lines",
                                         line={"color": color, "dash": "dot", "width": 1},
                                         name=f"{r.name}: random directions (95th percentile)"))
            la = float(r.length_baseline[0])
            if np.isfinite(la):
                fig.add_trace(go.Scatter(x=x, y=[la] * len(x), mode="lines", line={"color": color, "dash": "dash"},
                                         name=f"{r.name}: prompt length alone"))
            fig.add_trace(go.Scatter(x=x, y=r.auroc[:, 0].tolist(), mode="lines+markers", name=f"{r.name}: probe",
                                     line={"color": color}))
        fig.add_hline(y=0.5, line_dash="dot", line_color="grey")
        fig.update_layout(title=title, xaxis_title="layer", yaxis_title="held-out AUROC",
                          yaxis_range=[0.0, 1.02], template="plotly_white")
        fig.update_xaxes(tickmode="array", tickvals=list(first.layers))
        return fig
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=[r.name for r in results], shared_yaxes=True)
    for k, r in enumerate(results):
        fig.add_trace(go.Heatmap(z=r.auroc.numpy(), x=[position_label(p) for p in r.positions],
                                 y=list(r.layers), zmin=0.0, zmax=1.0, colorscale="Viridis",
                                 colorbar={"title": "AUROC"}, showscale=k == 0), row=1, col=k + 1)
        fig.update_xaxes(title_text="position", row=1, col=k + 1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    return fig
