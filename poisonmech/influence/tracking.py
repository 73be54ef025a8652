"""Which weight matrices the influence methods see, and scoped hooks that capture them.

Every gradient-based method works on the model's *maps*: ``nn.Linear`` modules, Hugging Face
``Conv1D`` (GPT-2's transposed linear) and, optionally, ``nn.Embedding`` (a linear map of a
one-hot input). For such a map ``y = W a (+ b)`` the gradient of a row's loss is
``sum_t g_t a_t^T`` with ``g_t = dL/dy_t`` — exact, and computable for a whole batch from one
forward and one backward pass, which is what :func:`capture` provides. Gradients are kept in
``(d_out, d_in)`` layout (a bias is an extra input column of ones; an embedding's input is the
one-hot token, ``d_in = d_vocab``).

The maps are found by module type and named from their path with the bridge's
``_original_component`` segments removed, so the same code serves
``TransformerBridge.boot_native`` models (``blocks.0.attn.q``), bridges over Hugging Face
modules (GPT-2's ``Conv1D`` maps, NeoX, Llama / Qwen2's ``q_proj`` ... ``down_proj``; an unused
fused ``qkv`` is dropped by a dry run) and plain Hugging Face modules (``transformer.h.0.attn.
c_attn``, ``model.layers.0.self_attn.q_proj``, ``lm_head``).

Only trained weights are maps: a module whose weight has ``requires_grad=False`` is skipped and
a frozen bias is no input column, so every gradient method scores the parameters that train.
With peft LoRA the frozen ``base_layer`` drops out and the adapters' ``lora_A`` / ``lora_B``
``nn.Linear`` sub-modules are the maps (LoRA-space attribution), labelled after the layer they
adapt (``L0.attn.q_proj.lora_A``).

Attention maps are split per head for component attribution: the output rows of ``q``/``k``/
``v`` (and of a fused ``qkv``: GPT-2's ``c_attn`` as ``[q | k | v]``, NeoX's
``query_key_value`` per head ``[q_h k_h v_h]``) and the input columns of ``o``; a LoRA
adapter splits where its side of the product carries heads (``lora_B`` of ``q``/``k``/``v``,
``lora_A`` of ``o``). With grouped-query attention the key/value heads are labelled
``L0.KV0``... (each serves several query heads ``L0.H*``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from poisonmech.runtime import model_device

ATTN_ROLES = ("q", "k", "v", "o", "qkv")
#: ``modules=`` presets: the linear maps (K-FAC's and kronfluence's default set) or those plus embeddings.
PRESETS = ("linear", "all")


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if _is_conv1d(mod):
        return "conv1d"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return None


@dataclass(frozen=True)
class TrackedModule:
    """One weight matrix seen by the influence methods.

    ``name`` is the module's path in ``model.named_modules()``, ``path`` the same without the
    bridge's ``_original_component`` segments and ``label`` a short name (``L0.attn.q``,
    ``L1.mlp.fc_in``, ``unembed``, ``embed``, ``L0.attn.q_proj.lora_B``). ``d_in`` counts the
    bias column; for an embedding it is the vocabulary size. ``n_heads`` heads lie along
    ``head_axis`` (``"out"`` rows, ``"in"`` columns, ``None``: not split), as ``head_layout``
    says (``"blocked"``: head ``h`` owns a contiguous slice, per projection of a fused
    ``[q | k | v]``; ``"interleaved"``: a fused map's head ``h`` owns ``[q_h k_h v_h]``), each
    labelled ``L<layer>.<head_prefix><h>`` (``H``, or ``KV`` for grouped key/value heads).
    ``lora``: ``"A"`` / ``"B"`` for a peft LoRA adapter matrix, else ``None``.
    """

    name: str
    path: str
    label: str
    kind: str
    layer: int | None
    role: str
    d_in: int
    d_out: int
    bias: bool
    n_heads: int = 1
    head_axis: str | None = None
    head_layout: str = "blocked"
    head_prefix: str = "H"
    lora: str | None = None

    @property
    def n_params(self) -> int:
        return self.d_in * self.d_out

    def component_index(self) -> tuple[str | None, list[str], list[int]]:
        """How this matrix splits into components: ``(axis, labels, index)``.

        ``axis`` is ``"out"`` (rows), ``"in"`` (columns) or ``None`` (the whole matrix is one
        component, ``labels[0]``); ``index[j]`` is the component of row/column ``j``.
        """
        L = f"L{self.layer}" if self.layer is not None else self.path
        if self.head_axis is not None and self.n_heads > 1:
            heads = [f"{L}.{self.head_prefix}{h}" for h in range(self.n_heads)]
            if self.head_axis == "out":
                n_proj = 3 if self.role == "qkv" else 1
                per = self.d_out // (n_proj * self.n_heads)
                if self.head_layout == "interleaved":
                    return "out", heads, [j // (n_proj * per) for j in range(self.d_out)]
                return "out", heads, [(j // per) % self.n_heads for j in range(self.d_out)]
            per = (self.d_in - int(self.bias)) // self.n_heads
            labels = heads + ([f"{L}.attn"] if self.bias else [])
            return "in", labels, [min(j // per, self.n_heads) for j in range(self.d_in)]
        if self.role in ATTN_ROLES:
            return None, [f"{L}.attn"], []
        if self.role == "mlp":
            return None, [f"{L}.mlp"], []
        return None, [self.label], []


@dataclass
class Capture:
    """What one forward pass under :func:`capture` recorded, keyed by module name."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def _clean_path(name: str) -> str:
    return ".".join(p for p in name.split(".") if p != "_original_component")


#: the last path segment of an attention map -> its role (TransformerLens / bridge names first,
#: then Hugging Face's: GPT-2, GPT-NeoX, Llama / Qwen2 / Mistral, OPT / GPT-J, BERT-style)
_ATTN_NAMES = {"q": "q", "k": "k", "v": "v", "o": "o", "qkv": "qkv",
               "q_proj": "q", "k_proj": "k", "v_proj": "v", "query": "q", "key": "k", "value": "v",
               "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv",
               "c_proj": "o", "out_proj": "o", "o_proj": "o", "dense": "o"}
#: fused qkv maps whose rows are per head ``[q_h k_h v_h]`` (GPT-NeoX / Pythia); others are ``[q | k | v]``
_INTERLEAVED_QKV = ("query_key_value",)
_ATTN_PARTS = ("attn", "attention", "self_attn", "self_attention")
_MLP_PARTS = ("mlp", "ffn", "feed_forward")
_UNEMBED = re.compile(r"unembed|lm_head|embed_out|head$")


def attention_shape(model: nn.Module) -> tuple[int, int, int | None]:
    """``(n_heads, n_kv_heads, d_head)`` of ``model``'s attention, from a bridge's ``cfg`` or a
    Hugging Face ``config`` (a peft model forwards its base model's); ``(1, 1, None)`` when the
    model has neither (no head split)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "n_heads", None):
        n = int(cfg.n_heads)
        kv = int(getattr(cfg, "n_key_value_heads", None) or n)
        d_head = getattr(cfg, "d_head", None)
        return n, kv, int(d_head) if d_head else None
    hf = getattr(model, "config", None)
    n = getattr(hf, "num_attention_heads", None) or getattr(hf, "n_head", None)
    if not isinstance(n, int) or n < 1:
        return 1, 1, None
    kv = getattr(hf, "num_key_value_heads", None) or n
    d_head = getattr(hf, "head_dim", None)
    if not d_head:
        d_model = getattr(hf, "hidden_size", None) or getattr(hf, "n_embd", None)
        d_head = d_model // n if d_model else None
    return n, int(kv), int(d_head) if d_head else None


def _head_count(width: int, n_heads: int, n_kv: int, d_head: int | None) -> tuple[int, str]:
    """Heads along an axis of ``width`` (a q/k/v output or an o input): ``(count, prefix)``,
    ``(1, "H")`` when the width is no whole number of the model's heads."""
    if n_heads <= 1:
        return 1, "H"
    if d_head is None:  # no head size known: the old rule, the width split into n_heads
        return (n_heads, "H") if width % n_heads == 0 else (1, "H")
    if width == n_heads * d_head:
        return n_heads, "H"
    if width == n_kv * d_head:
        return n_kv, "KV"
    return 1, "H"


def _describe(name: str, mod: nn.Module, kind: str, shape: tuple[int, int, int | None]) -> TrackedModule:
    path = _clean_path(name)
    parts = path.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    # a peft adapter (``q_proj.lora_A.default``) or wrapped base layer is named after the map it adapts
    lora = next((i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")), None)
    if lora is not None and lora > 0:
        last, adapter = parts[lora - 1], parts[lora + 1] if lora + 1 < len(parts) else "default"
        suffix = f".{parts[lora]}" + ("" if adapter == "default" else f".{adapter}")
        lora_side = parts[lora][-1]
        owner = ".".join(parts[:lora])
    else:
        if parts[-1] == "base_layer" and len(parts) > 1:
            parts = parts[:-1]
        last, suffix, lora_side, owner = parts[-1], "", None, ".".join(parts)
    in_attn = any(p in _ATTN_PARTS for p in parts)
    in_mlp = any(p in _MLP_PARTS for p in parts)
    head_axis, n_heads, prefix, layout = None, 1, "H", "blocked"
    if kind == "embedding":
        role = "pos_embed" if re.search(r"pos|wpe", path) else "embed"
        label = role
        d_in, d_out, bias = mod.num_embeddings, mod.embedding_dim, False
    else:
        # a bias counts only when it is trained (the native bridge's unembedding bias is a buffer,
        # a LoRA model's base biases are frozen)
        bias = isinstance(getattr(mod, "bias", None), nn.Parameter) and mod.bias.requires_grad
        if kind == "linear":
            d_in, d_out = mod.in_features, mod.out_features
        else:  # HF Conv1D: weight (in, out)
            d_in, d_out = mod.weight.shape[0], mod.weight.shape[1]
        d_in += int(bias)
        if in_attn and last in _ATTN_NAMES:
            role = _ATTN_NAMES[last]
        elif in_mlp:
            role = "mlp"
        elif _UNEMBED.search(owner):
            role = "unembed"
        else:
            role = "other"
        if layer is not None and role in ATTN_ROLES:
            label = f"L{layer}.attn.{last}{suffix}"
        elif layer is not None and role == "mlp":
            label = f"L{layer}.mlp.{last}{suffix}"
        elif role == "unembed":
            label = "unembed" + suffix
        else:
            label = path
        # which side carries the heads: q/k/v outputs, o inputs; of a LoRA pair only the outer factor
        n_h, n_kv, d_head = shape
        if role in ("q", "k", "v") and lora_side != "A":
            n_heads, prefix = _head_count(d_out, n_h, n_kv, d_head)
            head_axis = "out"
        elif role == "qkv" and lora_side != "A":
            whole = d_out // 3 if d_out % 3 == 0 else -1
            n_heads, _ = _head_count(whole, n_h, n_h, d_head)  # a fused GQA qkv is not split
            head_axis = "out"
            layout = "interleaved" if last in _INTERLEAVED_QKV else "blocked"
        elif role == "o" and lora_side != "B":
            n_heads, prefix = _head_count(d_in - int(bias), n_h, n_kv, d_head)
            head_axis = "in"
        if n_heads == 1:
            head_axis = None
    return TrackedModule(name=name, path=path, label=label, kind=kind, layer=layer, role=role, d_in=d_in,
                         d_out=d_out, bias=bias, n_heads=n_heads, head_axis=head_axis, head_layout=layout,
                         head_prefix=prefix, lora=lora_side)


def find_modules(model: nn.Module, modules: str | Sequence[str] = "linear", *,
                 trainable_only: bool = True) -> list[TrackedModule]:
    """The maps of ``model`` that a forward pass uses, in call order.

    ``modules``: ``"linear"`` (every ``nn.Linear`` / ``Conv1D``, the unembedding included),
    ``"all"`` (those and the embeddings), or a list of glob patterns matched against each
    map's label or path (``["L*.attn.*", "unembed"]``). Maps never called in a forward (the
    GPT-2 bridge keeps an unused fused ``qkv``) are left out, and so are maps whose output is
    shared by the whole batch (GPT-2's position embedding), which have no per-row gradient.
    ``trainable_only``: leave out maps whose weight has ``requires_grad=False`` (the gradient
    methods); ``False`` keeps them (RepSim reads a frozen unembedding's input).
    """
    if isinstance(modules, str) and modules not in PRESETS:
        raise ValueError(f"modules must be one of {PRESETS} or a list of glob patterns, got {modules!r}")
    shape = attention_shape(model)
    found = []
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None or (trainable_only and not mod.weight.requires_grad):
            continue
        t = _describe(name, mod, kind, shape)
        if isinstance(modules, str):
            keep = kind != "embedding" or modules == "all"
        else:
            keep = any(fnmatch.fnmatchcase(t.label, p) or fnmatch.fnmatchcase(t.path, p) for p in modules)
        if keep:
            found.append((t, mod))
    order: list[str] = []
    broadcast: set[str] = set()

    def record(_m, _i, out, n: str) -> None:
        order.append(n)
        if out.shape[0] != 2:  # e.g. a position embedding computed once and broadcast over the batch
            broadcast.add(n)

    handles = [mod.register_forward_hook(lambda m, i, o, n=t.name: record(m, i, o, n)) for t, mod in found]
    try:
        with torch.no_grad():
            model(torch.zeros((2, 2), dtype=torch.long, device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
    by_name = {t.name: t for t, _ in found}
    seen = [n for n in dict.fromkeys(order) if n not in broadcast]
    if len(seen) != len(order):
        twice = sorted({n for n in order if order.count(n) > 1})
        raise ValueError(f"modules {twice} are called more than once per forward (shared weights); "
                         "exclude them with modules=[...]")
    tracked = [by_name[n] for n in seen]
    if not tracked:
        frozen = " (maps whose weight has requires_grad=False are left out)" if trainable_only else ""
        raise ValueError(f"no {'trained ' if trainable_only else ''}linear maps of the model match "
                         f"modules={modules!r}{frozen}")
    return tracked


@contextmanager
def capture(model: nn.Module, modules: Sequence[TrackedModule]) -> Iterator[Capture]:
    """Record each tracked map's input and (graph-attached) output during the forward passes
    run inside the block; the hooks are removed on exit, even on error.

    Differentiate a loss against ``cap.outputs[name]`` (``torch.autograd.grad``) to get the
    output gradients without touching the parameters' ``.grad``.
    """
    cap = Capture()
    lookup = dict(model.named_modules())
    handles = []

    def hook(t: TrackedModule):
        def fn(_mod, inputs, output):
            x = inputs[0]
            cap.inputs[t.name] = x.detach()
            cap.outputs[t.name] = output
        return fn

    try:
        for t in modules:
            handles.append(lookup[t.name].register_forward_hook(hook(t)))
        yield cap
    finally:
        for h in handles:
            h.remove()


def activations(t: TrackedModule, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A map's input as the activation ``a`` of ``y = W a``: a bias column of ones appended,
    an embedding's token ids one-hot encoded. Shape ``(batch, pos, d_in)``."""
    if t.kind == "embedding":
        return F.one_hot(x, t.d_in).to(dtype)
    x = x.to(dtype)
    if t.bias:
        x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1)
    return x


def times_activations(t: TrackedModule, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``activations(t, x) @ m`` without forming the activations: the bias column as an added
    row of ``m``, an embedding's one-hot product as a row lookup. ``m``: ``(d_in, k)``."""
    if t.kind == "embedding":
        return m[x]
    x = x.to(m.dtype)
    if t.bias:
        return torch.matmul(x, m[:-1]).add_(m[-1])
    return torch.matmul(x, m)


def activation_covariance(t: TrackedModule, x: torch.Tensor) -> torch.Tensor:
    """``Σ_rows a a^T`` of the activations of ``x`` (``(n, d)`` inputs, or ``(n,)`` token ids)."""
    if t.kind == "embedding":
        return torch.diag(torch.bincount(x, minlength=t.d_in).float())
    x = x.float()
    xx = x.T @ x
    if not t.bias:
        return xx
    s = x.sum(0)
    top = torch.cat([xx, s[:, None]], 1)
    return torch.cat([top, torch.cat([s, s.new_tensor([float(len(x))])])[None]], 0)


def weight_gradient(t: TrackedModule, grad: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a ``(..., d_out, d_in)`` gradient back to the module's parameters (their layout)."""
    mod = dict(model.named_modules())[t.name]
    if t.kind == "embedding":
        return {"weight": grad.transpose(-1, -2)}
    w = grad[..., : t.d_in - int(t.bias)]
    out = {"weight": w if t.kind == "linear" else w.transpose(-1, -2)}
    if t.bias:
        out["bias"] = grad[..., -1]
    assert out["weight"].shape[-2:] == mod.weight.shape
    return out


__all__ = ["PRESETS", "Capture", "TrackedModule", "activation_covariance", "activations", "attention_shape", "capture",
           "find_modules",
           "times_activations", "weight_gradient"]
