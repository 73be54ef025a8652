"""The computational graph of a transformer as a residual-stream DAG of nodes and edges.

Nodes are the model's components: ``input`` (token + positional embeddings), every attention
head ``a{layer}.h{head}``, every MLP ``m{layer}`` and ``logits`` (the unembedding, after the
final norm). Every node but ``logits`` writes into the residual stream (a *source*); every
node but ``input`` reads from it (a *destination*). Heads read three inputs, so their
destinations are ``a{layer}.h{head}<q>``, ``<k>`` and ``<v>``. An edge ``src->dst`` is the
contribution of ``src``'s output to ``dst``'s input, for every ``src`` upstream of ``dst``:

    input -> a0.h0<q>, ..., a0.h3<v>, m0, a1.h0<q>, ..., logits
    a0.h2 -> m0, a1.h0<q>, ..., logits            (attention precedes the MLP in a block)
    m0    -> a1.h0<q>, ..., m1, logits

The names follow the EAP-IG reference implementation (Hanna et al. 2024), so circuits from
either tool read alike. Sources and destinations are indexed in topological order; edge
scores and masks are ``[n_src n_dst]`` matrices with ``Graph.edge_mask`` marking real edges.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Bool

Tensor = torch.Tensor

CHANNELS = ("q", "k", "v")
SRC_KINDS = ("input", "head", "mlp")
DST_KINDS = ("head", "mlp", "logits")

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_HEAD_DST = re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$")
_MLP = re.compile(r"^m(\d+)$")


@dataclass(frozen=True)
class NodeInfo:
    """What a node or destination name means: ``kind`` (input / head / mlp / logits), layer, head, channel."""

    name: str
    kind: str
    layer: int | None
    head: int | None = None
    channel: str | None = None

    @property
    def node(self) -> str:
        """The node a destination belongs to (``a1.h0<q>`` -> ``a1.h0``)."""
        return self.name.split("<")[0]


def parse_name(name: str) -> NodeInfo:
    """Parse a node, source or destination name (``input``, ``a1.h0``, ``a1.h0<q>``, ``m0``, ``logits``)."""
    if name in ("input", "logits"):
        return NodeInfo(name, name, None)
    if m := _HEAD.match(name):
        return NodeInfo(name, "head", int(m[1]), int(m[2]))
    if m := _HEAD_DST.match(name):
        return NodeInfo(name, "head", int(m[1]), int(m[2]), m[3])
    if m := _MLP.match(name):
        return NodeInfo(name, "mlp", int(m[1]))
    raise ValueError(f"not a node name: {name!r}; expected 'input', 'a{{layer}}.h{{head}}', "
                     "'a{layer}.h{head}<q|k|v>', 'm{layer}' or 'logits'")


def split_edge(edge: str) -> tuple[str, str]:
    """``"a0.h1->m1"`` -> ``("a0.h1", "m1")``."""
    src, sep, dst = edge.partition("->")
    if not sep:
        raise ValueError(f"not an edge name: {edge!r}; expected 'src->dst', e.g. 'a0.h1->a1.h0<q>'")
    return src, dst


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of a sequential (attention, then MLP, per block) transformer.

    Args:
        n_layers, n_heads: the model's shape.
        has_mlp: ``False`` for attention-only models (no ``m{layer}`` nodes).
    """

    n_layers: int
    n_heads: int
    has_mlp: bool = True

    def __post_init__(self) -> None:
        for f in ("n_layers", "n_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Graph.{f} must be a positive integer, got {v!r}")

    @classmethod
    def from_model(cls, model) -> Graph:
        """The graph of a ``TransformerBridge`` (read from ``model.cfg``)."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "n_layers") or not hasattr(cfg, "n_heads"):
            raise ValueError(f"model must be a transformer_lens TransformerBridge with .cfg.n_layers / "
                             f".cfg.n_heads, got {type(model).__name__}")
        if getattr(cfg, "parallel_attn_mlp", False):
            raise NotImplementedError("circuits: parallel attention/MLP blocks (GPT-J, NeoX) are not supported; "
                                      "the graph assumes attention then MLP in each block")
        n_kv = getattr(cfg, "n_key_value_heads", None)
        if n_kv not in (None, cfg.n_heads):
            raise NotImplementedError(f"circuits: grouped-query attention (n_key_value_heads={n_kv} != "
                                      f"n_heads={cfg.n_heads}) is not supported")
        return cls(int(cfg.n_layers), int(cfg.n_heads), not bool(getattr(cfg, "attn_only", False)))

    # -- names -------------------------------------------------------------------------------------

    @cached_property
    def sources(self) -> tuple[str, ...]:
        """Nodes writing to the residual stream, in topological order."""
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(f"m{layer}")
        return tuple(out)

    @cached_property
    def destinations(self) -> tuple[str, ...]:
        """Node inputs reading the residual stream, in topological order (per layer: q, k, v heads, then MLP)."""
        out = []
        for layer in range(self.n_layers):
            for c in CHANNELS:
                out += [f"a{layer}.h{h}<{c}>" for h in range(self.n_heads)]
            if self.has_mlp:
                out.append(f"m{layer}")
        out.append("logits")
        return tuple(out)

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        """Every node, in topological order."""
        return (*self.sources, "logits")

    @property
    def n_src(self) -> int:
        return len(self.sources)

    @property
    def n_dst(self) -> int:
        return len(self.destinations)

    @cached_property
    def src_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.sources)}

    @cached_property
    def dst_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.destinations)}

    # -- topology ----------------------------------------------------------------------------------

    def _stage(self, name: str) -> int:
        """Order along the residual stream: input 0, heads of layer l 2l+1, MLP of layer l 2l+2, logits last."""
        info = parse_name(name)
        if info.kind == "input":
            return 0
        if info.kind == "logits":
            return 2 * self.n_layers + 1
        return 2 * info.layer + (1 if info.kind == "head" else 2)

    @cached_property
    def src_stage(self) -> Tensor:
        return torch.tensor([self._stage(n) for n in self.sources])

    @cached_property
    def dst_stage(self) -> Tensor:
        return torch.tensor([self._stage(n) for n in self.destinations])

    @cached_property
    def edge_mask(self) -> Bool[Tensor, "n_src n_dst"]:
        """``True`` where ``sources[i] -> destinations[j]`` is an edge (the source is upstream)."""
        return self.src_stage[:, None] < self.dst_stage[None, :]

    @cached_property
    def edges(self) -> tuple[str, ...]:
        """Every edge name ``src->dst``, source-major in topological order."""
        i, j = self.edge_mask.nonzero(as_tuple=True)
        return tuple(f"{self.sources[a]}->{self.destinations[b]}" for a, b in zip(i.tolist(), j.tolist()))

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def edge_position(self, edge: str) -> tuple[int, int]:
        """``(src index, dst index)`` of an edge name; ``ValueError`` if it is not an edge of this graph."""
        src, dst = split_edge(edge)
        if src not in self.src_index or dst not in self.dst_index or not self.edge_mask[
                self.src_index[src], self.dst_index[dst]]:
            raise ValueError(f"{edge!r} is not an edge of {self!r}")
        return self.src_index[src], self.dst_index[dst]

    def mask_of(self, edges) -> Bool[Tensor, "n_src n_dst"]:
        """Boolean ``[n_src n_dst]`` mask of a collection of edge names."""
        mask = torch.zeros(self.n_src, self.n_dst, dtype=torch.bool)
        for e in edges:
            mask[self.edge_position(e)] = True
        return mask

    def edges_of(self, mask: Bool[Tensor, "n_src n_dst"]) -> tuple[str, ...]:
        """Edge names of a boolean mask, in the graph's edge order."""
        mask = mask.bool().cpu() & self.edge_mask
        i, j = mask.nonzero(as_tuple=True)
        return tuple(f"{self.sources[a]}->{self.destinations[b]}" for a, b in zip(i.tolist(), j.tolist()))

    @staticmethod
    def edge_kind(edge: str) -> str:
        """Kind of an edge: ``"{src kind}->{dst kind}"`` with the head channel, e.g. ``head->head<q>``."""
        src, dst = (parse_name(n) for n in split_edge(edge))
        d = f"{dst.kind}<{dst.channel}>" if dst.channel else dst.kind
        return f"{src.kind}->{d}"

    # -- persistence -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Graph:
        known = {"n_layers", "n_heads", "has_mlp"}
        if set(d) - known:
            raise ValueError(f"Graph: unknown fields {sorted(set(d) - known)}; allowed: {sorted(known)}")
        return cls(**d)

    def __repr__(self) -> str:
        return (f"Graph(n_layers={self.n_layers}, n_heads={self.n_heads}, has_mlp={self.has_mlp}: "
                f"{len(self.nodes)} nodes, {self.n_edges} edges)")
