"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The score of edge ``src->dst`` is a first-order estimate of how much the metric depends on
that edge carrying its clean rather than its corrupted value:

    score(src->dst) = sum over positions of (out_clean(src) - out_corrupted(src)) · d metric / d input(dst)

summed over ``d_model``, per example. ``out`` is ``src``'s write to the residual stream and
``input(dst)`` the residual stream as ``dst`` reads it (before its norm; for heads, their q,
k or v input separately), see :mod:`poisonmech.circuits.rewire`. A positive score means the
edge pushes the metric towards its clean value.

- ``method="eap"``: the gradient at one point: the clean run (``mode="noise"``, as in Hanna et
  al.'s EAP: estimates the loss from patching the edge to corrupted) or the corrupted run
  (``mode="denoise"``: estimates the gain from patching the edge to clean).
- ``method="eap-ig"``: the gradient averaged over ``steps`` runs whose embeddings are
  interpolated between corrupted and clean, ``corrupted + k/steps * (clean - corrupted)`` for
  ``k = 1..steps`` (the right Riemann sum of Hanna et al.'s reference implementation). The
  scores of the edges leaving ``input`` then sum to ``metric(clean) - metric(corrupted)`` as
  ``steps`` grows (integrated-gradients completeness).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from poisonmech.circuits.graph import Graph, parse_name, split_edge
from poisonmech.circuits.rewire import rewired, source_activations
from poisonmech.circuits.validation import apply_metric, check_choice, check_metric, check_tokens
from poisonmech.storage import load_tensors, save_tensors, tensors_metadata

Tensor = torch.Tensor

SCORE_METHODS = ("eap", "eap-ig")
MODES = ("noise", "denoise")
FORMAT = "poisonmech.edge_scores/1"
PER_EXAMPLE_LIMIT = 2**24  # keep per-example scores when batch * n_src * n_dst is at most this


@dataclass(frozen=True, eq=False)
class EdgeScores:
    """Attribution scores of every edge of ``graph``.

    ``scores`` is ``[n_src n_dst]`` (mean over examples; 0 where ``graph.edge_mask`` is False),
    ``per_example`` ``[batch n_src n_dst]`` when it was cheap to keep. ``clean_metric`` and
    ``corrupted_metric`` are the metric of the two runs, per example.
    """

    graph: Graph
    scores: Float[Tensor, "n_src n_dst"]
    method: str
    clean_metric: Float[Tensor, " batch"]
    corrupted_metric: Float[Tensor, " batch"]
    per_example: Float[Tensor, "batch n_src n_dst"] | None = None
    mode: str | None = None
    steps: int | None = None

    def __repr__(self) -> str:
        settings = f", steps={self.steps}" if self.steps is not None else ""
        settings += f", mode={self.mode!r}" if self.mode is not None else ""
        values = self.edge_values().detach().abs()
        best = self.graph.edges[int(values.argmax())] if values.numel() else "-"
        return (f"EdgeScores({self.method}{settings}: {self.graph.n_edges} edges, n={self.clean_metric.shape[0]}, "
                f"total effect {self.total_effect:.3g}, top |score| {best} {self.score(best) if values.numel() else 0:+.3g})")

    def score(self, edge: str) -> float:
        """The mean score of one edge, e.g. ``scores.score("a0.h1->logits")``."""
        return float(self.scores[self.graph.edge_position(edge)])

    def edge_values(self) -> Float[Tensor, " n_edges"]:
        """Scores in ``graph.edges`` order."""
        return self.scores[self.graph.edge_mask]

    @property
    def total_effect(self) -> float:
        """``mean(metric(clean) - metric(corrupted))``: what the scores of a complete cut should add up to."""
        return float((self.clean_metric - self.corrupted_metric).mean())

    def circuit(self, top_n: int | None = None, threshold: float | None = None, *, absolute: bool = True,
                label: str | None = None):
        """The :class:`~poisonmech.circuits.circuit.Circuit` of the ``top_n`` best edges, or of the edges
        scoring at least ``threshold`` (by absolute score unless ``absolute=False``)."""
        from poisonmech.circuits.circuit import Circuit

        return Circuit.from_scores(self, top_n=top_n, threshold=threshold, absolute=absolute, label=label)

    def to_frame(self, per_example: bool = False) -> pd.DataFrame:
        """Tidy frame, one row per edge (or per edge and example): names, kinds, layers, ``score``."""
        frame = edge_frame(self.graph)
        if per_example:
            if self.per_example is None:
                raise ValueError("these scores kept no per-example values (the batch was too large); "
                                 "recompute with per_example=True")
            vals = self.per_example[:, self.graph.edge_mask].detach().cpu().numpy()  # [batch n_edges]
            n = vals.shape[0]
            frame = frame.loc[np.tile(frame.index, n)].reset_index(drop=True)
            frame["example"] = np.repeat(np.arange(n), len(self.graph.edges))
            frame["score"] = vals.reshape(-1)
        else:
            frame["score"] = self.edge_values().detach().cpu().numpy()
        frame.insert(0, "method", self.method)
        return frame

    def save(self, path: str | Path) -> None:
        """Atomic safetensors write (scores, metrics, per-example scores where kept; settings as metadata)."""
        tensors = {"scores": self.scores, "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric}
        if self.per_example is not None:
            tensors["per_example"] = self.per_example
        meta = {"format": FORMAT, "graph": json.dumps(self.graph.to_dict()), "method": self.method,
                "mode": json.dumps(self.mode), "steps": json.dumps(self.steps)}
        save_tensors(Path(path), tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> EdgeScores:
        t, meta = load_tensors(Path(path)), tensors_metadata(Path(path))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} does not hold poisonmech edge scores (format {meta.get('format')!r})")
        return cls(graph=Graph.from_dict(json.loads(meta["graph"])), scores=t["scores"], method=meta["method"],
                   clean_metric=t["clean_metric"], corrupted_metric=t["corrupted_metric"],
                   per_example=t.get("per_example"), mode=json.loads(meta["mode"]), steps=json.loads(meta["steps"]))

    def plot(self, title: str | None = None):
        """Heatmap of the scores, sources × destinations (plotly)."""
        import plotly.express as px

        grid = self.scores.detach().cpu().numpy().copy()
        grid[~self.graph.edge_mask.numpy()] = np.nan
        lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        fig = px.imshow(grid, x=list(self.graph.destinations), y=list(self.graph.sources),
                        color_continuous_scale="RdBu", range_color=(-lim, lim), aspect="auto",
                        labels={"x": "destination", "y": "source", "color": "score"},
                        title=title or f"{self.method} edge scores")
        fig.update_layout(template="plotly_white")
        return fig


def edge_frame(graph: Graph) -> pd.DataFrame:
    """One row per edge of ``graph``: ``edge, src, dst, dst_node, channel, src_kind, dst_kind, kind, src_layer, dst_layer``."""
    rows = []
    for e in graph.edges:
        s, d = split_edge(e)
        si, di = parse_name(s), parse_name(d)
        rows.append({"edge": e, "src": s, "dst": d, "dst_node": di.node, "channel": di.channel,
                     "src_kind": si.kind, "dst_kind": di.kind, "kind": Graph.edge_kind(e),
                     "src_layer": si.layer, "dst_layer": di.layer})
    frame = pd.DataFrame(rows)
    for c in ("src_layer", "dst_layer"):
        frame[c] = frame[c].astype("Int64")
    return frame


def _gradients(model, graph: Graph, tokens: Tensor, metric: Callable, input_value: Tensor | None = None
               ) -> tuple[Float[Tensor, " batch"], Float[Tensor, "batch pos n_dst d_model"]]:
    """Metric values and d metric / d input(dst) for every destination, from one forward and backward."""
    with torch.enable_grad(), rewired(model, graph, track=True, input_value=input_value) as run:
        logits = model(tokens)
        values = apply_metric(metric, logits)
        grads = torch.autograd.grad(values.sum(), run.forks, allow_unused=True)
        forks = run.forks
    grads = [g if g is not None else torch.zeros_like(f) for g, f in zip(grads, forks)]
    return values.detach(), run.gather([g.detach() for g in grads])


def edge_attribution(model, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"],
                     metric: Callable, *, method: str = "eap-ig", steps: int = 5, mode: str = "noise",
                     per_example: bool | None = None, graph: Graph | None = None,
                     progress: bool = True) -> EdgeScores:
    """EAP or EAP-IG scores of every edge of ``model``'s graph (see the module docstring).

    Args:
        model: a ``TransformerBridge`` (any device; put in eval mode for the analysis and restored).
        clean_tokens, corrupted_tokens: token-aligned ``[batch pos]`` batches (e.g. triggered and
            control prompts from :func:`poisonmech.patching.trigger_contrast`).
        metric: maps logits ``[batch pos d_vocab]`` to ``[batch]`` (e.g. ``contrast.logit_diff()``).
        method: ``"eap"`` or ``"eap-ig"``.
        steps: interpolation steps of EAP-IG (ignored by EAP).
        mode: for EAP, where the gradient is taken: ``"noise"`` (clean run) or ``"denoise"`` (corrupted run).
        per_example: keep ``[batch n_src n_dst]`` scores; ``None`` keeps them when that is at most
            ``2**24`` numbers.
        progress: a progress bar over EAP-IG's steps.
    """
    check_choice("method", method, SCORE_METHODS)
    check_choice("mode", mode, MODES)
    check_metric(metric)
    if method == "eap-ig" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    clean_tokens, corrupted_tokens = check_tokens(model, clean_tokens, corrupted_tokens)
    graph = graph or Graph.from_model(model)

    clean_acts, clean_logits = source_activations(model, graph, clean_tokens)
    corrupted_acts, corrupted_logits = source_activations(model, graph, corrupted_tokens)
    with torch.no_grad():
        clean_metric = apply_metric(metric, clean_logits).detach()
        corrupted_metric = apply_metric(metric, corrupted_logits).detach()
    delta = clean_acts - corrupted_acts  # [batch pos n_src d_model]

    if method == "eap":
        _, grads = _gradients(model, graph, clean_tokens if mode == "noise" else corrupted_tokens, metric)
    else:
        emb_clean, emb_corrupted = clean_acts[:, :, 0], corrupted_acts[:, :, 0]
        grads = None
        for k in tqdm(range(1, steps + 1), desc="EAP-IG steps", disable=not progress, leave=False):
            x = emb_corrupted + (k / steps) * (emb_clean - emb_corrupted)
            _, g = _gradients(model, graph, clean_tokens, metric, input_value=x)
            grads = g if grads is None else grads + g
        grads = grads / steps

    per = torch.einsum("bsnd,bsmd->bnm", delta.float(), grads.float())
    per = per * graph.edge_mask.to(per.device)
    keep = per_example if per_example is not None else per.numel() <= PER_EXAMPLE_LIMIT
    return EdgeScores(graph=graph, scores=per.mean(0).cpu(), method=method,
                      clean_metric=clean_metric.float().cpu(), corrupted_metric=corrupted_metric.float().cpu(),
                      per_example=per.cpu() if keep else None, mode=mode if method == "eap" else None,
                      steps=steps if method == "eap-ig" else None)
