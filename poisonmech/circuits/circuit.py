"""``Circuit``: a set of edges of a model's graph, with the scores that chose them.

A circuit is what is left of the model when every other edge carries a reference value
(a corrupted run, a mean or zero, see :mod:`poisonmech.circuits.ablation`). It keeps every
edge's score (not only its own), so circuits of the same graph can be re-thresholded and
compared by rank. A circuit built from edge names alone (:meth:`Circuit.from_edges`) carries no
scores (``scores=None``).
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

from poisonmech.circuits.ablation import (
    Faithfulness,
    FaithfulnessTable,
    ReferenceTokens,
    ablated,
    faithfulness,
    faithfulness_table,
)
from poisonmech.circuits.graph import Graph, parse_name, split_edge
from poisonmech.circuits.scores import EdgeScores, edge_frame
from poisonmech.circuits.validation import check_selection
from poisonmech.config import check_choice
from poisonmech.results import Result, check_format, format_tag

Tensor = torch.Tensor

FORMAT = format_tag("circuit", 1)  # "poisonmech.circuit/1", the tag of every circuit file so far


@dataclass(frozen=True, eq=False)
class Circuit(Result):
    """Edges of ``graph`` forming a circuit (saved as ``"poisonmech.circuit/1"`` JSON).

    Args:
        graph: the model's :class:`Graph`.
        edges: the circuit's edge names (``"a0.h1->a1.h0<q>"``), kept in the graph's edge order.
        scores: ``[n_src n_dst]`` score of every edge of the graph (what chose the circuit), or ``None``
            for a circuit given by its edges alone.
        method: how the scores were made (``"eap"``, ``"eap-ig"``, ``"acdc"``, ``"random"``, ...).
        per_example: ``[batch n_src n_dst]`` scores per example, where kept.
        selection: how edges were chosen: ``{"top_n": 20, "absolute": True}`` or ``{"threshold": 0.1, ...}``.
        info: anything else worth keeping (steps, mode, metric means, ``"faithfulness"`` once
            recorded with :meth:`with_faithfulness`), JSON-serialisable.
        label: a name for tables and plots.
    """

    kind = "circuit"
    version = 1

    graph: Graph
    edges: tuple[str, ...]
    scores: Float[Tensor, "n_src n_dst"] | None
    method: str
    per_example: Float[Tensor, "batch n_src n_dst"] | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        if self.scores is not None and self.scores.shape != (self.graph.n_src, self.graph.n_dst):
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

    @classmethod
    def from_edges(cls, graph: Graph, edges, *, method: str = "manual", label: str | None = None) -> Circuit:
        """A circuit given by its edge names (e.g. one from a paper), without scores."""
        return cls(graph=graph, edges=tuple(edges), scores=None, method=method, label=label)

    # -- views -------------------------------------------------------------------------------------

    @property
    def mask(self) -> Bool[Tensor, "n_src n_dst"]:
        return self.graph.mask_of(self.edges)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Nodes touched by the circuit's edges, in topological order (an edge into a key/value
        group's input touches every head of the group)."""
        touched = set()
        for e in self.edges:
            s, d = split_edge(e)
            touched.add(s)
            touched.update(self.graph.dst_nodes(d))
        return tuple(n for n in self.graph.nodes if n in touched)

    @property
    def has_scores(self) -> bool:
        return self.scores is not None

    def score(self, edge: str) -> float:
        """One edge's score; ``ValueError`` for a circuit without scores."""
        position = self.graph.edge_position(edge)
        if self.scores is None:
            raise ValueError(f"circuit {self.name!r} carries no scores (built from its edges)")
        return float(self.scores[position])

    @property
    def name(self) -> str:
        """The label, else the method."""
        return self.label or self.method

    @property
    def faithfulness_info(self) -> dict[str, Any] | None:
        """``{"ablation", "circuit", "complement"}`` recorded by :meth:`with_faithfulness`, if any."""
        f = self.info.get("faithfulness")
        return dict(f) if isinstance(f, dict) else None

    def edge_kinds(self) -> dict[str, int]:
        """How many edges of each kind (``head->head<q>``, ``input->mlp``, ...) the circuit has."""
        return dict(Counter(Graph.edge_kind(e) for e in self.edges))

    def to_frame(self, level: str = "edges") -> pd.DataFrame:
        """Tidy frame.

        ``level="edges"``: one row per edge of the graph with its names, kinds, layers, ``score``,
        ``abs_score``, ``rank`` (1 = highest absolute score) and ``in_circuit`` (scores NaN and rank
        missing for a circuit without scores).
        ``level="nodes"``: one row per node with ``kind, layer, head, in_circuit``, the circuit
        edges into and out of it (``n_in, n_out``) and the summed score of its outgoing edges.
        """
        check_choice("Circuit.to_frame", "level", level, ("edges", "nodes"))
        frame = edge_frame(self.graph)
        values = self.edge_values()
        frame["score"] = values
        frame["abs_score"] = np.abs(values)
        frame["rank"] = frame["abs_score"].rank(ascending=False, method="first").astype("Int64")
        frame["in_circuit"] = frame["edge"].isin(set(self.edges))
        frame.insert(0, "circuit", self.name)
        if level == "edges":
            return frame
        nodes = set(self.nodes)
        inside = frame[frame["in_circuit"]]
        n_in = Counter(n for d in inside["dst"] for n in self.graph.dst_nodes(d))  # a group's edge: each of its heads
        rows = []
        for n in self.graph.nodes:
            info = parse_name(n)
            rows.append({"circuit": self.name, "node": n, "kind": info.kind, "layer": info.layer,
                         "head": info.head, "in_circuit": n in nodes,
                         "n_in": n_in.get(n, 0), "n_out": int((inside["src"] == n).sum()),
                         "out_score": float(frame.loc[frame["src"] == n, "score"].sum(min_count=1))})
        out = pd.DataFrame(rows)
        for c in ("layer", "head"):
            out[c] = out[c].astype("Int64")
        return out

    def edge_values(self) -> np.ndarray:
        """Every edge's score in ``graph.edges`` order (NaN for a circuit without scores)."""
        if self.scores is None:
            return np.full(self.graph.n_edges, np.nan)
        return self.scores[self.graph.edge_mask].detach().cpu().double().numpy()

    def plot(self, title: str | None = None, max_edges: int | None = 200, *,
             faithfulness: Faithfulness | None = None):
        """The circuit as a plotly graph: nodes by layer, edges coloured by sign, width by |score|.

        The default title names the circuit, its edge count and its faithfulness (``faithfulness``,
        else the one recorded by :meth:`with_faithfulness`, if any), see
        :func:`~poisonmech.circuits.plot.circuit_title`.
        """
        from poisonmech.circuits.plot import plot_circuit

        return plot_circuit(self, title=title, max_edges=max_edges, faithfulness=faithfulness)

    # -- derived circuits --------------------------------------------------------------------------

    def with_edges(self, edges, *, method: str | None = None, label: str | None = None,
                   selection: dict[str, Any] | None = None) -> Circuit:
        """The same graph and scores with other edges."""
        info = {k: v for k, v in self.info.items() if k != "faithfulness"}  # it was measured on other edges
        return replace(self, edges=tuple(edges), method=method or self.method, label=label, info=info,
                       selection=selection if selection is not None else dict(self.selection))

    def with_faithfulness(self, result: Faithfulness) -> Circuit:
        """The same circuit with ``result`` recorded in ``info["faithfulness"]`` (saved with it, shown in
        its repr and plot title)."""
        if not isinstance(result, Faithfulness):
            raise ValueError(f"result must be a Faithfulness (from circuit.faithfulness(...)), "
                             f"got {type(result).__name__}")
        if result.n_edges != self.n_edges or result.n_graph_edges != self.graph.n_edges:
            raise ValueError(f"result: measured on {result.n_edges}/{result.n_graph_edges} edges, this circuit has "
                             f"{self.n_edges}/{self.graph.n_edges}")
        record = {"ablation": result.ablation, "circuit": result.circuit_faithfulness,
                  "complement": result.complement_faithfulness, "n_examples": int(result.full.shape[0])}
        return replace(self, info={**self.info, "faithfulness": record})

    def prune(self) -> Circuit:
        """Drop edges that cannot reach the logits through the circuit (their destination's
        outgoing edges are all outside it; for a key/value group's input, those of every head of
        the group): with everything outside ablated they change nothing."""
        keep = set(self.edges)
        while True:
            sources = {split_edge(e)[0] for e in keep}
            drop = {e for e in keep if "logits" not in (nodes := self.graph.dst_nodes(split_edge(e)[1]))
                    and not sources.intersection(nodes)}
            if not drop:
                break
            keep -= drop
        return self.with_edges(keep, label=self.label)

    def random_like(self, seed: int = 0, *, exclude_circuit: bool = True) -> Circuit:
        """A random circuit with as many edges of each kind (``head->head<q>``, ``mlp->logits``, ...).

        Edges are drawn from those outside this circuit where there are enough of a kind,
        otherwise from all of that kind. Same graph; ``method="random"``. Its scores are its own:
        this circuit's scores randomly permuted over the graph's edges (seeded by ``seed``; ``None``
        if this circuit has none), so rank correlations against it measure chance, not a copy.
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
        scores = None
        if self.scores is not None:
            values = self.scores[self.graph.edge_mask]
            scores = torch.zeros_like(self.scores)
            scores[self.graph.edge_mask] = values[torch.as_tensor(rng.permutation(len(values)))]
        info = {k: v for k, v in self.info.items() if k != "faithfulness"}
        info["scores"] = "random permutation of the original circuit's scores" if scores is not None else "none"
        return replace(self, edges=tuple(chosen), scores=scores, method="random", per_example=None,
                       label=f"random({self.name}, seed={seed})", info=info,
                       selection={"like": self.name, "seed": seed, "exclude_circuit": exclude_circuit})

    # -- causal checks -----------------------------------------------------------------------------

    def faithfulness(self, subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
                     corrupted_tokens: Int[Tensor, "batch pos"] | None = None, metric: Callable | None = None,
                     **options: Any) -> Faithfulness:
        """How much of the clean metric the circuit alone, and its complement alone, recover:
        :func:`~poisonmech.circuits.faithfulness` of this circuit (``subject`` first, any kind).

        Options (``FaithfulnessConfig``): ``ablation``: what ablated edges carry: ``"patching"``
        (the corrupted run), ``"mean"`` (the mean over the corrupted batch and positions) or
        ``"zero"``; ``twin``; ``n_contrast``; or ``config=``. See
        :class:`~poisonmech.circuits.ablation.Faithfulness`.
        """
        return faithfulness(subject, clean_tokens, corrupted_tokens, metric, circuit=self, **options)

    def faithfulness_table(self, subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
                           corrupted_tokens: Int[Tensor, "batch pos"] | None = None,
                           metrics: dict[str, Callable] | None = None, **options: Any) -> FaithfulnessTable:
        """:meth:`faithfulness` for every ablation and every metric, side by side::

            t = circuit.faithfulness_table(pair, tc.triggered, tc.control,
                                           {"logit_diff": tc.logit_diff(), "target_logprob": tc.target_logprob()})
            t.to_frame()   # one row per (ablation, metric): circuit / complement faithfulness, denominators, n

        Each cell equals ``faithfulness(subject, clean, corrupted, metric, ablation=...)``. Options:
        ``ablations``, ``twin``, ``n_contrast``, ``label`` (default: the circuit's name), ``config=``.
        """
        return faithfulness_table(subject, clean_tokens, corrupted_tokens, metrics, circuit=self, **options)

    @contextmanager
    def ablate(self, subject, reference_tokens: ReferenceTokens = None, *,
               ablation: str = "patching", part: str = "complement", twin: str | None = None) -> Iterator:
        """Context manager: inside it, the subject's model runs with part of its edges ablated.

        Args:
            subject: any subject (:func:`poisonmech.resolve`); ``twin`` picks the model.
            reference_tokens: for ``"patching"``, the corrupted ``[batch pos]`` batch (the model's inputs
                must then have its shape) or a function mapping each input batch to its token-aligned
                corrupted batch (e.g. the trigger swapped for a control word: patching inside
                ``pm.evaluate``; a run's default); for ``"mean"``, a batch or a list of batches to average;
                unused for ``"zero"``.
            ablation: ``"patching"``, ``"mean"`` or ``"zero"``.
            part: ``"complement"`` ablates every edge outside the circuit (the circuit alone runs);
                ``"circuit"`` ablates the circuit's own edges (the model without the circuit).

        Yields the model. Hooks are removed and the model's mode restored on exit, also on error::

            with circuit.ablate(pair, control, ablation="mean", part="circuit"):
                pm.evaluate(pair)
        """
        with ablated(subject, reference_tokens, circuit=self, ablation=ablation, part=part, twin=twin) as m:
            yield m

    # -- persistence -------------------------------------------------------------------------------

    def to_dict(self, per_example: bool = False) -> dict[str, Any]:
        d = {"format": FORMAT, "graph": self.graph.to_dict(), "edges": list(self.edges), "method": self.method,
             "selection": self.selection, "info": self.info, "label": self.label,
             "scores": self.scores.detach().cpu().double().tolist() if self.scores is not None else None}
        if per_example and self.per_example is not None:
            d["per_example"] = self.per_example.detach().cpu().double().tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Circuit:
        """The circuit of :meth:`to_dict` (its format checked: another kind or a newer version is an error)."""
        check_format(d, cls.kind, cls.version, "Circuit.from_dict", cls.__name__)
        per, scores = d.get("per_example"), d.get("scores")
        return cls(graph=Graph.from_dict(d["graph"]), edges=tuple(d["edges"]),
                   scores=torch.tensor(scores, dtype=torch.float32) if scores is not None else None, method=d["method"],
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

    def save(self, path: str | Path, per_example: bool = False) -> Path:
        """Atomic JSON write (the file :meth:`to_json` describes)."""
        d = self.to_dict(per_example=per_example)
        d.pop("format")  # the result writer puts the tag first
        return self._write(path, d)

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        meta, _ = cls._read(path)
        return cls.from_dict(meta)

    # -- comparison --------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Circuit):
            return NotImplemented
        return (self.graph == other.graph and self.edges == other.edges and self.method == other.method
                and _same_scores(self.scores, other.scores) and self.selection == other.selection
                and self.label == other.label)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sel = ", ".join(f"{k}={v}" for k, v in self.selection.items())
        f = self.faithfulness_info
        faith = f", faithfulness {f['circuit']:.3f} ({f['ablation']})" if f else ""
        scored = "" if self.scores is not None else ", no scores"
        return (f"Circuit({self.name!r}, {self.method}: {self.n_edges}/{self.graph.n_edges} edges, "
                f"{len(self.nodes)} nodes{faith}{scored}{'; ' + sel if sel else ''})")


def _same_scores(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


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
