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

from poisonmech import sites
from poisonmech.config import takes_config
from poisonmech.encoding import Encoded, encode
from poisonmech.probes.config import ActivationConfig
from poisonmech.runtime import eval_mode, model_device
from poisonmech.subject import Subject, resolve

Tensor = torch.Tensor

#: activation sites a probe can read (the residual-basis sites of :mod:`poisonmech.sites`) and
#: their TransformerLens hook names, ``{layer}`` standing for the layer number
SITES: dict[str, str] = {name: sites.SITES[name].hook_template() for name in sites.RESIDUAL_SITES}
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
    """The hook name of the residual-basis ``site`` at ``layer`` (from :mod:`poisonmech.sites`)."""
    return sites.get_site(site, sites.RESIDUAL_SITES).hook_name(layer)


def check_site_layers(model: torch.nn.Module, site: str, layers: int | Sequence[int] | None) -> tuple[int, ...]:
    """Validate ``site`` and ``layers`` against ``model``; ``None`` means every layer.

    Raises ``ValueError`` naming the site or layer the model lacks (for example ``mlp_out``
    on an attention-only model) and the allowed values.
    """
    sites.get_site(site, sites.RESIDUAL_SITES)
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
            why = sites.missing_site(model, site) or f"site {site!r} is missing in layer {layer}"
            raise ValueError(f"site={site!r}: no hook {hook_name(site, layer)!r} in the model; {why} "
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
    layers: tuple[int, ...]  #: the layer of each ``acts[l]``
    positions: tuple[int, ...]  #: the position of each ``acts[:, :, p]`` (negative: from the end)
    site: str  #: the site's name in the registry

    def __repr__(self) -> str:
        return (f"Activations({self.site}, layers {list(self.layers)}, positions {list(self.positions)[:8]}"
                f"{' ...' if len(self.positions) > 8 else ''}, {self.acts.shape[1]} rows, "
                f"d_model {self.acts.shape[-1]})")

    def layer(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """Activations of one model layer (by its number, not its index in ``layers``)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not collected (collected: {self.layers})")
        return self.acts[self.layers.index(layer)]

    def select(self, rows, layers: Sequence[int], positions: Sequence[int], *, where: str = "activations"
               ) -> Activations:
        """The activations of ``rows`` at ``layers`` and ``positions`` (each must have been collected)."""
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise ValueError(f"{where}: layers {missing} were not collected (collected: {self.layers})")
        gone = [p for p in positions if p not in self.positions]
        if gone:
            raise ValueError(f"{where}: positions {gone} were not collected (collected: {self.positions})")
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        li = torch.tensor([self.layers.index(x) for x in layers], dtype=torch.long)
        pi = torch.tensor([self.positions.index(p) for p in positions], dtype=torch.long)
        return Activations(acts=self.acts[li][:, rows][:, :, pi], valid=self.valid[rows][:, pi],
                           lengths=self.lengths[rows], layers=tuple(layers), positions=tuple(positions), site=self.site)


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

    kwargs = _forward_kwargs(model, max(layers))
    starts = range(0, n, batch_size)
    with eval_mode(model):
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
    acts = acts * valid_all[None, :, :, None]
    for li, layer in enumerate(layers):
        bad = ~torch.isfinite(acts[li])
        if bad.any():
            raise ValueError(f"activations at layer {layer} (site {site!r}, hook {names[li]!r}) contain "
                             f"{int(bad.sum())} NaN/inf values; check the model's weights")
    return Activations(acts=acts, valid=valid_all, lengths=lengths, layers=layers, positions=positions, site=site)


@takes_config(ActivationConfig)
def collect_activations(subject, dataset: Dataset | None = None, *, twin: str | None = None,
                        tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True,
                        config: ActivationConfig) -> Activations:
    """Activations of ``site`` at ``layers`` and ``positions`` for every row's ``prompt``.

    Args:
        subject: a run (``Pair``, pipeline stage, run directory, ...) or a bare model
            (:func:`poisonmech.resolve`).
        dataset: rows with a ``prompt`` column; default: the run's test rows (a bare model
            needs it).
        twin: the role read (default: the subject's default role, e.g. the backdoored twin).
        tokenizer: default: the subject's (a bare bridge's ``.tokenizer``).
        site, layers, positions, batch_size: :class:`ActivationConfig`'s.

    Raises ``ValueError`` for a site or layer the model lacks, and for NaN/inf activations
    (naming the layer).
    """
    s = resolve(subject, test=dataset, tokenizer=tokenizer, where="collect_activations")
    data = s.require("test_data", "collect_activations", "dataset")
    return collect(s.model(twin), data, tokenizer_of(s, "collect_activations"), config, progress=progress)


def collect(model: torch.nn.Module, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, config: ActivationConfig,
            *, progress: bool = False, positions: PositionSpec | None = None,
            layers: int | Sequence[int] | None = None, rows: np.ndarray | None = None,
            reuse: Activations | None = None) -> Activations:
    """:func:`collect_activations` on one model (``positions`` / ``layers`` override the config's),
    for ``rows`` of ``dataset`` only (default: every row).

    With ``reuse`` (activations of every row of ``dataset`` collected before, on the same model),
    the rows, layers and positions are taken from it instead of running the model again: each
    row's activations do not depend on the other rows of its batch.
    """
    layer_t = check_site_layers(model, config.site, config.layers if layers is None else layers)
    enc = prompt_encoding(dataset if rows is None else dataset.select(rows.tolist()), tokenizer)
    lengths = torch.tensor([len(r) for r in enc.ids], dtype=torch.long)
    pos = resolve_positions(config.positions if positions is None else positions, lengths)
    if reuse is None:
        return gather_activations(model, enc, site=config.site, layers=layer_t, positions=pos,
                                  batch_size=config.batch_size, progress=progress)
    if reuse.site != config.site or reuse.acts.shape[1] != len(dataset):
        raise ValueError(f"activations: expected {config.site!r} activations of the dataset's {len(dataset)} rows, got "
                         f"{reuse.site!r} activations of {reuse.acts.shape[1]} rows (collect them with "
                         "collect_activations on the same dataset and options)")
    out = reuse.select(np.arange(len(dataset)) if rows is None else rows, layer_t, pos, where="activations")
    if not torch.equal(out.lengths, lengths):
        raise ValueError("activations: their prompt lengths differ from the dataset's (another dataset or tokenizer)")
    return out


def tokenizer_of(s: Subject, where: str) -> PreTrainedTokenizerBase:
    """The subject's tokenizer, or an error saying to pass one."""
    return s.require("tokenizer", where, "tokenizer")
