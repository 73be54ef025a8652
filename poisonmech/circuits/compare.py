"""``compare``: how much circuits agree (across twins, seeds, poison rates, methods...)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from poisonmech.circuits.circuit import Circuit
from poisonmech.results import Result

#: the comparison columns ``CircuitComparison.plot`` / ``matrix`` can show
MATRIX_COLUMNS = ("edge_jaccard", "node_jaccard", "score_spearman", "abs_score_spearman", "union_score_spearman")


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|``; 1.0 for two empty sets."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties) and a note.

    Fewer than 2 values, or a constant side, give NaN (as scipy does, which also warns
    ``ConstantInputWarning``) with the reason in the note instead of a warning: a table of
    many pairs reads better with the reason in its ``note`` column."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return float("nan"), f"{len(x)} shared scored edge(s): no rank correlation"
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), "constant scores on the shared edges: no rank correlation"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(x, y).statistic
    return float(rho), ""


def _all_scores(c: Circuit) -> dict[str, float] | None:
    if not c.has_scores:
        return None
    return dict(zip(c.graph.edges, c.edge_values().tolist()))


def _correlations(scores_a: dict[str, float], scores_b: dict[str, float], edges) -> dict[str, object]:
    x = np.array([scores_a[e] for e in edges])
    y = np.array([scores_b[e] for e in edges])
    rho, note = spearman(x, y)
    abs_rho, _ = spearman(np.abs(x), np.abs(y))
    return {"rho": rho, "abs_rho": abs_rho, "note": note}


@dataclass(frozen=True, eq=False)
class CircuitComparison(Result):
    """Pairwise agreement of circuits (:func:`compare`): one row per pair in :meth:`to_frame`.

    For the code written when ``compare`` returned a bare DataFrame, the comparison reads like
    its frame: ``cmp["edge_jaccard"]``, ``cmp[["a", "b"]]``, ``cmp[cmp.a == "x"]``, ``cmp.iloc[0]``,
    ``cmp.iterrows()`` and ``len(cmp)`` go to :attr:`frame` (any attribute the comparison
    lacks is looked up on the frame). Saved as ``"poisonmech.circuit_comparison/1"`` JSON.
    """

    kind = "circuit_comparison"
    version = 1

    frame: pd.DataFrame
    labels: tuple[str, ...]

    def to_frame(self) -> pd.DataFrame:
        """The table (a copy): one row per pair ``(a, b)``, the columns :func:`compare` lists."""
        return self.frame.copy()

    def matrix(self, value: str = "edge_jaccard") -> pd.DataFrame:
        """``labels x labels`` square of one column (symmetric; 1 on the diagonal)."""
        if value not in MATRIX_COLUMNS:
            raise ValueError(f"value must be one of {MATRIX_COLUMNS}, got {value!r}")
        labels = list(self.labels)
        mat = pd.DataFrame(np.eye(len(labels)), index=labels, columns=labels)
        for a, b, v in zip(self.frame["a"], self.frame["b"], self.frame[value]):
            mat.loc[a, b] = mat.loc[b, a] = v
        return mat

    def plot(self, value: str = "edge_jaccard", title: str | None = None):
        """Heatmap of ``value`` (a column of :data:`MATRIX_COLUMNS`) for every pair of circuits."""
        import plotly.express as px

        mat = self.matrix(value)
        lo = 0.0 if value.endswith("jaccard") else -1.0
        fig = px.imshow(mat.to_numpy(), x=list(mat.columns), y=list(mat.index), zmin=lo, zmax=1.0,
                        color_continuous_scale="Blues" if lo == 0 else "RdBu", text_auto=".2f",
                        labels={"color": value}, title=title or f"circuit agreement: {value.replace('_', ' ')}")
        fig.update_layout(template="plotly_white")
        return fig

    def save(self, path: str | Path) -> Path:
        """Atomic JSON write of the table (NaN kept)."""
        return self._write(path, {"labels": list(self.labels), "columns": list(self.frame.columns),
                                  "rows": self.frame.to_dict(orient="records")})

    @classmethod
    def load(cls, path: str | Path) -> CircuitComparison:
        meta, _ = cls._read(path)
        frame = pd.DataFrame(meta["rows"], columns=meta["columns"])
        return cls(frame=frame, labels=tuple(meta["labels"]))

    # -- the DataFrame it used to be ---------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        return self.frame[key]

    def __len__(self) -> int:
        return len(self.frame)

    def __iter__(self) -> Iterator:
        return iter(self.frame)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("frame", "labels"):  # dunder lookups (copy.copy) and attributes before __init__
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "frame"), name)

    def __repr__(self) -> str:
        return f"CircuitComparison({len(self.labels)} circuits, {len(self.frame)} pairs: {', '.join(self.labels)})"


def compare(circuits: Sequence[Circuit] | Mapping[str, Circuit],
            labels: Sequence[str] | None = None) -> CircuitComparison:
    """Pairwise agreement of circuits, one row per pair ``(a, b)`` (``.to_frame()``):

    - ``n_edges_a, n_edges_b, shared_edges, edge_jaccard`` and the same for nodes (``node_jaccard``);
    - ``score_spearman``: the Spearman rank correlation (``scipy.stats.spearmanr``) of the two
      circuits' own scores over every edge both graphs have (``n_scored_edges``), and
      ``abs_score_spearman`` on absolute scores: do the two score maps rank the whole graph alike;
    - ``union_score_spearman``: the same over the union of the two circuits' edges
      (``n_union_edges``, those both graphs have): do they rank the edges either circuit kept alike;
    - ``note``: why a correlation is NaN (a circuit without scores, fewer than 2 shared edges,
      constant scores), else empty.

    A circuit from :meth:`Circuit.random_like` carries its own randomly permuted scores, so its
    correlations with the original are chance level. Circuits are matched by edge and node names,
    so circuits of models of different sizes compare on what they share.

    ``circuits``: a list (labelled by ``labels``, else each circuit's ``label``, else ``c{i}``) or a
    ``{label: circuit}`` mapping. Returns a :class:`CircuitComparison` (which also answers the
    DataFrame access that code written for the old bare-frame return uses).
    """
    if isinstance(circuits, Mapping):
        labels, items = list(circuits), list(circuits.values())
    else:
        items = list(circuits)
        if labels is None:
            labels = [c.label or f"c{i}" if isinstance(c, Circuit) else f"c{i}" for i, c in enumerate(items)]
            if len(set(labels)) < len(labels):
                labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
        labels = list(labels)
    if len(items) < 2:
        raise ValueError(f"circuits: compare needs at least 2 circuits, got {len(items)}")
    if len(labels) != len(items):
        raise ValueError(f"labels: expected {len(items)} labels (one per circuit), got {len(labels)}")
    for i, c in enumerate(items):
        if not isinstance(c, Circuit):
            raise ValueError(f"circuits[{i}] must be a Circuit, got {type(c).__name__}")
    rows = []
    scores = [_all_scores(c) for c in items]
    for i, j in combinations(range(len(items)), 2):
        a, b = items[i], items[j]
        ea, eb = set(a.edges), set(b.edges)
        na, nb = set(a.nodes), set(b.nodes)
        both = set(a.graph.edges) & set(b.graph.edges)
        common = [e for e in a.graph.edges if e in both]
        union = [e for e in common if e in ea or e in eb]
        nan = {"rho": float("nan"), "abs_rho": float("nan")}
        if scores[i] is None or scores[j] is None:
            missing = [labels[k] for k in (i, j) if scores[k] is None]
            note = f"{' and '.join(missing)} carr{'ies' if len(missing) == 1 else 'y'} no scores: no rank correlation"
            whole, kept = {**nan, "note": note}, {**nan, "note": note}
        else:
            whole = _correlations(scores[i], scores[j], common)
            kept = _correlations(scores[i], scores[j], union)
        note = whole["note"] or (f"union of the circuits' edges: {kept['note']}" if kept["note"] else "")
        rows.append({"a": labels[i], "b": labels[j], "method_a": a.method, "method_b": b.method,
                     "n_edges_a": len(ea), "n_edges_b": len(eb), "shared_edges": len(ea & eb),
                     "edge_jaccard": jaccard(ea, eb), "n_nodes_a": len(na), "n_nodes_b": len(nb),
                     "shared_nodes": len(na & nb), "node_jaccard": jaccard(na, nb),
                     "n_scored_edges": len(common), "score_spearman": whole["rho"],
                     "abs_score_spearman": whole["abs_rho"], "n_union_edges": len(union),
                     "union_score_spearman": kept["rho"], "note": note})
    return CircuitComparison(frame=pd.DataFrame(rows), labels=tuple(labels))
