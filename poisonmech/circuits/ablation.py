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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from poisonmech.circuits.graph import Graph
from poisonmech.circuits.rewire import ABLATIONS, reference_activations, rewired
from poisonmech.circuits.validation import apply_metric, check_choice, check_metric, check_tokens

Tensor = torch.Tensor

PARTS = ("complement", "circuit")


ReferenceTokens = Union[Tensor, Sequence[Tensor], Callable[[Tensor], Tensor], None]


@contextmanager
def ablated(model, graph: Graph, edges: Bool[Tensor, "n_src n_dst"], reference_tokens: ReferenceTokens = None,
            *, ablation: str = "patching") -> Iterator:
    """Inside the block, ``model``'s forwards run with the ``edges`` mask ablated.

    ``reference_tokens`` supply the reference activations:

    - ``"patching"``: a ``[batch pos]`` corrupted batch (the model's inputs must then have its
      shape), or a function mapping each input batch to its token-aligned corrupted batch
      (e.g. the trigger replaced by a control word), run just before each forward: this is how
      patching works inside :func:`poisonmech.evaluate`, whose batches are not known in advance;
    - ``"mean"``: a ``[batch pos]`` batch or a list of batches (any lengths) to average;
    - ``"zero"``: not needed.

    Yields the model. Hooks are removed and the model's train/eval mode is restored on exit,
    also when the block raises.
    """
    check_choice("ablation", ablation, ABLATIONS)
    if callable(reference_tokens) and not isinstance(reference_tokens, Tensor):
        if ablation != "patching":
            raise ValueError(f"reference_tokens: a function of the input tokens works with ablation='patching' "
                             f"only, got ablation={ablation!r}")
        with rewired(model, graph, ablate=edges, reference_fn=reference_tokens):
            yield model
        return
    if isinstance(reference_tokens, (list, tuple)):
        reference_tokens = [check_tokens(model, t, names=(f"reference_tokens[{i}]", ""))[0]
                            for i, t in enumerate(reference_tokens)]
    elif reference_tokens is not None:
        reference_tokens, _ = check_tokens(model, reference_tokens, names=("reference_tokens", ""))
    ref = reference_activations(model, graph, reference_tokens, ablation)
    with rewired(model, graph, ablate=edges, reference=ref):
        yield model


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """How much of the clean behaviour a circuit, and its complement, carry.

    Per example, the metric of the clean batch with: nothing ablated (``full``), everything
    ablated (``empty``), everything outside the circuit ablated (``circuit``) and the circuit's
    edges ablated (``complement``).
    """

    ablation: str
    full: Float[Tensor, " batch"]
    empty: Float[Tensor, " batch"]
    circuit: Float[Tensor, " batch"]
    complement: Float[Tensor, " batch"]
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
        for part in ("full", "empty", "circuit", "complement"):
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


def _check_ablations(ablations) -> tuple[str, ...]:
    if isinstance(ablations, str):
        ablations = (ablations,)
    ablations = tuple(ablations)
    if not ablations:
        raise ValueError(f"ablations must name at least one of {ABLATIONS}, got ()")
    for a in ablations:
        check_choice("ablations", a, ABLATIONS)
    if len(set(ablations)) < len(ablations):
        raise ValueError(f"ablations: each ablation once, got {ablations}")
    return ablations


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


@torch.no_grad()
def faithfulness(model, graph: Graph, circuit_edges: Bool[Tensor, "n_src n_dst"],
                 clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"] | None,
                 metric: Callable, *, ablation: str = "patching") -> Faithfulness:
    """Faithfulness of the circuit ``circuit_edges`` (a mask) on the clean batch; see the module docstring.

    ``corrupted_tokens`` are the reference for ``"patching"`` and ``"mean"`` ablation.
    """
    check_choice("ablation", ablation, ABLATIONS)
    check_metric(metric)
    clean_tokens, corrupted_tokens = check_tokens(model, clean_tokens, corrupted_tokens)
    ref = reference_activations(model, graph, corrupted_tokens, ablation)
    inside = circuit_edges.bool().cpu() & graph.edge_mask
    runs = _part_metrics(model, graph, inside, clean_tokens, ref, {"metric": metric})
    return Faithfulness(ablation=ablation, n_edges=int(inside.sum()), n_graph_edges=graph.n_edges,
                        **{part: v["metric"] for part, v in runs.items()})


REFERENCES = {"patching": "the corrupted run (token-aligned)", "mean": "the mean over the corrupted batch and positions",
              "zero": "zero"}


@dataclass(frozen=True, eq=False)
class FaithfulnessTable:
    """Faithfulness of one circuit under several ablations and metrics, side by side.

    ``results[(ablation, metric)]`` is the :class:`Faithfulness` of that cell; ``corrupted[metric]``
    the metric of the corrupted batch with nothing ablated (``None`` without corrupted tokens).
    Circuit metrics are fragile to these choices (Miller et al. 2024): read them together.
    """

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


@torch.no_grad()
def faithfulness_table(model, graph: Graph, circuit_edges: Bool[Tensor, "n_src n_dst"],
                       clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"] | None,
                       metrics: Mapping[str, Callable], *, ablations: Sequence[str] = ABLATIONS,
                       label: str | None = None) -> FaithfulnessTable:
    """:func:`faithfulness` of one circuit for every ablation in ``ablations`` and every metric in
    ``metrics`` (``{name: metric}``), each cell exactly what ``faithfulness(..., metric,
    ablation=...)`` returns. Four forwards per ablation (all metrics read them) and one of the
    corrupted batch. ``corrupted_tokens`` are the reference of ``"patching"`` and ``"mean"``
    (as in :func:`faithfulness`); ``None`` allows ``ablations=("zero",)`` only.
    """
    metrics = _check_metrics(metrics)
    ablations = _check_ablations(ablations)
    clean_tokens, corrupted_tokens = check_tokens(model, clean_tokens, corrupted_tokens)
    inside = circuit_edges.bool().cpu() & graph.edge_mask
    results: dict[tuple[str, str], Faithfulness] = {}
    for ablation in ablations:
        ref = reference_activations(model, graph, corrupted_tokens, ablation)
        runs = _part_metrics(model, graph, inside, clean_tokens, ref, metrics)
        for name in metrics:
            results[(ablation, name)] = Faithfulness(ablation=ablation, n_edges=int(inside.sum()),
                                                     n_graph_edges=graph.n_edges,
                                                     **{part: v[name] for part, v in runs.items()})
    corrupted: dict[str, Tensor | None] = dict.fromkeys(metrics)
    if corrupted_tokens is not None:
        with rewired(model, graph):
            logits = model(corrupted_tokens)
        corrupted = {name: apply_metric(m, logits).float().cpu() for name, m in metrics.items()}
    return FaithfulnessTable(results=results, corrupted=corrupted, label=label)
