"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

The score of edge ``src->dst`` is a first-order estimate of how much the metric depends on
that edge carrying its clean rather than its corrupted value:

    score(src->dst) = sum over positions of (out_clean(src) - out_corrupted(src)) · d metric / d input(dst)

summed over ``d_model``, per example. ``out`` is ``src``'s write to the residual stream and
``input(dst)`` the residual stream as ``dst`` reads it (before its norm; for heads, their q,
k or v input separately), see :mod:`poisonmech.circuits.rewire`. A positive score means the
edge pushes the metric towards its clean value.

- ``method="eap"``: the gradient at one point: the corrupted run (``mode="denoise"``, the
  default: estimates the gain from patching the edge's clean value into the corrupted run) or
  the clean run (``mode="noise"``, as in Syed et al.'s EAP: estimates the loss from patching the
  edge's corrupted value into the clean run). The words mean what they mean in
  :mod:`poisonmech.patching`. (Before issue 12 the default was ``"noise"``.)
- ``method="eap-ig"``: the gradient averaged over ``steps`` runs whose embeddings are
  interpolated between corrupted and clean, ``corrupted + k/steps * (clean - corrupted)`` for
  ``k = 1..steps`` (the right Riemann sum of Hanna et al.'s reference implementation). The
  scores of the edges leaving ``input`` then sum to ``metric(clean) - metric(corrupted)`` as
  ``steps`` grows (integrated-gradients completeness). ``mode`` does not apply.
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

from poisonmech.circuits.config import MODES, SCORE_METHODS, CircuitConfig, contrast_data
from poisonmech.circuits.graph import Graph, parse_name, split_edge
from poisonmech.circuits.rewire import rewired, source_activations
from poisonmech.circuits.validation import apply_metric, check_contrast
from poisonmech.config import check_choice, takes_config
from poisonmech.results import META_KEY, Result, check_format
from poisonmech.storage import load_tensors, tensors_metadata
from poisonmech.subject import resolve

Tensor = torch.Tensor

PER_EXAMPLE_LIMIT = 2**24  # keep per-example scores when batch * n_src * n_dst is at most this


@dataclass(frozen=True, eq=False)
class EdgeScores(Result):
    """Attribution scores of every edge of ``graph``.

    ``scores`` is ``[n_src n_dst]`` (mean over examples; 0 where ``graph.edge_mask`` is False),
    ``per_example`` ``[batch n_src n_dst]`` when it was cheap to keep. ``clean_metric`` and
    ``corrupted_metric`` are the metric of the two runs, per example. Saved as
    ``"poisonmech.edge_scores/1"`` safetensors.
    """

    kind = "edge_scores"
    version = 1

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

    def save(self, path: str | Path) -> Path:
        """Atomic safetensors write (scores, metrics, per-example scores where kept; settings as metadata)."""
        tensors = {"scores": self.scores, "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric}
        if self.per_example is not None:
            tensors["per_example"] = self.per_example
        meta = {"graph": self.graph.to_dict(), "method": self.method, "mode": self.mode, "steps": self.steps}
        return self._write(path, meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> EdgeScores:
        """Read a file written by :meth:`save` (also one written before results shared one file
        layout, whose settings sit JSON-encoded beside the format tag)."""
        path = Path(path)
        try:
            raw = tensors_metadata(path) if path.is_file() else {}
        except Exception:  # not a safetensors file: _read names the problem
            raw = {}
        if META_KEY not in raw and "format" in raw:  # the layout before the shared result files
            check_format(raw, cls.kind, cls.version, path, cls.__name__)
            meta = {"graph": json.loads(raw["graph"]), "method": raw["method"], "mode": json.loads(raw["mode"]),
                    "steps": json.loads(raw["steps"])}
            t = load_tensors(path)
        else:
            meta, t = cls._read(path)
        return cls(graph=Graph.from_dict(meta["graph"]), scores=t["scores"], method=meta["method"],
                   clean_metric=t["clean_metric"], corrupted_metric=t["corrupted_metric"],
                   per_example=t.get("per_example"), mode=meta.get("mode"), steps=meta.get("steps"))

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
    """One row per edge of ``graph``: ``edge, src, dst, dst_node, channel, src_kind, dst_kind, kind, src_layer, dst_layer``
    (``dst_node`` of a grouped-query key/value input is its group, ``a1.g0``: :meth:`Graph.dst_nodes` lists its heads)."""
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


@takes_config(CircuitConfig)
def edge_attribution(subject, clean_tokens: Int[Tensor, "batch pos"] | None = None,
                     corrupted_tokens: Int[Tensor, "batch pos"] | None = None, metric: Callable | None = None, *,
                     graph: Graph | None = None, progress: bool = True, config: CircuitConfig) -> EdgeScores:
    """EAP or EAP-IG scores of every edge of the subject's model graph (see the module docstring).

    Args:
        subject: any subject (:func:`poisonmech.resolve`): a Pair, a pipeline stage, a run
            directory, a bare ``TransformerBridge`` (any device; analysed in eval mode, its mode
            restored), ...; ``twin`` picks the model (default: the backdoored twin).
        clean_tokens, corrupted_tokens: token-aligned ``[batch pos]`` batches (e.g. triggered and
            control prompts from :func:`poisonmech.patching.trigger_contrast`). With a run and no
            tokens: the run's trigger contrast (``n_contrast`` prompts).
        metric: maps logits ``[batch pos d_vocab]`` to ``[batch]`` (e.g. ``contrast.logit_diff()``).
        graph: the model's :class:`Graph` (default: read from the model).
        progress: a progress bar over EAP-IG's steps.

    Options (:class:`~poisonmech.circuits.config.CircuitConfig`): ``method`` (``"eap"`` or
    ``"eap-ig"``), ``steps`` (EAP-IG), ``mode`` (EAP: ``"denoise"``, the default, takes the
    gradient at the corrupted run, ``"noise"`` at the clean run), ``per_example`` (keep
    ``[batch n_src n_dst]`` scores; ``None``: when that is at most ``2**24`` numbers), ``twin``,
    ``n_contrast``.
    """
    s = resolve(subject, where="edge_attribution")
    model = s.model(config.twin)
    check_choice("edge_attribution", "method", config.method, SCORE_METHODS)
    clean_tokens, corrupted_tokens, metric = contrast_data(s, model, clean_tokens, corrupted_tokens, metric,
                                                           n=config.n_contrast, where="edge_attribution")
    return _edge_scores(model, clean_tokens, corrupted_tokens, metric, method=config.method, steps=config.steps,
                        mode=config.mode, per_example=config.per_example, graph=graph, progress=progress)


def _edge_scores(model, clean_tokens, corrupted_tokens, metric: Callable, *, method: str, steps: int, mode: str,
                 per_example: bool | None, graph: Graph | None, progress: bool) -> EdgeScores:
    clean_tokens, corrupted_tokens, graph = check_contrast(model, clean_tokens, corrupted_tokens, metric, graph,
                                                           "edge_attribution")

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


__all__ = ["MODES", "SCORE_METHODS", "EdgeScores", "edge_attribution", "edge_frame"]
