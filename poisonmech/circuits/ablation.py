"""Ablating edges: a context manager, and the faithfulness of a circuit.

An ablated edge ``src->dst`` carries a reference value of ``src``'s output instead of its own:

- ``"patching"``: the output on a corrupted batch (token-aligned with the inputs, so the
  model's inputs must then have that batch's shape);
- ``"mean"``: the mean output over a reference batch and all its positions (one vector per
  source, so it applies to inputs of any shape, e.g. inside :func:`poisonmech.evaluate`);
- ``"zero"``: nothing at all.

Faithfulness (Hanna et al. 2024) runs the clean batch with everything but the circuit
ablated and compares the metric with the full model (nothing ablated) and the empty circuit
(everything ablated): ``(m(circuit) - m(empty)) / (m(full) - m(empty))``, 1 for a circuit that
does all the work, 0 for one that does none. The complement (the circuit's own edges
ablated, everything else kept) is reported the same way.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from poisonmech.circuits.config import FaithfulnessConfig, contrast_data
from poisonmech.circuits.graph import Graph
from poisonmech.circuits.rewire import ABLATIONS, reference_activations, rewired
from poisonmech.circuits.validation import apply_metric, check_metric
from poisonmech.config import check_choice, takes_config
from poisonmech.results import Result
from poisonmech.runtime import check_tokens
from poisonmech.subject import resolve

Tensor = torch.Tensor

PARTS = ("complement", "circuit")
RUNS = ("full", "empty", "circuit", "complement")

ReferenceTokens = Union[Tensor, Sequence[Tensor], Callable[[Tensor], Tensor], None]
#: what ``circuit=`` takes: a :class:`~poisonmech.circuits.circuit.Circuit`, or a ``(graph, edges)``
#: pair whose edges are a ``[n_src n_dst]`` mask or edge names
CircuitLike = Any


def _circuit_parts(circuit: CircuitLike, model, where: str) -> tuple[Graph, Bool[Tensor, "n_src n_dst"], str | None]:
    """``(graph, circuit mask, label)`` of ``circuit=``, its graph checked against ``model``'s."""
    from poisonmech.circuits.circuit import Circuit  # circuit.py imports this module

    if isinstance(circuit, Circuit):
        graph, mask, label = circuit.graph, circuit.mask, circuit.name
    elif isinstance(circuit, tuple) and len(circuit) == 2 and isinstance(circuit[0], Graph):
        graph, edges = circuit
        if isinstance(edges, Tensor):
            if edges.shape != (graph.n_src, graph.n_dst):
                raise ValueError(f"{where}: circuit=(graph, edges): an edge mask must be [n_src n_dst]="
                                 f"{[graph.n_src, graph.n_dst]}, got {list(edges.shape)}")
            mask = edges.bool().cpu() & graph.edge_mask
        else:
            mask = graph.mask_of(edges)
        label = None
    elif circuit is None:
        raise ValueError(f"{where} needs circuit=: a Circuit (from discover) or a (graph, edges) pair")
    else:
        raise ValueError(f"{where}: circuit= must be a Circuit or a (Graph, edges) pair, got {type(circuit).__name__}")
    g = Graph.from_model(model)
    if g != graph:
        raise ValueError(f"{where}: the model's graph {g!r} does not match the circuit's {graph!r}")
    return graph, mask, label


