"""ACDC-style greedy edge pruning with exact patching (Conmy et al. 2023), for small models.

Starting from the full graph, destinations are visited from the logits back to the first
layer; each incoming edge (latest source first) is patched to its corrupted value on top of
the edges already removed, and stays removed when the batch-mean metric moves by less than
``threshold``. A destination whose node no longer feeds anything is cut without testing.
One forward pass per tested edge: fine for the tiny twins (about 100 edges), slow for big
models, where EAP-IG is the tool.

The score kept for an edge is the metric change it caused when it was tested,
``m(before) - m(with it removed)`` (positive: the edge pushed towards the clean value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from poisonmech.circuits.circuit import Circuit
from poisonmech.circuits.graph import Graph, parse_name
from poisonmech.circuits.rewire import reference_activations, rewired
from poisonmech.circuits.validation import apply_metric, check_metric, check_tokens

Tensor = torch.Tensor


@torch.no_grad()
def acdc(model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
         metric: Callable, *, threshold: float, graph: Graph | None = None, label: str | None = None,
         progress: bool = True) -> Circuit:
    """Greedy edge pruning; returns the kept edges as a :class:`Circuit` (``method="acdc"``)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    check_metric(metric)
    clean_tokens, corrupted_tokens = check_tokens(model, clean_tokens, corrupted_tokens)
    graph = graph or Graph.from_model(model)
    ref = reference_activations(model, graph, corrupted_tokens, "patching")

    def run(mask: Tensor | None) -> float:
        with rewired(model, graph, ablate=mask, reference=ref):
            return float(apply_metric(metric, model(clean_tokens)).float().mean())

    removed = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    scores = torch.zeros(graph.n_src, graph.n_dst)
    full = current = run(None)
    corrupted = run(graph.edge_mask)
    n_forwards = 2
    bar = tqdm(total=graph.n_edges, desc="ACDC edges", disable=not progress, leave=False)
    for dst in reversed(range(graph.n_dst)):
        node = parse_name(graph.destinations[dst]).node
        incoming = graph.edge_mask[:, dst].nonzero().flatten().tolist()
        if node != "logits":
            out = graph.src_index[node]
            if not (graph.edge_mask[out] & ~removed[out]).any():  # feeds nothing any more
                removed[incoming, dst] = True
                bar.update(len(incoming))
                continue
        for src in reversed(incoming):
            trial = removed.clone()
            trial[src, dst] = True
            value = run(trial)
            n_forwards += 1
            scores[src, dst] = current - value
            if abs(current - value) < threshold:
                removed, current = trial, value
            bar.update(1)
    bar.close()
    kept = graph.edge_mask & ~removed
    return Circuit(graph=graph, edges=graph.edges_of(kept), scores=scores, method="acdc",
                   selection={"threshold": float(threshold)},
                   info={"clean_metric": full, "corrupted_metric": corrupted, "circuit_metric": current,
                         "n_forwards": n_forwards}, label=label)
