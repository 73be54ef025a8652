"""``compare``: how much circuits agree (across twins, seeds, poison rates, methods...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from poisonmech.circuits.circuit import Circuit


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|``; 1.0 for two empty sets."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(x) < 2:
        return float("nan")
    rx = pd.Series(x).rank().to_numpy()
    ry = pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _all_scores(c: Circuit) -> dict[str, float]:
    values = c.scores[c.graph.edge_mask].detach().cpu().numpy()
    return dict(zip(c.graph.edges, values.tolist()))


def compare(circuits: Sequence[Circuit] | Mapping[str, Circuit], labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Pairwise agreement of circuits, one row per pair ``(a, b)``:

    ``n_edges_a, n_edges_b, shared_edges, edge_jaccard`` and the same for nodes
    (``node_jaccard``), ``score_spearman``: the Spearman rank correlation of the two circuits'
    scores over the edges both graphs have (``n_scored_edges``), and ``abs_score_spearman``
    on absolute scores. Circuits are matched by edge and node names, so circuits of models of
    different sizes compare on what they share.

    ``circuits``: a list (labelled by ``labels``, else each circuit's ``label``, else ``c{i}``) or a
    ``{label: circuit}`` mapping.
    """
    if isinstance(circuits, Mapping):
        labels, items = list(circuits), list(circuits.values())
    else:
        items = list(circuits)
        if labels is None:
            labels = [c.label or f"c{i}" for i, c in enumerate(items)] if items else []
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
        common = [e for e in scores[i] if e in scores[j]]
        x = np.array([scores[i][e] for e in common])
        y = np.array([scores[j][e] for e in common])
        rows.append({"a": labels[i], "b": labels[j], "method_a": a.method, "method_b": b.method,
                     "n_edges_a": len(ea), "n_edges_b": len(eb), "shared_edges": len(ea & eb),
                     "edge_jaccard": jaccard(ea, eb), "n_nodes_a": len(na), "n_nodes_b": len(nb),
                     "shared_nodes": len(na & nb), "node_jaccard": jaccard(na, nb),
                     "n_scored_edges": len(common), "score_spearman": spearman(x, y),
                     "abs_score_spearman": spearman(np.abs(x), np.abs(y))})
    return pd.DataFrame(rows)
