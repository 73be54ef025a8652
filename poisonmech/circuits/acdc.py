"""ACDC-style greedy edge pruning with exact patching (Conmy et al. 2023), for small models.

Starting from the full graph, destinations are visited from the logits back to the first
layer; each incoming edge (latest source first) is removed on top of the edges already
removed, and stays removed when the batch-mean metric moves by less than ``threshold``. One
forward pass per tested edge: fine for the tiny twins (about 100 edges), slow for big models,
where EAP-IG is the tool.

What "removed" means follows ``mode``, as in :mod:`poisonmech.patching`:

- ``"denoise"`` (the default): the corrupted input runs with the circuit's edges patched to
  their clean values (every edge patched is exactly the clean run); removing an edge stops
  patching it, so it carries the corrupted run's own value.
- ``"noise"`` (Conmy et al.'s ACDC, and the only behaviour before issue 12): the clean input
  runs with removed edges patched to their corrupted values. A destination whose node no
  longer feeds anything is cut without testing (its output reaches nothing unpatched); under
  ``"denoise"`` unpatched edges still carry the node's live output, so every edge is tested.

The score kept for an edge is the metric change it caused when it was tested,
``m(before) - m(with it removed)`` (positive: the edge pushed towards the clean value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from poisonmech.circuits.circuit import Circuit
from poisonmech.circuits.config import CircuitConfig, contrast_data
from poisonmech.circuits.graph import Graph
from poisonmech.circuits.rewire import reference_activations, rewired
from poisonmech.circuits.validation import apply_metric, check_contrast
from poisonmech.config import takes_config
from poisonmech.subject import resolve

Tensor = torch.Tensor

THRESHOLD_NEEDED = ("method='acdc' prunes by threshold=: pass threshold= (the largest change of the mean metric an "
                    "edge may cause and still be removed)")


@takes_config(CircuitConfig)
def acdc(subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
         corrupted_tokens: Int[Tensor, "batch pos"] | None = None, metric: Callable | None = None, *,
         graph: Graph | None = None, progress: bool = True, config: CircuitConfig) -> Circuit:
    """Greedy edge pruning; returns the kept edges as a :class:`Circuit` (``method="acdc"``).

    ``subject`` is any subject (:func:`poisonmech.resolve`); data as in
    :func:`~poisonmech.circuits.discover` (with a run and no tokens: its trigger contrast).
    Options (:class:`~poisonmech.circuits.config.CircuitConfig`): ``threshold`` (required),
    ``mode`` (see the module docstring; default ``"denoise"``), ``label``, ``twin``,
    ``n_contrast``; ``method`` is ``"acdc"`` whatever the config says, ``top_n`` is refused.
    """
    s = resolve(subject, where="acdc")
    model = s.model(config.twin)
    if config.top_n is not None:
        raise ValueError(f"{THRESHOLD_NEEDED}, not top_n=")
    if config.threshold is None:
        raise ValueError(f"acdc needs threshold=: {THRESHOLD_NEEDED}")
    clean_tokens, corrupted_tokens, metric = contrast_data(s, model, clean_tokens, corrupted_tokens, metric,
                                                           n=config.n_contrast, where="acdc")
    return _acdc(model, clean_tokens, corrupted_tokens, metric, threshold=config.threshold, mode=config.mode,
                 graph=graph, label=config.label, progress=progress)


@torch.no_grad()
def _acdc(model, clean_tokens, corrupted_tokens, metric: Callable, *, threshold: float, mode: str,
          graph: Graph | None, label: str | None, progress: bool) -> Circuit:
    clean_tokens, corrupted_tokens, graph = check_contrast(model, clean_tokens, corrupted_tokens, metric, graph,
                                                           "acdc")
    noise = mode == "noise"
    ref = reference_activations(model, graph, corrupted_tokens if noise else clean_tokens, "patching")
    tokens = clean_tokens if noise else corrupted_tokens

    def run(removed: Tensor) -> float:
        patched = removed if noise else graph.edge_mask & ~removed
        with rewired(model, graph, ablate=patched, reference=ref):
            return float(apply_metric(metric, model(tokens)).float().mean())

    removed = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool)
    scores = torch.zeros(graph.n_src, graph.n_dst)
    full = current = run(removed)
    corrupted = run(graph.edge_mask)
    n_forwards = 2
    bar = tqdm(total=graph.n_edges, desc="ACDC edges", disable=not progress, leave=False)
    for dst in reversed(range(graph.n_dst)):
        nodes = graph.dst_nodes(graph.destinations[dst])  # a key/value group's input: all its heads
        incoming = graph.edge_mask[:, dst].nonzero().flatten().tolist()
        if noise and "logits" not in nodes:
            out = [graph.src_index[n] for n in nodes]
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
                         "n_forwards": n_forwards, "mode": mode}, label=label)
