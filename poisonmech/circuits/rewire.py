"""Rewired forward passes: the bridge's own forward, with every graph edge made explicit.

One forward of a ``TransformerBridge`` under :func:`rewired` computes exactly what the model
computes, but every destination's input is rebuilt from the residual stream so that each
edge can be touched on its own:

- a head's q / k / v input is a per-head copy ("fork") of the block's pre-norm residual
  stream, normed with the block's own ``ln1`` and projected with that head's ``W_Q`` / ``W_K``
  / ``W_V`` (hook points ``blocks.{l}.hook_resid_pre`` and ``blocks.{l}.attn.hook_{q,k,v}``,
  the registry's ``resid_pre`` and ``q`` / ``k`` / ``v`` sites);
- the MLP's input is a copy of the residual stream going into ``ln2``
  (``blocks.{l}.ln2.hook_in``, which leaves the residual skip connection alone);
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
from poisonmech.sites import hook_name

Tensor = torch.Tensor

ABLATIONS = ("patching", "mean", "zero")


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
        H, L = graph.n_heads, graph.n_layers
        device = model_device(model)
        with torch.no_grad():
            self.W = {"q": model.W_Q.detach(), "k": model.W_K.detach(), "v": model.W_V.detach()}
            self.b = {"q": model.b_Q.detach(), "k": model.b_K.detach(), "v": model.b_V.detach()}
            self.W_O = model.W_O.detach()
        if self.W["k"].shape[1] != H or self.W["q"].shape[1] != H:
            raise NotImplementedError(f"circuits: W_Q / W_K have {self.W['q'].shape[1]} / {self.W['k'].shape[1]} "
                                      f"heads, the graph {H}; grouped-query attention is not supported")
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
        self._per_layer_src = H + m
        self._per_layer_dst = 3 * H + m
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
        of any other analysis, only where this rewiring forks the MLP's and the logits' inputs."""
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
        return hooks

    def _n_upstream(self, dst: int) -> int:
        """Number of sources upstream of destination index ``dst`` (sources are a prefix)."""
        if dst == self.graph.n_dst - 1:
            return self.graph.n_src
        layer, r = divmod(dst, self._per_layer_dst)
        return 1 + layer * self._per_layer_src + (self.graph.n_heads if r >= 3 * self.graph.n_heads else 0)

    def _correction(self, first: int, n: int) -> Tensor | None:
        """Sum over ablated incoming edges of ``out(src) - ref(src)`` for destinations ``first:first+n``."""
        if self.busy or not any(self.ablate_any[first:first + n]):
            return None
        k = self._n_upstream(first)
        have = sum(o.shape[2] for o in self.outputs)
        if have < k:
            raise RuntimeError(f"rewired: expected {k} upstream sources, recorded {have}; "
                               "the bridge ran its hooks in an unexpected order")
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
        H = self.graph.n_heads
        first = layer * self._per_layer_dst + CHANNELS.index(c) * H
        key = f"{layer}{c}"

        def hook(t: Tensor, hook=None):
            corr = self._correction(first, H)
            if corr is None and (self.busy or not self.track) and key in self._checked:
                return None
            X = self.resid[layer].unsqueeze(2).repeat(1, 1, H, 1)
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
        """Per-head ``ln1`` then ``W_{c}`` of layer ``layer``: ``[batch pos head d_model] -> [batch pos head d_head]``."""
        B, S, H, D = X.shape
        ln = self.ln1[layer]
        Y = ln(X.reshape(B * S * H, D)).reshape(B, S, H, D) if ln is not None else X
        return torch.einsum("bshd,hde->bshe", Y, self.W[c][layer].to(Y.dtype)) + self.b[c][layer].to(Y.dtype)

    def _check(self, key: str, rebuilt: Tensor, original: Tensor) -> None:
        """On first use, make sure a rebuilt q / k / v equals the bridge's own (same weights, same norm)."""
        if rebuilt.shape != original.shape:
            raise NotImplementedError(f"circuits: the bridge's hook_{key[-1]} has shape {tuple(original.shape)}, "
                                      f"expected [batch pos n_heads d_head]={tuple(rebuilt.shape)}")
        rel = 1e-3 if original.dtype in (torch.float32, torch.float64) else 3e-2  # half precision rounds more
        tol = rel * float(original.detach().abs().max()) + 1e-5
        err = float((rebuilt.detach() - original.detach()).abs().max())
        if err > tol:
            raise NotImplementedError(
                f"circuits: rebuilding layer {key[:-1]}'s {key[-1]} from the residual stream with ln1 and W_{key[-1].upper()} "
                f"differs from the bridge's own by {err:.3g}; this bridge (e.g. processed weights, fold_ln) is not "
                "supported for edge-level analysis")
        self._checked.add(key)

    def _z(self, layer: int):
        def hook(z: Tensor, hook=None):
            self.outputs.append(torch.einsum("bshe,hed->bshd", z, self.W_O[layer].to(z.dtype)))
        return hook

    def _mlp_in(self, layer: int):
        first = layer * self._per_layer_dst + 3 * self.graph.n_heads

        def hook(t: Tensor, hook=None):
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
