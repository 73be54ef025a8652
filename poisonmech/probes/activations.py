"""Collecting residual-stream (or attention / MLP output) activations with scoped hooks.

One forward pass per batch, with a hook per requested layer that keeps only the requested
token positions of each row, so the full ``batch pos d_model`` cache of every layer is never
held in memory. Hooks are attached with ``model.hooks(...)`` (a context manager): nothing
stays attached after a collection, even when it fails.

Positions are counted in the token sequence ``[BOS] + prompt``:

- a non-negative ``p`` is the absolute position ``p`` (0 is BOS); rows shorter than that
  have no activation there (``valid`` is False);
- a negative ``p`` counts from the end of the prompt: ``-1`` is each row's last prompt
  token (the one that predicts the completion), ``-2`` the one before, and so on. Batches
  are right-padded, so each row's real length is used, never the padded width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from poisonmech.encoding import Encoded, encode
from poisonmech.models import model_device

Tensor = torch.Tensor

#: activation sites a probe can read, and their TransformerLens hook names
SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
Site = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
PositionSpec = Literal["last", "all"] | Sequence[int]


def n_layers_of(model: torch.nn.Module) -> int:
    """Number of transformer blocks of ``model`` (a ``TransformerBridge``)."""
    cfg = getattr(model, "cfg", None)
    n = getattr(cfg, "n_layers", None)
    if n is None:
        raise ValueError(f"model: expected a TransformerBridge with cfg.n_layers, got {type(model).__name__}")
    return int(n)


def hook_name(site: str, layer: int) -> str:
    """The hook name of ``site`` at ``layer`` (``blocks.{layer}.hook_{site}``)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {tuple(SITES)}, got {site!r}")
    return SITES[site].format(layer=layer)


def check_site_layers(model: torch.nn.Module, site: str, layers: int | Sequence[int] | None) -> tuple[int, ...]:
    """Validate ``site`` and ``layers`` against ``model``; ``None`` means every layer.

    Raises ``ValueError`` naming the site or layer the model lacks (for example ``mlp_out``
    on an attention-only model) and the allowed values.
    """
    if site not in SITES:
        raise ValueError(f"site must be one of {tuple(SITES)}, got {site!r}")
    n = n_layers_of(model)
    if layers is None:
        out = tuple(range(n))
    else:
        raw = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
        if not raw:
            raise ValueError(f"layers: give at least one layer in 0..{n - 1} (or None for all)")
        out = []
        for layer in raw:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n:
                raise ValueError(f"layers: the model has layers 0..{n - 1}, got {layer!r}")
            out.append(int(layer))
        out = tuple(dict.fromkeys(out))
    hooks = getattr(model, "hook_dict", {})
    available = tuple(s for s in SITES if hook_name(s, 0) in hooks)
    for layer in out:
        if hook_name(site, layer) not in hooks:
            raise ValueError(f"site={site!r}: the model has no hook {hook_name(site, layer)!r} "
                             f"(sites it has: {available})")
    return out


