"""``Circuit``: a set of edges of a model's graph, with the scores that chose them.

A circuit is what is left of the model when every other edge carries a reference value
(a corrupted run, a mean or zero, see :mod:`poisonmech.circuits.ablation`). It keeps every
edge's score (not only its own), so circuits of the same graph can be re-thresholded and
compared by rank.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from poisonmech.circuits.ablation import PARTS, Faithfulness, ReferenceTokens, ablated, faithfulness
from poisonmech.circuits.graph import Graph, parse_name, split_edge
from poisonmech.circuits.rewire import ABLATIONS
from poisonmech.circuits.scores import EdgeScores, edge_frame
from poisonmech.circuits.validation import check_choice, check_selection
from poisonmech.storage import read_json, write_json

Tensor = torch.Tensor

FORMAT = "poisonmech.circuit/1"


@dataclass(frozen=True, eq=False)
class Circuit:
    """Edges of ``graph`` forming a circuit.

    Args:
        graph: the model's :class:`Graph`.
        edges: the circuit's edge names (``"a0.h1->a1.h0<q>"``), kept in the graph's edge order.
        scores: ``[n_src n_dst]`` score of every edge of the graph (what chose the circuit).
        method: how the scores were made (``"eap"``, ``"eap-ig"``, ``"acdc"``, ``"random"``, ...).
        per_example: ``[batch n_src n_dst]`` scores per example, where kept.
        selection: how edges were chosen: ``{"top_n": 20, "absolute": True}`` or ``{"threshold": 0.1, ...}``.
        info: anything else worth keeping (steps, mode, metric means), JSON-serialisable.
        label: a name for tables and plots.
    """

    graph: Graph
    edges: tuple[str, ...]
    scores: Float[Tensor, "n_src n_dst"]
    method: str
    per_example: Float[Tensor, "batch n_src n_dst"] | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        if self.scores.shape != (self.graph.n_src, self.graph.n_dst):
            raise ValueError(f"Circuit.scores must be [n_src n_dst]={[self.graph.n_src, self.graph.n_dst]}, "
                             f"got {list(self.scores.shape)}")
        object.__setattr__(self, "edges", self.graph.edges_of(self.graph.mask_of(self.edges)))

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_scores(cls, scores: EdgeScores, *, top_n: int | None = None, threshold: float | None = None,
                    absolute: bool = True, label: str | None = None) -> Circuit:
        """The ``top_n`` highest-scoring edges, or those scoring at least ``threshold``."""
        check_selection(top_n, threshold)
        mask = select_edges(scores.graph, scores.scores, top_n=top_n, threshold=threshold, absolute=absolute)
        info: dict[str, Any] = {"clean_metric": float(scores.clean_metric.mean()),
                                "corrupted_metric": float(scores.corrupted_metric.mean())}
        if scores.steps is not None:
            info["steps"] = scores.steps
        if scores.mode is not None:
            info["mode"] = scores.mode
        selection = {"top_n": top_n} if top_n is not None else {"threshold": float(threshold)}
        selection["absolute"] = absolute
        return cls(graph=scores.graph, edges=scores.graph.edges_of(mask), scores=scores.scores,
                   method=scores.method, per_example=scores.per_example, selection=selection, info=info,
                   label=label)

    # -- views -------------------------------------------------------------------------------------

    @property
    def mask(self) -> Bool[Tensor, "n_src n_dst"]:
        return self.graph.mask_of(self.edges)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Nodes touched by the circuit's edges, in topological order."""
        touched = set()
        for e in self.edges:
            s, d = split_edge(e)
            touched.update((s, parse_name(d).node))
        return tuple(n for n in self.graph.nodes if n in touched)

    def score(self, edge: str) -> float:
        return float(self.scores[self.graph.edge_position(edge)])

    def edge_kinds(self) -> dict[str, int]:
        """How many edges of each kind (``head->head<q>``, ``input->mlp``, ...) the circuit has."""
        return dict(Counter(Graph.edge_kind(e) for e in self.edges))

    def to_frame(self, level: str = "edges") -> pd.DataFrame:
        """Tidy frame.

        ``level="edges"``: one row per edge of the graph with its names, kinds, layers, ``score``,
        ``abs_score``, ``rank`` (1 = highest absolute score) and ``in_circuit``.
        ``level="nodes"``: one row per node with ``kind, layer, head, in_circuit``, the circuit
        edges into and out of it (``n_in, n_out``) and the summed score of its outgoing edges.
        """
        check_choice("level", level, ("edges", "nodes"))
        frame = edge_frame(self.graph)
        values = self.scores[self.graph.edge_mask].detach().cpu().numpy()
        frame["score"] = values
        frame["abs_score"] = np.abs(values)
        frame["rank"] = frame["abs_score"].rank(ascending=False, method="first").astype(int)
        frame["in_circuit"] = frame["edge"].isin(set(self.edges))
        frame.insert(0, "circuit", self.label or self.method)
        if level == "edges":
            return frame
        nodes = set(self.nodes)
        rows = []
        for n in self.graph.nodes:
            info = parse_name(n)
            inside = frame[frame["in_circuit"]]
            rows.append({"circuit": self.label or self.method, "node": n, "kind": info.kind, "layer": info.layer,
                         "head": info.head, "in_circuit": n in nodes,
                         "n_in": int((inside["dst_node"] == n).sum()), "n_out": int((inside["src"] == n).sum()),
                         "out_score": float(frame.loc[frame["src"] == n, "score"].sum())})
        out = pd.DataFrame(rows)
        for c in ("layer", "head"):
            out[c] = out[c].astype("Int64")
        return out

    def plot(self, title: str | None = None, max_edges: int | None = 200):
        """The circuit as a plotly graph: nodes by layer, edges coloured by sign, width by |score|."""
        from poisonmech.circuits.plot import plot_circuit

        return plot_circuit(self, title=title, max_edges=max_edges)

    # -- derived circuits --------------------------------------------------------------------------

    def with_edges(self, edges, *, method: str | None = None, label: str | None = None,
                   selection: dict[str, Any] | None = None) -> Circuit:
        """The same graph and scores with other edges."""
        return replace(self, edges=tuple(edges), method=method or self.method, label=label,
                       selection=selection if selection is not None else dict(self.selection))

    def prune(self) -> Circuit:
        """Drop edges that cannot reach the logits through the circuit (their destination's
        outgoing edges are all outside it): with everything outside ablated they change nothing."""
        keep = set(self.edges)
        while True:
            sources = {split_edge(e)[0] for e in keep}
            drop = {e for e in keep if (d := parse_name(split_edge(e)[1]).node) != "logits" and d not in sources}
            if not drop:
                break
            keep -= drop
        return self.with_edges(keep, label=self.label)

    def random_like(self, seed: int = 0, *, exclude_circuit: bool = True) -> Circuit:
        """A random circuit with as many edges of each kind (``head->head<q>``, ``mlp->logits``, ...).

        Edges are drawn from those outside this circuit where there are enough of a kind,
        otherwise from all of that kind. Same graph and scores; ``method="random"``.
        """
        rng = np.random.default_rng(seed)
        by_kind: dict[str, list[str]] = {}
        for e in self.graph.edges:
            by_kind.setdefault(Graph.edge_kind(e), []).append(e)
        inside = set(self.edges)
        chosen = []
        for kind, n in sorted(self.edge_kinds().items()):
            pool = [e for e in by_kind[kind] if e not in inside] if exclude_circuit else by_kind[kind]
            if len(pool) < n:
                pool = by_kind[kind]
            chosen += [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
        return self.with_edges(chosen, method="random", label=f"random({self.label or self.method}, seed={seed})",
                               selection={"like": self.label or self.method, "seed": seed,
                                          "exclude_circuit": exclude_circuit})

    # -- causal checks -----------------------------------------------------------------------------

    def faithfulness(self, model, clean_tokens: Int[Tensor, "batch pos"],
                     corrupted_tokens: Int[Tensor, "batch pos"] | None, metric: Callable, *,
                     ablation: str = "patching") -> Faithfulness:
        """How much of the clean metric the circuit alone, and its complement alone, recover.

        ``ablation``: what ablated edges carry: ``"patching"`` (the corrupted run), ``"mean"``
        (the mean over the corrupted batch and positions) or ``"zero"``. See
        :class:`~poisonmech.circuits.ablation.Faithfulness`.
        """
        self._check_model(model)
        return faithfulness(model, self.graph, self.mask, clean_tokens, corrupted_tokens, metric, ablation=ablation)

    @contextmanager
    def ablate(self, model, reference_tokens: ReferenceTokens = None, *,
               ablation: str = "patching", part: str = "complement") -> Iterator:
        """Context manager: inside it, ``model`` runs with part of its edges ablated.

        Args:
            reference_tokens: for ``"patching"``, the corrupted ``[batch pos]`` batch (the model's inputs
                must then have its shape) or a function mapping each input batch to its token-aligned
                corrupted batch (e.g. the trigger swapped for a control word: patching inside
                ``pm.evaluate``); for ``"mean"``, a batch or a list of batches to average; unused for ``"zero"``.
            ablation: ``"patching"``, ``"mean"`` or ``"zero"``.
            part: ``"complement"`` ablates every edge outside the circuit (the circuit alone runs);
                ``"circuit"`` ablates the circuit's own edges (the model without the circuit).

        Yields the model. Hooks are removed and the model's mode restored on exit, also on error::

            with circuit.ablate(model, control, ablation="mean", part="circuit"):
                pm.evaluate(model, task, attack)
        """
        check_choice("ablation", ablation, ABLATIONS)
        check_choice("part", part, PARTS)
        self._check_model(model)
        inside = self.mask
        edges = inside if part == "circuit" else self.graph.edge_mask & ~inside
        with ablated(model, self.graph, edges, reference_tokens, ablation=ablation) as m:
            yield m

    def _check_model(self, model) -> None:
        g = Graph.from_model(model)
        if g != self.graph:
            raise ValueError(f"model's graph {g!r} does not match the circuit's {self.graph!r}")

    # -- persistence -------------------------------------------------------------------------------

    def to_dict(self, per_example: bool = False) -> dict[str, Any]:
        d = {"format": FORMAT, "graph": self.graph.to_dict(), "edges": list(self.edges), "method": self.method,
             "selection": self.selection, "info": self.info, "label": self.label,
             "scores": self.scores.detach().cpu().double().tolist()}
        if per_example and self.per_example is not None:
            d["per_example"] = self.per_example.detach().cpu().double().tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Circuit:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a poisonmech circuit (format {d.get('format')!r}, expected {FORMAT!r})")
        per = d.get("per_example")
        return cls(graph=Graph.from_dict(d["graph"]), edges=tuple(d["edges"]),
                   scores=torch.tensor(d["scores"], dtype=torch.float32), method=d["method"],
                   per_example=torch.tensor(per, dtype=torch.float32) if per is not None else None,
                   selection=dict(d.get("selection") or {}), info=dict(d.get("info") or {}), label=d.get("label"))

    def to_json(self, per_example: bool = False) -> str:
        """JSON text (every edge's score; per-example scores only if asked: they can be large)."""
        return json.dumps(self.to_dict(per_example=per_example))

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Circuit.from_json: not JSON ({exc})") from exc
        return cls.from_dict(d)

    def save(self, path: str | Path, per_example: bool = False) -> None:
        """Atomic JSON write."""
        write_json(Path(path), self.to_dict(per_example=per_example))

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        return cls.from_dict(read_json(Path(path)))

    # -- comparison --------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return (self.graph == other.graph and self.edges == other.edges and self.method == other.method
                and torch.equal(self.scores, other.scores) and self.selection == other.selection
                and self.label == other.label)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Circuit({self.label or self.method!r}: {self.n_edges}/{self.graph.n_edges} edges, "
                f"{len(self.nodes)} nodes, {self.selection})")


def select_edges(graph: Graph, scores: Float[Tensor, "n_src n_dst"], *, top_n: int | None = None,
                 threshold: float | None = None, absolute: bool = True) -> Bool[Tensor, "n_src n_dst"]:
    """Mask of the ``top_n`` best edges (ties broken by graph order) or of those scoring ``>= threshold``."""
    check_selection(top_n, threshold)
    values = scores[graph.edge_mask].detach().cpu().double()
    key = values.abs() if absolute else values
    keep = torch.zeros_like(values, dtype=torch.bool)
    if top_n is not None:
        order = np.argsort(-key.numpy(), kind="stable")[:top_n]
        keep[torch.as_tensor(order)] = True
    else:
        keep = key >= threshold
    mask = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    mask[graph.edge_mask] = keep
    return mask