def _old_graph_form(where: str, old_names: tuple[str, ...], new_form: str, **fixed: Any) -> Callable:
    """Keep ``fn(model, graph, edges, *data)`` (the order before issue 12) working, with a
    ``DeprecationWarning``: a :class:`Graph` second (or ``graph=``) marks the old form, whose
    ``(graph, edges)`` become ``circuit=`` (and ``fixed`` options, e.g. what is ablated)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(subject, *args, **kwargs):
            if not ((args and isinstance(args[0], Graph)) or "graph" in kwargs):
                return fn(subject, *args, **kwargs)
            if len(args) > len(old_names):
                raise TypeError(f"{where}: at most {len(old_names) + 1} positional arguments in the old form, "
                                f"got {len(args) + 1}")
            old = dict(zip(old_names, args))
            for name in old_names:
                if name in kwargs:
                    if name in old:
                        raise TypeError(f"{where}: got {name!r} twice")
                    old[name] = kwargs.pop(name)
            warnings.warn(f"{where}(model, {', '.join(old_names)}) is deprecated: call {new_form}",
                          DeprecationWarning, stacklevel=2)
            circuit = (old.pop(old_names[0]), old.pop(old_names[1], None))
            return fn(subject, *(old.get(n) for n in old_names[2:]), circuit=circuit, **fixed, **kwargs)
        return wrapper
    return deco


@_old_graph_form("ablated", ("graph", "edges", "reference_tokens"),
                 "ablated(subject, reference_tokens, circuit=(graph, edges), part='circuit', ablation=...)",
                 part="circuit")
@contextmanager
def ablated(subject, reference_tokens: ReferenceTokens = None, *, circuit: CircuitLike = None,
            ablation: str = "patching", part: str = "complement", twin: str | None = None) -> Iterator:
    """Inside the block, the subject's model runs with part of its edges ablated.

    Args:
        subject: any subject (:func:`poisonmech.resolve`); ``twin`` picks the model.
        reference_tokens: what the ablated edges' reference activations come from:

            - ``"patching"``: a ``[batch pos]`` corrupted batch (the model's inputs must then have
              its shape), or a function mapping each input batch to its token-aligned corrupted
              batch (e.g. the trigger replaced by a control word), run just before each forward:
              this is how patching works inside :func:`poisonmech.evaluate`, whose batches are not
              known in advance. With a run and no reference: the run's
              :func:`~poisonmech.patching.control_fn` (the trigger swapped for neutral words);
            - ``"mean"``: a ``[batch pos]`` batch or a list of batches (any lengths) to average;
            - ``"zero"``: not needed.
        circuit: a :class:`~poisonmech.circuits.circuit.Circuit`, or a ``(graph, edges)`` pair
            (an edge mask or edge names).
        ablation: ``"patching"``, ``"mean"`` or ``"zero"``.
        part: ``"complement"`` ablates every edge outside the circuit (the circuit alone runs);
            ``"circuit"`` ablates the circuit's own edges (the model without the circuit).

    Yields the model. Hooks are removed and the model's train/eval mode is restored on exit,
    also when the block raises. (The old form ``ablated(model, graph, edges, reference_tokens)``,
    which ablates ``edges``, still works with a ``DeprecationWarning``.)
    """
    check_choice("ablated", "ablation", ablation, ABLATIONS)
    check_choice("ablated", "part", part, PARTS)
    s = resolve(subject, where="ablated")
    model = s.model(twin)
    graph, inside, _ = _circuit_parts(circuit, model, "ablated")
    edges = inside if part == "circuit" else graph.edge_mask & ~inside
    if reference_tokens is None and ablation == "patching" and s.is_run:
        from poisonmech.patching import control_fn  # lazily: patching is a sibling package

        reference_tokens = control_fn(s)
    if callable(reference_tokens) and not isinstance(reference_tokens, Tensor):
        if ablation != "patching":
            raise ValueError(f"reference_tokens: a function of the input tokens works with ablation='patching' "
                             f"only, got ablation={ablation!r}")
        with rewired(model, graph, ablate=edges, reference_fn=reference_tokens):
            yield model
        return
    if isinstance(reference_tokens, (list, tuple)):
        reference_tokens = [check_tokens(model, t, names=(f"reference_tokens[{i}]",))[0]
                            for i, t in enumerate(reference_tokens)]
    elif reference_tokens is not None:
        (reference_tokens,) = check_tokens(model, reference_tokens, names=("reference_tokens",))
    ref = reference_activations(model, graph, reference_tokens, ablation)
    with rewired(model, graph, ablate=edges, reference=ref):
        yield model


@dataclass(frozen=True, eq=False)
class Faithfulness(Result):
    """How much of the clean behaviour a circuit, and its complement, carry.

    Per example, the metric of the clean batch with: nothing ablated (``full``), everything
    ablated (``empty``), everything outside the circuit ablated (``circuit``) and the circuit's
    edges ablated (``complement``). Saved as ``"poisonmech.faithfulness/1"`` safetensors.
    """

    kind = "faithfulness"
    version = 1

    ablation: str  #: how the ablated edges are replaced ("patching", "mean", "zero")
    full: Float[Tensor, " batch"]  #: the metric with nothing ablated
    empty: Float[Tensor, " batch"]  #: every edge ablated
    circuit: Float[Tensor, " batch"]  #: every edge outside the circuit ablated
    complement: Float[Tensor, " batch"]  #: the circuit's own edges ablated
    n_edges: int
    n_graph_edges: int

    def _normalized(self, values: Tensor) -> float:
        den = float(self.full.mean() - self.empty.mean())
        if abs(den) < 1e-12:
            return float("nan")
        return float(values.mean() - self.empty.mean()) / den

    @property
    def circuit_faithfulness(self) -> float:
        """``(m(circuit) - m(empty)) / (m(full) - m(empty))`` on batch means."""
        return self._normalized(self.circuit)

    @property
    def complement_faithfulness(self) -> float:
        """``(m(complement) - m(empty)) / (m(full) - m(empty))`` on batch means."""
        return self._normalized(self.complement)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per run (full, empty, circuit, complement) with mean, sem and normalized metric."""
        rows = []
        for part in RUNS:
            v = getattr(self, part)
            n = v.shape[0]
            rows.append({"ablation": self.ablation, "run": part, "mean": float(v.mean()),
                         "sem": float(v.std() / np.sqrt(n)) if n > 1 else 0.0,
                         "normalized": self._normalized(v),
                         "n_edges": {"full": self.n_graph_edges, "empty": 0, "circuit": self.n_edges,
                                     "complement": self.n_graph_edges - self.n_edges}[part]})
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """Bar chart of the normalized metric of the four runs."""
        import plotly.express as px

        frame = self.to_frame()
        fig = px.bar(frame, x="run", y="normalized", text="n_edges",
                     title=title or f"faithfulness ({self.ablation} ablation)")
        fig.update_layout(template="plotly_white", yaxis_title="normalized metric (1 = full model)")
        return fig

    def save(self, path: str | Path) -> Path:
        """Atomic safetensors write: the four runs' per-example metric; the counts as metadata."""
        return self._write(path, {"ablation": self.ablation, "n_edges": self.n_edges,
                                  "n_graph_edges": self.n_graph_edges},
                           {part: getattr(self, part) for part in RUNS})

    @classmethod
    def load(cls, path: str | Path) -> Faithfulness:
        meta, t = cls._read(path)
        return cls(ablation=meta["ablation"], n_edges=int(meta["n_edges"]), n_graph_edges=int(meta["n_graph_edges"]),
                   **{part: t[part] for part in RUNS})

    def __repr__(self) -> str:
        return (f"Faithfulness(ablation={self.ablation!r}, circuit={self.circuit_faithfulness:.3f}, "
                f"complement={self.complement_faithfulness:.3f}, edges={self.n_edges}/{self.n_graph_edges}, "
                f"n={self.full.shape[0]})")


