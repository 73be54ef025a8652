"""The exact patching engine: recompute only what a patch can change.

A patch at layer ``l`` and position ``p`` leaves every layer before ``l`` as in the run being
patched into, and, under causal attention, every position before ``p`` in every layer. So
each cell resumes the forward pass at its own layer, on the position suffix ``p:`` only,
reading the unchanged prefix keys and values from the base run's cache; in the last layer
only the positions the metric reads are computed. Cells that share (layer, stage, start
position) are stacked into one batched pass, chunked to a memory budget.

This is written by hand (TransformerLens' ``patching.py`` runs one full forward per cell):
the residual-stream arithmetic below uses the bridge's own weights (``W_Q`` ... ``W_O``)
and its own norm / MLP / unembed modules. It knows the blocks of the common decoder
families: sequential (GPT-2, Llama, Qwen2) and parallel residual (GPT-NeoX / Pythia:
attention and MLP both read ``resid_pre``), LayerNorm or RMSNorm, plain or gated MLPs,
projections with or without biases (a missing bias is zero), grouped-query attention
(each key / value head serves ``n_heads / n_key_value_heads`` query heads, as HF's
``repeat_kv``) and rotary embeddings (rotate-half, full or partial, with the cos / sin the
bridge itself fires at ``attn.hook_cos`` / ``hook_sin``). :func:`unsupported` refuses, before
anything is built, what it does not know; :func:`fast_path_error` then checks the engine
against the bridge's real forward before it is trusted; refused or failing bridges are
patched with stacked hooked forwards instead (``_hooked_values`` in ``activation.py``).
"""

from __future__ import annotations

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

#: what a rotary bridge fires per layer: the cos / sin its attention rotates q and k with
ROTARY_HOOKS = {"cos": "blocks.{layer}.attn.hook_cos", "sin": "blocks.{layer}.attn.hook_sin"}
#: the attention bridges whose rotary convention the engine reproduces (rotate-half on the
#: first ``cos.shape[-1]`` dimensions of each head; TransformerLens 4's RoPE bridges)
_ROTARY_BRIDGES = ("PositionEmbeddingsAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge")


def _raw(module):
    """The wrapped module itself: the bridge's wrappers add hook dispatch per call, which
    dominates the tiny suffix passes (fast_path_error() checks the result)."""
    inner = getattr(module, "original_component", None)
    return inner if inner is not None else module


def _param(model, name: str) -> Tensor | None:
    """A stacked bridge parameter (``model.b_Q`` ...), ``None`` where the checkpoint has none
    (TransformerLens raises AttributeError for a bias-free projection)."""
    try:
        value = getattr(model, name)
    except AttributeError:
        return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def unsupported(model) -> str | None:
    """Why the engine cannot reproduce ``model``'s blocks (one sentence), or ``None``.

    Checked before an :class:`Engine` is built, so nothing it would build can fail on an
    architecture it does not know; what passes is still checked numerically by
    :func:`fast_path_error`.
    """
    cfg = model.cfg
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "W_Q"):
        return "it exposes no stacked blocks / weights (W_Q ...)"
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    if n_heads % n_kv:
        return f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}"
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        if _param(model, name) is None:
            return f"it has no {name}"
    if getattr(cfg, "gated_mlp", False) is False and not cfg.attn_only and \
            _ACTS.get(getattr(cfg, "act_fn", None)) is not None and \
            (_param(model, "W_in") is None or _param(model, "W_out") is None):
        return "its MLP exposes no W_in / W_out"
    if cfg.positional_embedding_type == "rotary":
        attn = type(blocks[0].attn).__name__
        if attn not in _ROTARY_BRIDGES:
            return f"its rotary attention ({attn}) fires no cos / sin hooks the engine can read"
        for flag in ("rotary_adjacent_pairs", "rotary_interleaved_cos_sin"):
            if getattr(cfg, flag, False):
                return f"its rotary embedding rotates adjacent pairs ({flag}); the engine rotates halves"
        hooks = model.hook_dict  # a property that rebuilds its aliases on every read
        missing = [t.format(layer=layer) for layer in range(cfg.n_layers) for t in ROTARY_HOOKS.values()
                   if t.format(layer=layer) not in hooks]
        if missing:
            return f"it fires no rotary cos / sin hook ({missing[0]})"
    elif cfg.positional_embedding_type not in ("standard", "shortformer"):
        return f"positional_embedding_type={cfg.positional_embedding_type!r}"
    hf = getattr(getattr(model, "original_model", None), "config", None)
    if hf is not None:
        kinds = set(getattr(hf, "layer_types", None) or ())
        if getattr(hf, "use_sliding_window", False) or any("sliding" in str(k) for k in kinds):
            return "it uses sliding-window attention"
        if getattr(hf, "attn_logit_softcapping", None) or getattr(hf, "final_logit_softcapping", None):
            return "it soft-caps attention or final logits"
    return None


