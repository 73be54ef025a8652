"""Rewired forward passes: the bridge's own forward, with every graph edge made explicit.

One forward of a ``TransformerBridge`` under :func:`rewired` computes exactly what the model
computes, but every destination's input is rebuilt from the residual stream so that each
edge can be touched on its own:

- a head's q / k / v input is a per-head copy ("fork") of the block's pre-norm residual
  stream, normed with the block's own ``ln1`` (LayerNorm or RMSNorm) and projected with that
  head's ``W_Q`` / ``W_K`` / ``W_V`` (and bias, where the model has one) (hook points
  ``blocks.{l}.hook_resid_pre`` and ``blocks.{l}.attn.hook_{q,k,v}``, the registry's
  ``resid_pre`` and ``q`` / ``k`` / ``v`` sites). Under grouped-query attention ``hook_k`` /
  ``hook_v`` have one head per key/value group, and so do the k / v forks. The bridge applies
  rotary embeddings after these hooks, to the rebuilt values; on first use every rebuilt
  q / k / v is checked against the bridge's own;
- the MLP's input is a copy of the residual stream going into ``ln2``
  (``blocks.{l}.ln2.hook_in``, which leaves the residual skip connection alone): the block's
  input plus its attention output in a sequential block, the block's input in a parallel one
  (GPT-NeoX), checked on first use against what the graph says;
- the logits' input is a copy of the residual stream going into ``ln_final``.

Sources are recorded as they are produced: the embeddings (``blocks.0.hook_resid_pre``),
each head's output ``z[..., h, :] @ W_O[l, h]`` (``blocks.{l}.attn.hook_z``) and each MLP's
output (``blocks.{l}.hook_mlp_out``). The residual stream is their sum (plus ``b_O``).

*Ablating* edge ``src->dst`` replaces ``src``'s contribution to ``dst``'s input by a
reference value: ``input(dst) = resid - sum over ablated src of (out(src) - ref(src))``, where
``out`` is this forward's own output of ``src`` (itself possibly changed by ablations further
upstream) and ``ref`` a reference activation (a corrupted run, a mean, or zero). *Tracking*
keeps the forks, so one backward pass gives the gradient of a metric with respect to every
destination's input: the ``dst`` half of an edge attribution score.

Everything runs on the model's device; hooks live only inside the context manager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float, Int

from poisonmech.circuits.graph import CHANNELS, Graph
from poisonmech.runtime import eval_mode, model_device
from poisonmech.sites import architecture_name, hook_name

Tensor = torch.Tensor

ABLATIONS = ("patching", "mean", "zero")


def _stacked(model, name: str) -> Tensor | None:
    """A bridge's stacked ``[layer head ...]`` parameter (``W_Q``, ``b_K``, ...), detached; ``None``
    where the checkpoint has none (bias-free projections: Llama's ``b_Q``, ``b_O``)."""
    try:
        value = getattr(model, name)
    except AttributeError:
        return None
    return value.detach() if isinstance(value, Tensor) else None


class RewiredRun:
    """Hook state of rewired forwards (reset at the start of each forward).

    After a forward: :meth:`activations` are the sources' outputs ``[batch pos n_src d_model]``;
    with ``track=True``, :attr:`forks` are the destinations' inputs, in destination order,
    ready for ``torch.autograd.grad``.
    """

    def __init__(self, model, graph: Graph, *, ablate: Bool[Tensor, "n_src n_dst"] | None = None,
                 reference: Tensor | None = None, track: bool = False,
                 input_value: Float[Tensor, "batch pos d_model"] | None = None,
                 reference_fn: Callable[[Tensor], Tensor] | None = None):
        self.model, self.graph, self.track, self.input_value = model, graph, track, input_value
        self.reference_fn = reference_fn
        self.busy = False  # True while a per-input reference run is being recorded
        self.arch = architecture_name(model)
        L = graph.n_layers
        device = model_device(model)
        with torch.no_grad():
            self.W = {c: _stacked(model, f"W_{c.upper()}") for c in CHANNELS}
            self.b = {c: _stacked(model, f"b_{c.upper()}") for c in CHANNELS}
            self.W_O = _stacked(model, "W_O")
            self.b_O = _stacked(model, "b_O")
        for c in CHANNELS:
            heads = self.W[c].shape[1] if self.W[c] is not None else None
            if heads != graph.channel_width(c):
                raise ValueError(f"circuits: {self.arch}'s W_{c.upper()} has {heads} heads per layer, the graph "
                                 f"{graph.channel_width(c)} {c}-inputs ({graph!r}); the graph does not match the model")
        self.ln1 = []
        for layer in range(L):
            ln = getattr(model.blocks[layer], "ln1", None)
            self.ln1.append(getattr(ln, "original_component", None) if ln is not None else None)
        if ablate is not None:
            ablate = ablate.bool().cpu() & graph.edge_mask
            if not ablate.any():
                ablate = None
        self.ablate_any = ablate.any(0).tolist() if ablate is not None else [False] * graph.n_dst
        self.ablate = ablate.to(device) if ablate is not None else None
        if self.ablate is not None and reference is None and reference_fn is None:
            raise ValueError("rewired: ablating edges needs a reference activation (patching, mean or zero)")
        self.reference = reference.to(device) if reference is not None else None
        m = 1 if graph.has_mlp else 0
        self._per_layer_dst = graph.n_heads + 2 * graph.kv_heads + m
        # sources upstream of each destination; they are a prefix of graph.sources (topological order)
        self._upstream = graph.edge_mask.sum(0).tolist()
        self._checked: set[str] = set()
        self.reset()

    # -- per-forward state -------------------------------------------------------------------------

    def reset(self) -> None:
        self.outputs: list[Tensor] = []  # each [batch pos k d_model], in source order
        self.resid: dict[int, Tensor] = {}
        self._forks: dict[int, Tensor] = {}  # first destination index -> fork tensor

    def activations(self) -> Float[Tensor, "batch pos n_src d_model"]:
        """Every source's output in the last forward."""
        return torch.cat(self.outputs, dim=2)

    @property
    def forks(self) -> list[Tensor]:
        """Destination inputs of the last tracked forward, in destination order (heads grouped per channel)."""
        return [self._forks[k] for k in sorted(self._forks)]

    def gather(self, grads: list[Tensor]) -> Float[Tensor, "batch pos n_dst d_model"]:
        """Stack per-fork gradients (as returned for :attr:`forks`) into ``[batch pos n_dst d_model]``."""
        return torch.cat([g if g.ndim == 4 else g.unsqueeze(2) for g in grads], dim=2)

    # -- hooks -------------------------------------------------------------------------------------

    def hooks(self) -> list[tuple[str, Callable]]:
        """Hook names from the site registry (:mod:`poisonmech.sites`), except the two norms'
        inputs (``blocks.{l}.ln2.hook_in``, ``ln_final.hook_in``): they are not activation sites
        of any other analysis, only where this rewiring forks the MLP's and the logits' inputs.
        (``ln2.hook_in`` is the MLP's own input in sequential and parallel blocks alike; the
        registry's ``resid_mid`` exists in sequential blocks only.)"""
        hooks = []
        for layer in range(self.graph.n_layers):
            hooks.append((hook_name("resid_pre", layer), self._resid_pre(layer)))
            for c in CHANNELS:
                hooks.append((hook_name(c, layer), self._qkv(layer, c)))
            hooks.append((hook_name("attn_head", layer), self._z(layer)))
            if self.graph.has_mlp:
                hooks.append((f"blocks.{layer}.ln2.hook_in", self._mlp_in(layer)))
                hooks.append((hook_name("mlp_out", layer), self._mlp_out(layer)))
        hooks.append(("ln_final.hook_in", self._logits_in()))
        available = self.model.hook_dict  # built anew on every access: read it once
        missing = [name for name, _ in hooks if name not in available]
        if missing:
            raise ValueError(f"circuits: {self.arch}'s bridge has no hook points {missing[:4]}; edge-level analysis "
                             "needs each block's resid_pre, hook_q/k/v, hook_z, ln2.hook_in and hook_mlp_out")
        return hooks

    def _first(self, layer: int, channel: str) -> int:
        """Index of the first destination of ``channel`` (``"q"``, ``"k"``, ``"v"``, ``"mlp"``) of ``layer``."""
        base = layer * self._per_layer_dst
        g = self.graph
        return base + {"q": 0, "k": g.n_heads, "v": g.n_heads + g.kv_heads, "mlp": g.n_heads + 2 * g.kv_heads}[channel]

    def _correction(self, first: int, n: int) -> Tensor | None:
        """Sum over ablated incoming edges of ``out(src) - ref(src)`` for destinations ``first:first+n``."""
        if self.busy or not any(self.ablate_any[first:first + n]):
            return None
        k = self._upstream[first]
        have = sum(o.shape[2] for o in self.outputs)
        if have < k:
            raise RuntimeError(f"rewired: expected {k} upstream sources, recorded {have}; "
                               f"{self.arch}'s bridge ran its hooks in an unexpected order")
        cur = torch.cat(self.outputs, dim=2)[:, :, :k]
        ref = self.reference[..., :k, :]
        delta = cur - ref.to(cur.dtype)
        mask = self.ablate[:k, first:first + n].to(cur.dtype)
        return torch.einsum("bsnd,nm->bsmd", delta, mask)

    def _resid_pre(self, layer: int):
        def hook(t: Tensor, hook=None):
            if layer == 0:
                self.reset()
                if self.busy:
                    self.outputs.append(t.unsqueeze(2))
                    self.resid[layer] = t
                    return None
                if self.input_value is not None:
                    if self.input_value.shape != t.shape:
                        raise ValueError(f"rewired: input_value has shape {tuple(self.input_value.shape)}, "
                                         f"the embeddings {tuple(t.shape)}")
                    t = self.input_value.to(t.dtype)
                if self.track:
                    t = t.detach().requires_grad_(True)
                if self.reference is not None and self.reference.ndim == 4 and self.reference.shape[:2] != t.shape[:2]:
                    raise ValueError(f"ablation='patching' needs inputs of the reference tokens' shape "
                                     f"[batch pos]={list(self.reference.shape[:2])}, got {list(t.shape[:2])}; "
                                     "use ablation='mean' or 'zero' for inputs of other shapes")
                self.outputs.append(t.unsqueeze(2))
            self.resid[layer] = t
            return t
        return hook

    def _qkv(self, layer: int, c: str):
        n = self.graph.channel_width(c)  # n_heads for q; key/value heads for k and v
        first = self._first(layer, c)
        key = f"{layer}{c}"

        def hook(t: Tensor, hook=None):
            corr = self._correction(first, n)
            if corr is None and (self.busy or not self.track) and key in self._checked:
                return None
            X = self.resid[layer].unsqueeze(2).repeat(1, 1, n, 1)
            if key not in self._checked:
                with torch.no_grad():
                    self._check(key, self._project(layer, c, X), t)
            if corr is not None:
                X = X - corr
            if self.track and not self.busy:
                self._forks[first] = X
            return self._project(layer, c, X).to(t.dtype)
        return hook

    def _project(self, layer: int, c: str, X: Float[Tensor, "batch pos head d_model"]) -> Tensor:
        """Per-head ``ln1`` then ``W_{c}`` (and ``b_{c}``, where the model has one) of layer ``layer``:
        ``[batch pos head d_model] -> [batch pos head d_head]`` (key/value heads for k and v)."""
        B, S, H, D = X.shape
        ln = self.ln1[layer]
        Y = ln(X.reshape(B * S * H, D)).reshape(B, S, H, D) if ln is not None else X
        out = torch.einsum("bshd,hde->bshe", Y, self.W[c][layer].to(Y.dtype))
        return out + self.b[c][layer].to(Y.dtype) if self.b[c] is not None else out

    def _check(self, key: str, rebuilt: Tensor, original: Tensor) -> None:
        """On first use, make sure a rebuilt q / k / v equals the bridge's own (same weights, same norm)."""
        if rebuilt.shape != original.shape:
            raise ValueError(f"circuits: {self.arch}'s hook_{key[-1]} has shape {tuple(original.shape)}, expected "
                             f"[batch pos heads d_head]={tuple(rebuilt.shape)}; edge-level analysis rebuilds each "
                             "head input from the residual stream and cannot handle this bridge")
        rel = 1e-3 if original.dtype in (torch.float32, torch.float64) else 3e-2  # half precision rounds more
        tol = rel * float(original.detach().abs().max()) + 1e-5
        err = float((rebuilt.detach() - original.detach()).abs().max())
        if err > tol:
            raise ValueError(
                f"circuits: rebuilding layer {key[:-1]}'s {key[-1]} from the residual stream with ln1 and "
                f"W_{key[-1].upper()} differs from {self.arch}'s own by {err:.3g}; this bridge (e.g. processed "
                "weights, fold_ln, a norm the bridge does not expose as ln1) is not supported for edge-level analysis")
        self._checked.add(key)

    def _z(self, layer: int):
        def hook(z: Tensor, hook=None):
            self.outputs.append(torch.einsum("bshe,hed->bshd", z, self.W_O[layer].to(z.dtype)))
        return hook

    def _check_mlp_input(self, layer: int, t: Tensor) -> None:
        """On first use, make sure the MLP reads what the graph says: the block's input (parallel
        blocks) or the block's input plus its attention output (sequential blocks). A wrong
        ``parallel`` flag would silently give wrong edges, so a mismatch is an error."""
        expected = self.resid[layer]
        if not self.graph.parallel:
            H = self.graph.n_heads
            heads = torch.cat(self.outputs, dim=2)[:, :, self._upstream[self._first(layer, "q")]:][:, :, :H]
            expected = expected + heads.sum(2)
            if self.b_O is not None:
                expected = expected + self.b_O[layer].to(expected.dtype)
        tol = (1e-3 if t.dtype in (torch.float32, torch.float64) else 3e-2) * float(t.detach().abs().max()) + 1e-5
        err = float((expected.detach() - t.detach()).abs().max())
        if err > tol:
            kind, reads = (("parallel", "the block's input") if self.graph.parallel
                           else ("sequential", "the block's input plus its attention output"))
            raise ValueError(f"circuits: the graph has {kind} blocks (the MLP of layer {layer} reads {reads}), but "
                             f"{self.arch}'s MLP input differs from that by {err:.3g}; the bridge's "
                             "cfg.parallel_attn_mlp does not describe this model")
        self._checked.add(f"{layer}mlp")

    def _mlp_in(self, layer: int):
        first = self._first(layer, "mlp")

        def hook(t: Tensor, hook=None):
            if f"{layer}mlp" not in self._checked and not self.busy:
                with torch.no_grad():
                    self._check_mlp_input(layer, t)
            return self._fork(first, t)
        return hook

    def _mlp_out(self, layer: int):
        def hook(t: Tensor, hook=None):
            self.outputs.append(t.unsqueeze(2))
        return hook

    def _logits_in(self):
        first = self.graph.n_dst - 1

        def hook(t: Tensor, hook=None):
            return self._fork(first, t)
        return hook

    def _reference_pre_hook(self, module, args, kwargs):
        """Before each outer forward: run ``reference_fn(tokens)`` and keep its activations as the reference."""
        if self.busy:
            return None
        tokens = args[0] if args else kwargs.get("input")
        if not isinstance(tokens, torch.Tensor):
            raise ValueError("a per-input reference (a function of the tokens) needs token-id tensors as the "
                             f"model's input, got {type(tokens).__name__}")
        corrupted = self.reference_fn(tokens)
        if not isinstance(corrupted, torch.Tensor) or corrupted.shape != tokens.shape:
            shape = tuple(corrupted.shape) if isinstance(corrupted, torch.Tensor) else type(corrupted).__name__
            raise ValueError(f"reference function must return token ids of the input's shape {tuple(tokens.shape)}, "
                             f"got {shape}")
        self.busy = True
        try:
            with torch.no_grad():
                module(corrupted.to(tokens.device))
            self.reference = self.activations().detach()
        finally:
            self.busy = False
        return None

    def _fork(self, first: int, t: Tensor) -> Tensor | None:
        corr = self._correction(first, 1)
        if corr is None and (self.busy or not self.track):
            return None
        X = t.clone() if corr is None else t - corr[:, :, 0].to(t.dtype)
        if self.track and not self.busy:
            self._forks[first] = X
        return X


@contextmanager
def rewired(model, graph: Graph | None = None, *, ablate: Bool[Tensor, "n_src n_dst"] | None = None,
            reference: Tensor | None = None, track: bool = False,
            input_value: Float[Tensor, "batch pos d_model"] | None = None,
            reference_fn: Callable[[Tensor], Tensor] | None = None) -> Iterator[RewiredRun]:
    """Run ``model``'s forwards as rewired passes (see the module docstring) inside the block.

    Args:
        graph: the model's :class:`Graph` (default: ``Graph.from_model(model)``).
        ablate: ``[n_src n_dst]`` mask of edges to ablate.
        reference: what an ablated edge carries instead: ``[batch pos n_src d_model]`` (a
            corrupted run: inputs must then have that batch and length) or ``[n_src d_model]``
            (a mean, or zeros: any input shape).
        track: keep the destinations' inputs for gradients.
        input_value: replace the embeddings (the ``input`` node's output), e.g. to interpolate.
        reference_fn: instead of ``reference``, a function mapping each forward's input tokens to
            token-aligned corrupted tokens; their activations, from an extra forward just before,
            are the reference (patching when the inputs are not known in advance).

    The model is put in eval mode and restored on exit; every hook is removed on exit, also
    when the block raises.
    """
    graph = graph or Graph.from_model(model)
    run = RewiredRun(model, graph, ablate=ablate, reference=reference, track=track, input_value=input_value,
                     reference_fn=reference_fn)
    handle = None
    with eval_mode(model):
        try:
            if reference_fn is not None:
                handle = model.register_forward_pre_hook(run._reference_pre_hook, with_kwargs=True)
            with model.hooks(fwd_hooks=run.hooks()):
                yield run
        finally:
            if handle is not None:
                handle.remove()


@torch.no_grad()
def source_activations(model, graph: Graph, tokens: Int[Tensor, "batch pos"]
                       ) -> tuple[Float[Tensor, "batch pos n_src d_model"], Float[Tensor, "batch pos d_vocab"]]:
    """Every source's output on ``tokens`` (and the logits), from one plain forward."""
    with rewired(model, graph) as run:
        logits = model(tokens)
    return run.activations(), logits


def reference_activations(model, graph: Graph, tokens, ablation: str, *, d_model: int | None = None) -> Tensor:
    """What ablated edges carry: the sources' outputs on ``tokens`` (``"patching"``), their mean
    over batch and positions (``"mean"``, a ``[n_src d_model]`` vector per source; ``tokens`` may be
    a list of batches of different lengths) or zeros (``"zero"``)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "zero":
        d = d_model or int(model.cfg.d_model)
        p = next(model.parameters())
        return torch.zeros(graph.n_src, d, device=p.device, dtype=p.dtype)
    if tokens is None:
        raise ValueError(f"ablation={ablation!r} needs reference tokens (the corrupted batch); "
                         "pass them, or use ablation='zero'")
    if isinstance(tokens, (list, tuple)):
        if ablation == "patching":
            raise ValueError("ablation='patching' takes one [batch pos] batch of reference tokens (or a function "
                             "of the input tokens), not a list")
        total, count = None, 0
        for t in tokens:
            acts, _ = source_activations(model, graph, t)
            s = acts.sum(dim=(0, 1))
            total = s if total is None else total + s
            count += acts.shape[0] * acts.shape[1]
        if total is None:
            raise ValueError("reference tokens: the list of batches is empty")
        return total / count
    acts, _ = source_activations(model, graph, tokens)
    return acts if ablation == "patching" else acts.mean(dim=(0, 1))