@dataclass(frozen=True)
class Activations:
    """Activations of one site at a few token positions of each row.

    ``acts[l, b, p]`` is the activation at layer ``layers[l]``, row ``b``, position
    ``positions[p]`` (see the module docstring); ``valid[b, p]`` says whether row ``b`` has
    that position (invalid entries are zero). ``lengths[b]`` is the row's ``[BOS] + prompt``
    length.
    """

    acts: Float[Tensor, "layer batch pos d_model"]
    valid: Bool[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    site: str

    def __repr__(self) -> str:
        return (f"Activations({self.site}, layers {list(self.layers)}, positions {list(self.positions)[:8]}"
                f"{' ...' if len(self.positions) > 8 else ''}, {self.acts.shape[1]} rows, "
                f"d_model {self.acts.shape[-1]})")

    def layer(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """Activations of one model layer (by its number, not its index in ``layers``)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not collected (collected: {self.layers})")
        return self.acts[self.layers.index(layer)]


def prompt_encoding(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """``[BOS] + prompt`` token ids of every row (the completion is not needed to read a prompt)."""
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset: needs a 'prompt' column; it has {dataset.column_names}")
    rows = Dataset.from_dict({"prompt": list(dataset["prompt"]), "completion": [""] * len(dataset)})
    return encode(rows, tokenizer, loss_on="completion", add_eos=False)


def resolve_positions(positions: PositionSpec, lengths: Int[Tensor, " batch"]) -> tuple[int, ...]:
    """``"last"`` -> ``(-1,)``; ``"all"`` -> every absolute position of the longest prompt."""
    if isinstance(positions, str):
        if positions == "last":
            return (-1,)
        if positions == "all":
            return tuple(range(int(lengths.max())))
        raise ValueError(f"positions must be 'last', 'all' or a list of ints, got {positions!r}")
    out = list(positions) if not isinstance(positions, (int, np.integer)) else [positions]
    if not out or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) for p in out):
        raise ValueError(f"positions must be 'last', 'all' or a non-empty list of ints, got {positions!r}")
    return tuple(dict.fromkeys(int(p) for p in out))


def position_index(positions: tuple[int, ...], lengths: Int[Tensor, " batch"]
                   ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token index of each requested position in each row, and whether the row has it."""
    pos = torch.tensor(positions, dtype=torch.long)[None, :]
    idx = torch.where(pos < 0, lengths[:, None] + pos, pos.expand(len(lengths), -1))
    valid = (idx >= 0) & (idx < lengths[:, None])
    return idx.clamp(min=0), valid


def _forward_kwargs(model: torch.nn.Module, last_layer: int) -> dict:
    # stop after the last block we read; saves the remaining blocks and the unembedding
    return {"stop_at_layer": last_layer + 1} if last_layer + 1 < n_layers_of(model) else {}


@torch.no_grad()
def gather_activations(model: torch.nn.Module, enc: Encoded, *, site: str, layers: tuple[int, ...],
                       positions: tuple[int, ...] | None, mean: bool = False, batch_size: int = 64,
                       progress: bool = False, desc: str = "activations") -> Activations:
    """Core collection loop over an ``Encoded`` set (see ``collect_activations``).

    With ``mean=True`` the single returned position is the mean over each row's prompt
    tokens (BOS excluded when the prompt has any token); ``positions`` is then ignored and
    reported as ``(-1,)``.
    """
    device = model_device(model)
    n = len(enc)
    lengths = torch.tensor([len(r) for r in enc.ids], dtype=torch.long)
    if mean:
        positions = (-1,)
    assert positions is not None
    idx_all, valid_all = position_index(positions, lengths)
    d_model = int(model.cfg.d_model)
    acts = torch.zeros(len(layers), n, len(positions), d_model)
    names = [hook_name(site, layer) for layer in layers]
    state: dict[str, Tensor] = {}

    def make_hook(li: int):
        def hook(x: Tensor, hook) -> Tensor:  # noqa: ARG001
            rows = state["rows"]
            if mean:
                mask = state["mean_mask"]
                pooled = (x.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                acts[li, rows] = pooled[:, None, :].cpu()
            else:
                b = torch.arange(x.shape[0], device=x.device)[:, None]
                acts[li, rows] = x[b, state["idx"].clamp(max=x.shape[1] - 1)].float().cpu()
            return x
        return hook

    was_training = model.training
    model.eval()
    kwargs = _forward_kwargs(model, max(layers))
    starts = range(0, n, batch_size)
    try:
        with model.hooks(fwd_hooks=[(name, make_hook(i)) for i, name in enumerate(names)]):
            for lo in tqdm(starts, desc=desc, disable=not progress, leave=False):
                rows = torch.arange(lo, min(lo + batch_size, n))
                tokens, _ = enc.batch(rows.tolist(), device)
                state["rows"] = rows
                state["idx"] = idx_all[rows].to(device)
                if mean:
                    t = torch.arange(tokens.shape[1])[None, :]
                    first = (lengths[rows] > 1).long()[:, None]  # skip BOS when there is a prompt
                    state["mean_mask"] = ((t >= first) & (t < lengths[rows][:, None])).float().to(device)
                try:
                    model(tokens, **kwargs)
                except NotImplementedError:  # a bridge without a standard block stack
                    kwargs = {}
                    model(tokens)
    finally:
        model.train(was_training)
    acts = acts * valid_all[None, :, :, None]
    for li, layer in enumerate(layers):
        bad = ~torch.isfinite(acts[li])
        if bad.any():
            raise ValueError(f"activations at layer {layer} (site {site!r}, hook {names[li]!r}) contain "
                             f"{int(bad.sum())} NaN/inf values; check the model's weights")
    return Activations(acts=acts, valid=valid_all, lengths=lengths, layers=layers, positions=positions, site=site)


def collect_activations(model: torch.nn.Module, dataset: Dataset, *, site: Site = "resid_post",
                        layers: int | Sequence[int] | None = None, positions: PositionSpec = "last",
                        tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 64,
                        progress: bool = True) -> Activations:
    """Activations of ``site`` at ``layers`` and ``positions`` for every row's ``prompt``.

    Args:
        model: a ``TransformerBridge``.
        dataset: rows with a ``prompt`` column (e.g. ``pair.test_data``).
        site: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"`` or ``"mlp_out"``.
        layers: layer numbers; ``None`` for all.
        positions: ``"last"`` (each row's last prompt token), ``"all"`` (every absolute
            position up to the longest prompt) or a list of ints (negative ones count from
            the end of each prompt, see the module docstring).
        tokenizer: defaults to ``model.tokenizer``.
        batch_size: rows per forward pass.

    Raises ``ValueError`` for a site or layer the model lacks, and for NaN/inf activations
    (naming the layer).
    """
    tok = _tokenizer(model, tokenizer)
    layer_t = check_site_layers(model, site, layers)
    enc = prompt_encoding(dataset, tok)
    lengths = torch.tensor([len(r) for r in enc.ids], dtype=torch.long)
    pos = resolve_positions(positions, lengths)
    return gather_activations(model, enc, site=site, layers=layer_t, positions=pos, batch_size=batch_size,
                              progress=progress)


def _tokenizer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("tokenizer: the model carries no tokenizer; pass tokenizer=pair.tokenizer")
    return tok