@dataclass
class RunCache:
    """Per-layer activations of one run (lists indexed by layer)."""

    acts: dict[str, list[Tensor]]
    logits: Tensor

    def __getitem__(self, key: str) -> list[Tensor]:
        return self.acts[key]


def collect(model, tokens: Tensor, sites: tuple[str, ...] = SITES, rotary: bool = False) -> RunCache:
    """One forward with a cache of just the hooks the engine reads (those the model has:
    ``resid_mid`` of a parallel-residual block is simply absent). ``rotary=True`` also keeps
    each layer's rotary ``cos`` / ``sin``."""
    n_layers = model.cfg.n_layers
    hooks = model.hook_dict
    names = {hook_name(s, layer): (s, layer) for s in sites for layer in range(n_layers)
             if not (model.cfg.attn_only and s in MLP_SITES) and hook_name(s, layer) in hooks}
    if rotary:
        names.update({t.format(layer=layer): (key, layer) for key, t in ROTARY_HOOKS.items()
                      for layer in range(n_layers) if t.format(layer=layer) in hooks})
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    acts: dict[str, list] = {s: [None] * n_layers for s in {s for s, _ in names.values()}}
    for name, (s, layer) in names.items():
        acts[s][layer] = cache[name].detach()
    if model.cfg.attn_only:  # no MLP: resid_mid is resid_post, the MLP adds nothing
        acts["resid_mid"] = list(acts["resid_post"]) if "resid_post" in acts else acts.get("resid_mid", [])
        acts["mlp_out"] = [torch.zeros_like(a) for a in acts["resid_post"]] if "resid_post" in acts else []
    return RunCache(acts=acts, logits=logits.detach())


