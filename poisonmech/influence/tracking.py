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
``TransformerBridge.boot_native`` models (``blocks.0.attn.q``) and HF GPT-2 bridges
(``blocks.0.attn.q`` over a ``Conv1D``, the unused fused ``qkv`` dropped by a dry run).
Attention maps are split per head for component attribution: the output rows of ``q``/``k``/
``v`` and the input columns of ``o``.
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
    ``L1.mlp.fc_in``, ``unembed``, ``embed``). ``d_in`` counts the bias column; for an
    embedding it is the vocabulary size.
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

    @property
    def n_params(self) -> int:
        return self.d_in * self.d_out

    def component_index(self) -> tuple[str | None, list[str], list[int]]:
        """How this matrix splits into components: ``(axis, labels, index)``.

        ``axis`` is ``"out"`` (rows), ``"in"`` (columns) or ``None`` (the whole matrix is one
        component, ``labels[0]``); ``index[j]`` is the component of row/column ``j``.
        """
        L = f"L{self.layer}" if self.layer is not None else self.path
        if self.role in ("q", "k", "v", "qkv") and self.n_heads > 1:
            per = self.d_out // (3 * self.n_heads if self.role == "qkv" else self.n_heads)
            labels = [f"{L}.H{h}" for h in range(self.n_heads)]
            return "out", labels, [(j // per) % self.n_heads for j in range(self.d_out)]
        if self.role == "o" and self.n_heads > 1:
            d_heads = self.d_in - int(self.bias)
            per = d_heads // self.n_heads
            labels = [f"{L}.H{h}" for h in range(self.n_heads)] + ([f"{L}.attn"] if self.bias else [])
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


def _describe(name: str, mod: nn.Module, kind: str, n_heads: int) -> TrackedModule:
    path = _clean_path(name)
    parts = path.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    last = parts[-1]
    in_attn = any(p in ("attn", "attention", "self_attn") for p in parts)
    in_mlp = any(p in ("mlp", "ffn", "feed_forward") for p in parts)
    if kind == "embedding":
        role = "pos_embed" if re.search(r"pos|wpe", path) else "embed"
        label = role
        d_in, d_out, bias = mod.num_embeddings, mod.embedding_dim, False
    else:
        # a bias counts only when it is trained (the native bridge's unembedding bias is a buffer)
        bias = isinstance(getattr(mod, "bias", None), nn.Parameter) and mod.bias.requires_grad
        if kind == "linear":
            d_in, d_out = mod.in_features, mod.out_features
        else:  # HF Conv1D: weight (in, out)
            d_in, d_out = mod.weight.shape[0], mod.weight.shape[1]
        d_in += int(bias)
        if in_attn and last in ATTN_ROLES:
            role = last
        elif in_attn and last in ("c_attn",):
            role = "qkv"
        elif in_attn and last in ("c_proj", "out_proj", "o_proj", "dense"):
            role = "o"
        elif in_mlp:
            role = "mlp"
        elif re.search(r"unembed|lm_head|head$", path):
            role = "unembed"
        else:
            role = "other"
        if layer is not None and role in ATTN_ROLES:
            label = f"L{layer}.attn.{last}"
        elif layer is not None and role == "mlp":
            label = f"L{layer}.mlp.{last}"
        elif role == "unembed":
            label = "unembed"
        else:
            label = path
    heads = n_heads if role in ATTN_ROLES else 1
    return TrackedModule(name=name, path=path, label=label, kind=kind, layer=layer, role=role, d_in=d_in,
                         d_out=d_out, bias=bias, n_heads=heads)


def find_modules(model: nn.Module, modules: str | Sequence[str] = "linear") -> list[TrackedModule]:
    """The maps of ``model`` that a forward pass uses, in call order.

    ``modules``: ``"linear"`` (every ``nn.Linear`` / ``Conv1D``, the unembedding included),
    ``"all"`` (those and the embeddings), or a list of glob patterns matched against each
    map's label or path (``["L*.attn.*", "unembed"]``). Maps never called in a forward (the
    GPT-2 bridge keeps an unused fused ``qkv``) are left out, and so are maps whose output is
    shared by the whole batch (GPT-2's position embedding), which have no per-row gradient.
    """
    if isinstance(modules, str) and modules not in PRESETS:
        raise ValueError(f"modules must be one of {PRESETS} or a list of glob patterns, got {modules!r}")
    cfg = getattr(model, "cfg", None)
    n_heads = int(getattr(cfg, "n_heads", 1) or 1)
    found = []
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None or not mod.weight.requires_grad:
            continue
        t = _describe(name, mod, kind, n_heads)
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
        raise ValueError(f"no linear maps of the model match modules={modules!r}")
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


__all__ = ["PRESETS", "Capture", "TrackedModule", "activation_covariance", "activations", "capture", "find_modules",
           "times_activations", "weight_gradient"]
