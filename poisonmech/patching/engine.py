"""The exact patching engine: recompute only what a patch can change.

A patch at layer ``l`` and position ``p`` leaves every layer before ``l`` as in the run being
patched into, and, under causal attention, every position before ``p`` in every layer. So
each cell resumes the forward pass at its own layer, on the position suffix ``p:`` only,
reading the unchanged prefix keys and values from the base run's cache; in the last layer
only the positions the metric reads are computed. Cells that share (layer, stage, start
position) are stacked into one batched pass, chunked to a memory budget.

This is written by hand (TransformerLens' ``patching.py`` runs one full forward per cell):
the residual-stream arithmetic below uses the bridge's own weights (``W_Q`` ... ``W_O``)
and its own norm / MLP / unembed modules, and :func:`fast_path_error` checks it against the
bridge's real forward before it is trusted; bridges it does not reproduce (rotary, grouped
KV, soft-capping) are patched with stacked hooked forwards instead (``_hooked_values`` in ``activation.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float

from poisonmech.patching.config import SITES  # every site of the one registry, poisonmech.sites
from poisonmech.sites import MLP_SITES, hook_name

Tensor = torch.Tensor

_ACTS = {
    "gelu": torch.nn.functional.gelu,
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
}


@dataclass
class RunCache:
    """Per-layer activations of one run (lists indexed by layer)."""

    acts: dict[str, list[Tensor]]
    logits: Tensor

    def __getitem__(self, key: str) -> list[Tensor]:
        return self.acts[key]


def collect(model, tokens: Tensor, sites: tuple[str, ...] = SITES) -> RunCache:
    """One forward with a cache of just the hooks the engine reads."""
    n_layers = model.cfg.n_layers
    names = {hook_name(s, layer): (s, layer) for s in sites for layer in range(n_layers)
             if not (model.cfg.attn_only and s in MLP_SITES)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    acts: dict[str, list] = {s: [None] * n_layers for s in sites}
    for name, (s, layer) in names.items():
        acts[s][layer] = cache[name].detach()
    if model.cfg.attn_only:  # no MLP: resid_mid is resid_post, the MLP adds nothing
        acts["resid_mid"] = list(acts["resid_post"]) if "resid_post" in acts else acts.get("resid_mid", [])
        acts["mlp_out"] = [torch.zeros_like(a) for a in acts["resid_post"]] if "resid_post" in acts else []
    return RunCache(acts=acts, logits=logits.detach())


class Engine:
    """Suffix forward passes over a bridge's weights, for stacks of patched cells."""

    def __init__(self, model):
        self.model = model
        cfg = model.cfg
        self.n_layers, self.n_heads, self.attn_only = cfg.n_layers, cfg.n_heads, bool(cfg.attn_only)
        self.d_head = cfg.d_head
        H, dh = self.n_heads, self.d_head
        with torch.no_grad():
            # [H d dh] -> [d H*dh]: one matmul per projection instead of a per-head einsum
            fuse = lambda W: W.detach().permute(0, 2, 1, 3).reshape(W.shape[0], W.shape[2], H * dh)  # noqa: E731
            self.W_Q, self.W_K, self.W_V = fuse(model.W_Q), fuse(model.W_K), fuse(model.W_V)
            self.b_Q, self.b_K, self.b_V = (b.detach().reshape(b.shape[0], H * dh) for b in (model.b_Q, model.b_K, model.b_V))
            self.W_O = model.W_O.detach()  # [L H dh d]
            self.W_O_flat = self.W_O.reshape(self.n_layers, H * dh, -1)
            self.b_O = model.b_O.detach()
        self.scale = math.sqrt(self.d_head)
        # The wrapped modules themselves: the bridge's wrappers add hook dispatch per call,
        # which dominates the tiny suffix passes. fast_path_error() checks the result.
        raw = lambda m: getattr(m, "original_component", None) or m  # noqa: E731
        self.ln1 = [raw(b.ln1) for b in model.blocks]
        self.ln2 = [raw(b.ln2) if not self.attn_only else None for b in model.blocks]
        self.mlp = [raw(b.mlp) if not self.attn_only else None for b in model.blocks]
        self.ln_final, self.unembed = raw(model.ln_final), raw(model.unembed)
        # MLP from weights when the activation is a known pointwise one (else the module)
        self.act = _ACTS.get(getattr(cfg, "act_fn", None)) if not getattr(cfg, "gated_mlp", False) else None
        if self.act is not None and not self.attn_only:
            with torch.no_grad():
                self.W_in, self.b_in = model.W_in.detach(), model.b_in.detach()
                self.W_out, self.b_out = model.W_out.detach(), model.b_out.detach()

    # ------------------------------------------------------------------ pieces
    def proj(self, x: Tensor, layer: int, which: str) -> Tensor:
        """``[... d_model] -> [... H dh]`` query/key/value projection."""
        W, b = {"q": (self.W_Q, self.b_Q), "k": (self.W_K, self.b_K), "v": (self.W_V, self.b_V)}[which]
        return (x @ W[layer] + b[layer]).unflatten(-1, (self.n_heads, self.d_head))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor) -> Tensor:
        """Causal attention. ``q [R Tq H dh]`` at absolute positions ``q_pos [R Tq]``; ``k, v [R Tk H dh]``."""
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / self.scale  # [R H Tq Tk]
        keys = torch.arange(k.shape[1], device=k.device)
        mask = keys[None, None, None, :] > q_pos[:, None, :, None]
        pattern = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return (pattern @ v.transpose(1, 2)).transpose(1, 2)  # [R Tq H dh]

    def head_out(self, z: Tensor, layer: int, head: int | None = None) -> Tensor:
        """Attention output (without ``b_O``) of ``z``: one head's ``[..., dh]`` or all heads' ``[..., H, dh]``."""
        if head is None:
            return z.flatten(-2) @ self.W_O_flat[layer]
        return z @ self.W_O[layer, head]

    def _mlp(self, x: Tensor, layer: int) -> Tensor:
        if self.attn_only:
            return torch.zeros_like(x)
        h = self.ln2[layer](x)
        if self.act is not None:
            return self.act(h @ self.W_in[layer] + self.b_in[layer]) @ self.W_out[layer] + self.b_out[layer]
        out = self.mlp[layer](h)
        return out[0] if isinstance(out, tuple) else out

    def _unembed(self, x: Tensor) -> Tensor:
        out = self.unembed(self.ln_final(x))
        return out[0] if isinstance(out, tuple) else out

    # ------------------------------------------------------------------ the resume pass
    @torch.no_grad()
    def resume(self, x: Float[Tensor, "R suffix d_model"], layer: int, stage: str, start: int, base: RunCache,
               n_cells: int, q_pos: Tensor | None) -> Tensor:
        """Continue the forward pass from ``(layer, stage)`` on positions ``start:``.

        ``x`` holds the residual stream at that point for positions ``start:``, rows ordered
        cell-major (row ``c * N + n``). ``stage`` is ``"pre"`` (before attention), ``"mid"``
        (before the MLP) or ``"final"`` (after the last layer). With ``q_pos [R]`` only those
        positions' logits are computed (``[R d_vocab]``); otherwise all positions' (``[R pos d_vocab]``).
        """
        rep = lambda t: t.repeat(n_cells, *([1] * (t.ndim - 1)))  # noqa: E731  [N ...] -> [C*N ...]
        s = start
        layers = range(layer, self.n_layers) if stage != "final" else range(0)
        for l in layers:
            last = l == self.n_layers - 1 and q_pos is not None
            if not (l == layer and stage == "mid"):
                h = self.ln1[l](x)
                k = torch.cat([rep(base["k"][l][:, :s]), self.proj(h, l, "k")], 1)
                v = torch.cat([rep(base["v"][l][:, :s]), self.proj(h, l, "v")], 1)
                if last:
                    rows = torch.arange(x.shape[0], device=x.device)
                    inside = q_pos >= s
                    xq = torch.where(inside[:, None], x[rows, (q_pos - s).clamp(min=0)],
                                     rep(base["resid_pre"][l])[rows, q_pos])
                    q = self.proj(self.ln1[l](xq[:, None]), l, "q")
                    z = self.attend(q, k, v, q_pos[:, None])
                    xq = xq[:, None] + self.head_out(z, l) + self.b_O[l]
                    xq = xq + self._mlp(xq, l)
                    return self._unembed(xq)[:, 0]
                q = self.proj(h, l, "q")
                q_abs = torch.arange(s, s + x.shape[1], device=x.device).expand(x.shape[0], -1)
                x = x + self.head_out(self.attend(q, k, v, q_abs), l) + self.b_O[l]
            x = x + self._mlp(x, l)
        if q_pos is not None:  # stage "final" with a positional metric
            rows = torch.arange(x.shape[0], device=x.device)
            inside = q_pos >= s
            xf = torch.where(inside[:, None], x[rows, (q_pos - s).clamp(min=0)],
                             rep(base["resid_post"][self.n_layers - 1])[rows, q_pos])
            return self._unembed(xf)
        full = torch.cat([rep(base["resid_post"][self.n_layers - 1][:, :s]), x], 1)
        return self._unembed(full)


def fast_path_error(model, engine: Engine, base: RunCache, n_check: int = 4) -> float:
    """Largest |logit| difference between the engine's full pass and the bridge's forward
    (on the first ``n_check`` examples: enough to catch an architecture it does not reproduce)."""
    sub = RunCache(acts={k: [t[:n_check] if t is not None else None for t in v] for k, v in base.acts.items()},
                   logits=base.logits[:n_check])
    out = engine.resume(sub["resid_pre"][0], 0, "pre", 0, sub, 1, None)
    return float((out - sub.logits).abs().max())