def rotate(x: Float[Tensor, "R T head d_head"], cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, rotate-half convention (HF Llama / GPT-NeoX), on the first
    ``cos.shape[-1]`` dimensions of each head (partial rotary leaves the rest): ``cos`` and
    ``sin`` are ``[R or 1, T, rot]``, one row per position of ``x``."""
    rot = cos.shape[-1]
    c, s = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    xr, xp = x[..., :rot], x[..., rot:]
    half = torch.cat((-xr[..., rot // 2:], xr[..., :rot // 2]), -1)
    return torch.cat((xr * c + half * s, xp), -1)


def attention_scale(model, layer: int) -> float:
    """The factor the bridge multiplies ``q . k`` by: the HF attention's own ``scaling`` for
    TransformerLens' RoPE-attention bridge (it reads it the same way), else ``d_head ** -0.5``."""
    attn = model.blocks[layer].attn
    default = model.cfg.d_head ** -0.5
    if type(attn).__name__ == "PositionEmbeddingsAttentionBridge":
        value = getattr(_raw(attn), "scaling", default)
        return float(value) if isinstance(value, (int, float)) else default
    return default


class Engine:
    """Suffix forward passes over a bridge's weights, for stacks of patched cells.

    Build it only for a model :func:`unsupported` accepts.
    """

    def __init__(self, model):
        self.model = model
        cfg = model.cfg
        self.n_layers, self.n_heads, self.attn_only = cfg.n_layers, cfg.n_heads, bool(cfg.attn_only)
        self.n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
        self.group = self.n_heads // self.n_kv  # query heads per key / value head
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.d_head = cfg.d_head
        L, H, Hkv, dh = self.n_layers, self.n_heads, self.n_kv, self.d_head
        with torch.no_grad():
            # [L heads d dh] -> [L d heads*dh]: one matmul per projection instead of a per-head einsum
            fuse = lambda W: W.detach().permute(0, 2, 1, 3).reshape(W.shape[0], W.shape[2], -1)  # noqa: E731
            self.W_Q, self.W_K, self.W_V = fuse(model.W_Q), fuse(model.W_K), fuse(model.W_V)
            zeros = lambda n: self.W_Q.new_zeros(L, n)  # noqa: E731  (a bias-free projection)
            flat = lambda b, n: zeros(n) if b is None else b.reshape(L, n)  # noqa: E731
            self.b_Q = flat(_param(model, "b_Q"), H * dh)
            self.b_K, self.b_V = flat(_param(model, "b_K"), Hkv * dh), flat(_param(model, "b_V"), Hkv * dh)
            self.W_O = model.W_O.detach()  # [L H dh d]
            self.W_O_flat = self.W_O.reshape(L, H * dh, -1)
            b_O = _param(model, "b_O")
            self.b_O = zeros(self.W_O.shape[-1]) if b_O is None else b_O
        self.scale = [attention_scale(model, layer) for layer in range(L)]
        self.ln1 = [_raw(b.ln1) for b in model.blocks]
        self.ln2 = [_raw(b.ln2) if not self.attn_only else None for b in model.blocks]
        self.mlp = [_raw(b.mlp) if not self.attn_only else None for b in model.blocks]
        self.ln_final, self.unembed = _raw(model.ln_final), _raw(model.unembed)
        # MLP from weights when the activation is a known pointwise one (else the module:
        # gated MLPs, unknown activations)
        self.act = _ACTS.get(getattr(cfg, "act_fn", None)) if not getattr(cfg, "gated_mlp", False) else None
        if self.act is not None and not self.attn_only:
            with torch.no_grad():
                self.W_in, self.W_out = model.W_in.detach(), model.W_out.detach()
                b_in, b_out = _param(model, "b_in"), _param(model, "b_out")
                self.b_in = self.W_in.new_zeros(L, self.W_in.shape[-1]) if b_in is None else b_in
                self.b_out = self.W_out.new_zeros(L, self.W_out.shape[-1]) if b_out is None else b_out

    # ------------------------------------------------------------------ pieces
    def heads_of(self, which: str) -> int:
        """Heads of ``q`` (``n_heads``) or of ``k`` / ``v`` (``n_key_value_heads``)."""
        return self.n_heads if which == "q" else self.n_kv

    def expand_kv(self, t: Float[Tensor, "R T Hkv dh"]) -> Float[Tensor, "R T H dh"]:
        """Key / value heads repeated for their query heads (grouped-query attention: query
        head ``h`` reads key / value head ``h // group``, as HF's ``repeat_kv``)."""
        return t.repeat_interleave(self.group, dim=2) if self.group > 1 else t

    def proj(self, x: Tensor, layer: int, which: str) -> Tensor:
        """``[... d_model] -> [... heads dh]`` query/key/value projection (before any rotary)."""
        W, b = {"q": (self.W_Q, self.b_Q), "k": (self.W_K, self.b_K), "v": (self.W_V, self.b_V)}[which]
        return (x @ W[layer] + b[layer]).unflatten(-1, (self.heads_of(which), self.d_head))

    def _rotary_rows(self, base: RunCache, layer: int, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos / sin ``[R, T, rot]`` at absolute positions ``pos [R, T]`` (row ``r`` is example
        ``r % N``, the cell-major order of the stacked passes)."""
        cos, sin = base["cos"][layer], base["sin"][layer]  # [1 or N, T_base, rot]
        if cos.shape[0] == 1:
            return cos[0][pos], sin[0][pos]
        ex = torch.arange(pos.shape[0], device=pos.device) % cos.shape[0]
        return cos[ex[:, None], pos], sin[ex[:, None], pos]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, layer: int, base: RunCache) -> Tensor:
        """Causal attention of layer ``layer``. ``q [R Tq H dh]`` (before rotary) at absolute
        positions ``q_pos [R Tq]``; ``k, v [R Tk Hkv dh]`` (``k`` before rotary) at positions
        ``0 .. Tk-1``. Returns ``z [R Tq H dh]``."""
        if self.rotary:
            keys_pos = torch.arange(k.shape[1], device=k.device).expand(k.shape[0], -1)
            q = rotate(q, *self._rotary_rows(base, layer, q_pos))
            k = rotate(k, *self._rotary_rows(base, layer, keys_pos))
        k, v = self.expand_kv(k), self.expand_kv(v)
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * self.scale[layer]  # [R H Tq Tk]
        keys = torch.arange(k.shape[1], device=k.device)
        mask = keys[None, None, None, :] > q_pos[:, None, :, None]
        pattern = scores.float().masked_fill(mask, float("-inf")).softmax(-1).to(v.dtype)
        return (pattern @ v.transpose(1, 2)).transpose(1, 2)  # [R Tq H dh]

    def head_out(self, z: Tensor, layer: int, head: int | None = None) -> Tensor:
        """Attention output (without ``b_O``) of ``z``: one head's ``[..., dh]`` or all heads' ``[..., H, dh]``."""
        if head is None:
            return z.flatten(-2) @ self.W_O_flat[layer]
        return z @ self.W_O[layer, head]

    def _mlp(self, x: Tensor, layer: int) -> Tensor:
        """The MLP's output for residual ``x`` (its norm included)."""
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

    def _block(self, x: Tensor, attn: Tensor, layer: int) -> Tensor:
        """The residual after block ``layer`` from its input ``x`` and attention output ``attn``:
        ``x + attn + mlp(x)`` for a parallel block, ``mid + mlp(mid)`` with ``mid = x + attn`` else."""
        if self.parallel:
            return x + attn + self._mlp(x, layer)
        mid = x + attn
        return mid + self._mlp(mid, layer)

    # ------------------------------------------------------------------ the resume pass
    @torch.no_grad()
    def resume(self, x: Float[Tensor, "R suffix d_model"], layer: int, stage: str, start: int, base: RunCache,
               n_cells: int, q_pos: Tensor | None) -> Tensor:
        """Continue the forward pass from ``(layer, stage)`` on positions ``start:``.

        ``x`` holds the residual stream at that point for positions ``start:``, rows ordered
        cell-major (row ``c * N + n``). ``stage`` is ``"pre"`` (before attention), ``"mid"``
        (before the MLP of a sequential block) or ``"final"`` (after the last layer). With
        ``q_pos [R]`` only those positions' logits are computed (``[R d_vocab]``); otherwise
        all positions' (``[R pos d_vocab]``).
        """
        rep = lambda t: t.repeat(n_cells, *([1] * (t.ndim - 1)))  # noqa: E731  [N ...] -> [C*N ...]
        s = start
        layers = range(layer, self.n_layers) if stage != "final" else range(0)
        for l in layers:
            last = l == self.n_layers - 1 and q_pos is not None
            if l == layer and stage == "mid":  # sequential block, attention already in x
                x = x + self._mlp(x, l)
                continue
            h = self.ln1[l](x)
            k = torch.cat([rep(base["k"][l][:, :s]), self.proj(h, l, "k")], 1)
            v = torch.cat([rep(base["v"][l][:, :s]), self.proj(h, l, "v")], 1)
            if last:
                rows = torch.arange(x.shape[0], device=x.device)
                inside = q_pos >= s
                xq = torch.where(inside[:, None], x[rows, (q_pos - s).clamp(min=0)],
                                 rep(base["resid_pre"][l])[rows, q_pos])[:, None]
                q = self.proj(self.ln1[l](xq), l, "q")
                z = self.attend(q, k, v, q_pos[:, None], l, base)
                return self._unembed(self._block(xq, self.head_out(z, l) + self.b_O[l], l))[:, 0]
            q = self.proj(h, l, "q")
            q_abs = torch.arange(s, s + x.shape[1], device=x.device).expand(x.shape[0], -1)
            x = self._block(x, self.head_out(self.attend(q, k, v, q_abs, l, base), l) + self.b_O[l], l)
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