def _check_metrics(metrics) -> dict[str, Callable]:
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("metrics must be a non-empty mapping {name: metric}, e.g. "
                         "{'logit_diff': tc.logit_diff(), 'target_logprob': tc.target_logprob()}, "
                         f"got {metrics if isinstance(metrics, Mapping) else type(metrics).__name__!r}")
    for name, m in metrics.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metrics: names must be non-empty strings, got {name!r}")
        if not callable(m):
            raise ValueError(f"metrics[{name!r}] must be a callable mapping logits [batch pos d_vocab] to [batch], "
                             f"got {type(m).__name__}")
    return dict(metrics)


def _part_metrics(model, graph: Graph, inside: Tensor, clean_tokens: Tensor, ref: Tensor,
                  metrics: dict[str, Callable]) -> dict[str, dict[str, Tensor]]:
    """``{part: {metric name: [batch]}}`` for the four runs of the clean batch; every metric
    reads the same forward, so more metrics cost no more forwards."""
    masks = {"full": None, "empty": graph.edge_mask, "circuit": graph.edge_mask & ~inside, "complement": inside}
    out: dict[str, dict[str, Tensor]] = {}
    for part, mask in masks.items():
        with rewired(model, graph, ablate=mask, reference=ref):
            logits = model(clean_tokens)
        out[part] = {name: apply_metric(m, logits).float().cpu() for name, m in metrics.items()}
    return out


