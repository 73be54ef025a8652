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

from collections.abc import Callable, Iterator, Sequence
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
                f"complement={self.complement_faithfulness:.3f}, edges={self.n_edges}/{self.n_graph_edges})")


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
    masks = {"full": None, "empty": graph.edge_mask, "circuit": graph.edge_mask & ~inside, "complement": inside}
    out = {}
    for part, mask in masks.items():
        with rewired(model, graph, ablate=mask, reference=ref):
            out[part] = apply_metric(metric, model(clean_tokens)).float().cpu()
    return Faithfulness(ablation=ablation, n_edges=int(inside.sum()), n_graph_edges=graph.n_edges, **out)
