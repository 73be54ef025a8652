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

Two architectural variants change the graph (both read from the model's config by
:meth:`Graph.from_model`):

- **parallel blocks** (``parallel=True``: GPT-NeoX / Pythia, GPT-J): attention and MLP of a
  block both read the block's input, ``resid_post = resid_pre + attn(ln1(resid_pre)) +
  mlp(ln2(resid_pre))``, so the MLP of layer ``l`` does *not* read the heads of layer ``l``:
  there is no edge ``a{l}.h{h}->m{l}`` (and no ``resid_mid`` activation).
- **grouped-query attention** (``n_kv_heads < n_heads``: Llama, Qwen2, Mistral, ...): keys and
  values are computed once per key/value head and shared by the ``n_heads / n_kv_heads`` query
  heads of its group (query head ``h`` uses kv head ``h // group_size``, Hugging Face's
  ``repeat_kv`` order). The model has no per-query-head key or value input to intervene on, so
  the graph's k / v destinations are per group, ``a{layer}.g{group}<k>`` and
  ``a{layer}.g{group}<v>``, the group index being the head index of ``hook_k`` / ``hook_v``;
  queries stay per head (``a{layer}.h{head}<q>``). An edge into ``a1.g0<k>`` changes the keys
  that every head of group 0 reads. (EAP-IG on a ``HookedTransformer`` with
  ``ungroup_grouped_query_attention`` scores per-query-head copies of the keys instead, a
  finer intervention than the model computes; TransformerBridge offers no such option.)
  A group destination belongs to all the heads of its group (:meth:`Graph.dst_nodes`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Bool

from poisonmech.sites import architecture_name

Tensor = torch.Tensor

CHANNELS = ("q", "k", "v")
SRC_KINDS = ("input", "head", "mlp")
DST_KINDS = ("head", "mlp", "logits")

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_HEAD_DST = re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$")
_GROUP_DST = re.compile(r"^a(\d+)\.g(\d+)<([kv])>$")
_MLP = re.compile(r"^m(\d+)$")


@dataclass(frozen=True)
class NodeInfo:
    """What a node or destination name means: ``kind`` (input / head / mlp / logits), layer, head, channel."""

    name: str
    kind: str
    layer: int | None
    head: int | None = None
    channel: str | None = None
    group: int | None = None  #: the key/value group of a grouped-query k / v destination (``a1.g0<k>``)

    @property
    def node(self) -> str:
        """The node a destination belongs to (``a1.h0<q>`` -> ``a1.h0``); for a key/value group,
        the group (``a1.g0<k>`` -> ``a1.g0``), whose heads :meth:`Graph.dst_nodes` lists."""
        return self.name.split("<")[0]


def parse_name(name: str) -> NodeInfo:
    """Parse a node, source or destination name (``input``, ``a1.h0``, ``a1.h0<q>``, ``m0``, ``logits``)."""
    if name in ("input", "logits"):
        return NodeInfo(name, name, None)
    if m := _HEAD.match(name):
        return NodeInfo(name, "head", int(m[1]), int(m[2]))
    if m := _HEAD_DST.match(name):
        return NodeInfo(name, "head", int(m[1]), int(m[2]), m[3])
    if m := _GROUP_DST.match(name):
        return NodeInfo(name, "head", int(m[1]), None, m[3], int(m[2]))
    if m := _MLP.match(name):
        return NodeInfo(name, "mlp", int(m[1]))
    raise ValueError(f"not a node name: {name!r}; expected 'input', 'a{{layer}}.h{{head}}', "
                     "'a{layer}.h{head}<q|k|v>', 'a{layer}.g{group}<k|v>', 'm{layer}' or 'logits'")


def split_edge(edge: str) -> tuple[str, str]:
    """``"a0.h1->m1"`` -> ``("a0.h1", "m1")``."""
    src, sep, dst = edge.partition("->")
    if not sep:
        raise ValueError(f"not an edge name: {edge!r}; expected 'src->dst', e.g. 'a0.h1->a1.h0<q>'")
    return src, dst


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of a transformer: sequential blocks (attention, then MLP) unless ``parallel``.

    Args:
        n_layers, n_heads: the model's shape (``n_heads`` query heads per layer).
        has_mlp: ``False`` for attention-only models (no ``m{layer}`` nodes).
        n_kv_heads: key/value heads per layer with grouped-query attention (must divide
            ``n_heads``; k / v destinations are then per group, see the module docstring);
            ``None`` (or ``n_heads``, stored as ``None``): every head has its own keys and values.
        parallel: attention and MLP of a block read the same input (GPT-NeoX, GPT-J): no edge
            from a layer's heads to its own MLP.
    """

    n_layers: int
    n_heads: int
    has_mlp: bool = True
    n_kv_heads: int | None = None
    parallel: bool = False

    def __post_init__(self) -> None:
        for f in ("n_layers", "n_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Graph.{f} must be a positive integer, got {v!r}")
        kv = self.n_kv_heads
        if kv is not None:
            if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
                raise ValueError(f"Graph.n_kv_heads must be a positive integer dividing n_heads={self.n_heads} "
                                 f"(or None), got {kv!r}")
            if kv == self.n_heads:
                object.__setattr__(self, "n_kv_heads", None)  # one graph, one spelling
        for f in ("has_mlp", "parallel"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"Graph.{f} must be True or False, got {getattr(self, f)!r}")
        if self.parallel and not self.has_mlp:
            raise ValueError("Graph.parallel=True needs has_mlp=True (parallel blocks run attention and an MLP)")

    @classmethod
    def from_model(cls, model) -> Graph:
        """The graph of a ``TransformerBridge`` (read from ``model.cfg``: ``n_layers``, ``n_heads``,
        ``n_key_value_heads``, ``parallel_attn_mlp``, ``attn_only``)."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "n_layers") or not hasattr(cfg, "n_heads"):
            raise ValueError(f"model must be a transformer_lens TransformerBridge with .cfg.n_layers / "
                             f".cfg.n_heads, got {type(model).__name__}")
        n_heads = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None)
        if n_kv is not None and (int(n_kv) < 1 or n_heads % int(n_kv)):
            raise ValueError(f"circuits: {architecture_name(model)} has n_key_value_heads={n_kv}, which does not "
                             f"divide n_heads={n_heads}: its key/value groups are not contiguous query heads")
        has_mlp = not bool(getattr(cfg, "attn_only", False))
        parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        if parallel and not has_mlp:
            raise ValueError(f"circuits: {architecture_name(model)} says parallel attention/MLP blocks but has no MLP")
        return cls(int(cfg.n_layers), n_heads, has_mlp, int(n_kv) if n_kv is not None else None, parallel)

    # -- attention groups --------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer (``n_heads`` without grouped-query attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def grouped(self) -> bool:
        """Whether k / v destinations are per key/value group (grouped-query attention)."""
        return self.n_kv_heads is not None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.kv_heads

    def channel_width(self, channel: str) -> int:
        """How many destinations of one layer a head input channel has: ``n_heads`` for ``q``,
        :attr:`kv_heads` for ``k`` and ``v``."""
        return self.n_heads if channel == "q" else self.kv_heads

    def _channel_names(self, layer: int, channel: str) -> list[str]:
        if channel == "q" or not self.grouped:
            return [f"a{layer}.h{h}<{channel}>" for h in range(self.n_heads)]
        return [f"a{layer}.g{g}<{channel}>" for g in range(self.kv_heads)]

    def dst_nodes(self, dst: str) -> tuple[str, ...]:
        """The nodes a destination feeds: its own node (``a1.h0<q>`` -> ``("a1.h0",)``, ``m0`` ->
        ``("m0",)``), or every head of a key/value group (``a1.g0<k>`` -> ``("a1.h0", "a1.h1")``
        with two query heads per group)."""
        info = parse_name(dst)
        if info.group is None:
            return (info.node,)
        r = self.group_size
        return tuple(f"a{info.layer}.h{h}" for h in range(info.group * r, (info.group + 1) * r))

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
        """Node inputs reading the residual stream, in topological order (per layer: the heads'
        q inputs, their k inputs, their v inputs (per key/value group with grouped-query
        attention), then the MLP)."""
        out = []
        for layer in range(self.n_layers):
            for c in CHANNELS:
                out += self._channel_names(layer, c)
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
        """Order along the residual stream: input 0, heads of layer l 2l+1, MLP of layer l 2l+2
        (2l+1 in a parallel block: it reads what the heads read), logits last."""
        info = parse_name(name)
        if info.kind == "input":
            return 0
        if info.kind == "logits":
            return 2 * self.n_layers + 1
        return 2 * info.layer + (1 if info.kind == "head" or self.parallel else 2)

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
        """The fields; ``n_kv_heads`` and ``parallel`` only where they differ from the defaults, so a
        sequential multi-head graph writes what it wrote before they existed."""
        d = asdict(self)
        for f, default in (("n_kv_heads", None), ("parallel", False)):
            if d[f] == default:
                del d[f]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Graph:
        known = {"n_layers", "n_heads", "has_mlp", "n_kv_heads", "parallel"}
        if set(d) - known:
            raise ValueError(f"Graph: unknown fields {sorted(set(d) - known)}; allowed: {sorted(known)}")
        return cls(**d)

    def __repr__(self) -> str:
        extra = f", n_kv_heads={self.n_kv_heads}" if self.grouped else ""
        extra += ", parallel=True" if self.parallel else ""
        return (f"Graph(n_layers={self.n_layers}, n_heads={self.n_heads}, has_mlp={self.has_mlp}{extra}: "
                f"{len(self.nodes)} nodes, {self.n_edges} edges)")