def _prepare(subject, clean_tokens, corrupted_tokens, metric, circuit, config: FaithfulnessConfig, where: str,
             metrics: bool):
    """The model, tokens (checked, on its device), metric(s) and circuit of a faithfulness call."""
    s = resolve(subject, where=where)
    model = s.model(config.twin)
    graph, inside, label = _circuit_parts(circuit, model, where)
    clean_tokens, corrupted_tokens, metric = contrast_data(s, model, clean_tokens, corrupted_tokens, metric,
                                                           n=config.n_contrast, where=where, metrics=metrics)
    clean_tokens, corrupted_tokens = check_tokens(model, clean_tokens, corrupted_tokens)
    return model, graph, inside, label, clean_tokens, corrupted_tokens, metric


@_old_graph_form("faithfulness", ("graph", "circuit_edges", "clean_tokens", "corrupted_tokens", "metric"),
                 "faithfulness(subject, clean_tokens, corrupted_tokens, metric, circuit=(graph, edges))")
@takes_config(FaithfulnessConfig)
@torch.no_grad()
def faithfulness(subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
                 corrupted_tokens: Int[Tensor, "batch pos"] | None = None, metric: Callable | None = None, *,
                 circuit: CircuitLike = None, config: FaithfulnessConfig) -> Faithfulness:
    """Faithfulness of ``circuit`` on the clean batch; see the module docstring.

    Args:
        subject: any subject (:func:`poisonmech.resolve`); ``twin`` picks the model.
        clean_tokens, corrupted_tokens, metric: the clean batch, the reference batch of
            ``"patching"`` and ``"mean"`` ablation (``None`` allows ``"zero"`` only) and the metric.
            With a run and no tokens: its trigger contrast and logit difference.
        circuit: a :class:`~poisonmech.circuits.circuit.Circuit`, or a ``(graph, edges)`` pair.

    Options (:class:`~poisonmech.circuits.config.FaithfulnessConfig`): ``ablation``, ``twin``,
    ``n_contrast``. The old form ``faithfulness(model, graph, circuit_edges, clean_tokens,
    corrupted_tokens, metric)`` still works, with a ``DeprecationWarning``.
    """
    model, graph, inside, _, clean_tokens, corrupted_tokens, metric = _prepare(
        subject, clean_tokens, corrupted_tokens, metric, circuit, config, "faithfulness", metrics=False)
    check_metric(metric)
    ref = reference_activations(model, graph, corrupted_tokens, config.ablation)
    runs = _part_metrics(model, graph, inside, clean_tokens, ref, {"metric": metric})
    return Faithfulness(ablation=config.ablation, n_edges=int(inside.sum()), n_graph_edges=graph.n_edges,
                        **{part: v["metric"] for part, v in runs.items()})


REFERENCES = {"patching": "the corrupted run (token-aligned)", "mean": "the mean over the corrupted batch and positions",
              "zero": "zero"}


@dataclass(frozen=True, eq=False)
class FaithfulnessTable(Result):
    """Faithfulness of one circuit under several ablations and metrics, side by side.

    ``results[(ablation, metric)]`` is the :class:`Faithfulness` of that cell; ``corrupted[metric]``
    the metric of the corrupted batch with nothing ablated (``None`` without corrupted tokens).
    Circuit metrics are fragile to these choices (Miller et al. 2024): read them together.
    Saved as ``"poisonmech.faithfulness_table/1"`` safetensors.
    """

    kind = "faithfulness_table"
    version = 1

    results: dict[tuple[str, str], Faithfulness]
    corrupted: dict[str, Tensor | None]
    label: str | None = None

    @property
    def ablations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a for a, _ in self.results))

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for _, m in self.results))

    def __getitem__(self, key: tuple[str, str]) -> Faithfulness:
        if key not in self.results:
            raise KeyError(f"{key!r}: cells are (ablation, metric) with ablation in {self.ablations} and metric "
                           f"in {self.metrics}")
        return self.results[key]

    def to_frame(self) -> pd.DataFrame:
        """One row per (ablation, metric): ``circuit_faithfulness``, ``complement_faithfulness`` and what
        they are made of: the clean batch's metric with nothing ablated (``clean_metric``), with
        everything ablated (``empty_metric``, the baseline; the corrupted run under patching), with the
        circuit alone and with its complement alone (``circuit_metric``, ``complement_metric``), the
        denominator ``clean_metric - empty_metric``, the unablated corrupted batch's metric
        (``corrupted_metric``), ``n_examples``, ``n_edges`` / ``n_graph_edges`` and what ablated edges
        carried (``reference``)."""
        rows = []
        for (ablation, name), f in self.results.items():
            corrupted = self.corrupted.get(name)
            rows.append({"circuit": self.label, "ablation": ablation, "metric": name,
                         "circuit_faithfulness": f.circuit_faithfulness,
                         "complement_faithfulness": f.complement_faithfulness,
                         "clean_metric": float(f.full.mean()), "empty_metric": float(f.empty.mean()),
                         "denominator": float(f.full.mean() - f.empty.mean()),
                         "circuit_metric": float(f.circuit.mean()), "complement_metric": float(f.complement.mean()),
                         "corrupted_metric": float(corrupted.mean()) if corrupted is not None else float("nan"),
                         "n_examples": int(f.full.shape[0]), "n_edges": f.n_edges, "n_graph_edges": f.n_graph_edges,
                         "reference": REFERENCES[ablation]})
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """Grouped bars: circuit and complement faithfulness per ablation, one panel per metric."""
        import plotly.express as px

        frame = self.to_frame().melt(id_vars=["ablation", "metric"],
                                     value_vars=["circuit_faithfulness", "complement_faithfulness"],
                                     var_name="part", value_name="faithfulness")
        frame["part"] = frame["part"].str.replace("_faithfulness", "", regex=False)
        name = f"{self.label}: " if self.label else ""
        fig = px.bar(frame, x="ablation", y="faithfulness", color="part", barmode="group", facet_col="metric",
                     title=title or f"{name}faithfulness by ablation and metric (1 = full model, 0 = all ablated)")
        fig.update_layout(template="plotly_white")
        return fig

    def save(self, path: str | Path) -> Path:
        """Atomic safetensors write: every cell's four runs (``cell{i}.{run}``) and the corrupted
        batch's metric (``corrupted{j}``); cell names, counts and the label as metadata."""
        tensors: dict[str, Tensor] = {}
        cells = []
        for i, ((ablation, name), f) in enumerate(self.results.items()):
            cells.append({"ablation": ablation, "metric": name, "ablation_kind": f.ablation, "n_edges": f.n_edges,
                          "n_graph_edges": f.n_graph_edges})
            tensors.update({f"cell{i}.{part}": getattr(f, part) for part in RUNS})
        names = list(self.corrupted)
        for j, name in enumerate(names):
            if self.corrupted[name] is not None:
                tensors[f"corrupted{j}"] = self.corrupted[name]
        return self._write(path, {"cells": cells, "corrupted": names, "label": self.label}, tensors)

    @classmethod
    def load(cls, path: str | Path) -> FaithfulnessTable:
        meta, t = cls._read(path)
        results = {(c["ablation"], c["metric"]): Faithfulness(
            ablation=c["ablation_kind"], n_edges=int(c["n_edges"]), n_graph_edges=int(c["n_graph_edges"]),
            **{part: t[f"cell{i}.{part}"] for part in RUNS}) for i, c in enumerate(meta["cells"])}
        corrupted = {name: t.get(f"corrupted{j}") for j, name in enumerate(meta["corrupted"])}
        return cls(results=results, corrupted=corrupted, label=meta.get("label"))

    def __repr__(self) -> str:
        """One line per ablation: ``circuit / complement`` faithfulness under each metric."""
        first = next(iter(self.results.values()))
        name = f"{self.label!r}, " if self.label else ""
        lines = [f"FaithfulnessTable({name}{first.n_edges}/{first.n_graph_edges} edges, n={first.full.shape[0]}; "
                 "circuit / complement faithfulness)"]
        for a in self.ablations:
            cells = ", ".join(f"{m} {self.results[(a, m)].circuit_faithfulness:.3f} / "
                              f"{self.results[(a, m)].complement_faithfulness:.3f}"
                              for m in self.metrics if (a, m) in self.results)
            lines.append(f"  {a}: {cells}")
        return "\n".join(lines)


@_old_graph_form("faithfulness_table", ("graph", "circuit_edges", "clean_tokens", "corrupted_tokens", "metrics"),
                 "faithfulness_table(subject, clean_tokens, corrupted_tokens, metrics, circuit=(graph, edges))")
@takes_config(FaithfulnessConfig)
@torch.no_grad()
def faithfulness_table(subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
                       corrupted_tokens: Int[Tensor, "batch pos"] | None = None,
                       metrics: Mapping[str, Callable] | None = None, *, circuit: CircuitLike = None,
                       label: str | None = None, config: FaithfulnessConfig) -> FaithfulnessTable:
    """:func:`faithfulness` of one circuit for every ablation in ``ablations`` and every metric in
    ``metrics`` (``{name: metric}``), each cell exactly what ``faithfulness(..., metric,
    ablation=...)`` returns. Four forwards per ablation (all metrics read them) and one of the
    corrupted batch. ``corrupted_tokens`` are the reference of ``"patching"`` and ``"mean"``
    (as in :func:`faithfulness`); ``None`` allows ``ablations=("zero",)`` only. With a run and
    no tokens: its trigger contrast, with its logit difference and target log-probability.

    ``circuit``: a :class:`~poisonmech.circuits.circuit.Circuit` (its name labels the table
    unless ``label`` is given) or a ``(graph, edges)`` pair. Options
    (:class:`~poisonmech.circuits.config.FaithfulnessConfig`): ``ablations``, ``twin``,
    ``n_contrast``. The old form ``faithfulness_table(model, graph, circuit_edges, clean_tokens,
    corrupted_tokens, metrics)`` still works, with a ``DeprecationWarning``.
    """
    model, graph, inside, name, clean_tokens, corrupted_tokens, metrics = _prepare(
        subject, clean_tokens, corrupted_tokens, metrics, circuit, config, "faithfulness_table", metrics=True)
    metrics = _check_metrics(metrics)
    results: dict[tuple[str, str], Faithfulness] = {}
    for ablation in config.ablations:
        ref = reference_activations(model, graph, corrupted_tokens, ablation)
        runs = _part_metrics(model, graph, inside, clean_tokens, ref, metrics)
        for m in metrics:
            results[(ablation, m)] = Faithfulness(ablation=ablation, n_edges=int(inside.sum()),
                                                  n_graph_edges=graph.n_edges,
                                                  **{part: v[m] for part, v in runs.items()})
    corrupted: dict[str, Tensor | None] = dict.fromkeys(metrics)
    if corrupted_tokens is not None:
        with rewired(model, graph):
            logits = model(corrupted_tokens)
        corrupted = {m: apply_metric(fn, logits).float().cpu() for m, fn in metrics.items()}
    return FaithfulnessTable(results=results, corrupted=corrupted, label=label if label is not None else name)
