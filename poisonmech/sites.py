"""The one site registry: every analysis (patching, attribution patching, circuits, probes,
detectors, direction interventions) names activations by these keys.

A site is a kind of activation that exists once per layer. Its hook name comes from
TransformerLens' ``get_act_name`` (the classic names, which TransformerBridge keeps), so a
hook built here is the hook TransformerLens users already know. Adding a site is one entry
in ``SITES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """One activation site.

    Args:
        name: the registry key (``"resid_post"``, ``"attn_head"``, ...).
        act: the name ``transformer_lens.utilities.get_act_name`` takes (``"z"`` for heads).
        shape: the activation's shape at one layer, in the shared vocabulary.
        per_head: whether the activation has a head axis (patched / scored per head).
        residual: whether it lives in the residual stream's basis (``d_model``: probes,
            direction ablation and steering read or write these).
        meaning: one line for tables and error messages.
    """

    name: str
    act: str
    shape: str
    per_head: bool
    residual: bool
    meaning: str

    def hook_name(self, layer: int) -> str:
        from transformer_lens.utilities import (
            get_act_name,  # lazily: TransformerLens imports slowly
        )

        return get_act_name(self.act, int(layer))

    def hook_template(self) -> str:
        """The hook name with ``{layer}`` in place of the layer index."""
        return self.hook_name(0).replace("blocks.0.", "blocks.{layer}.", 1)


SITES: dict[str, Site] = {s.name: s for s in (
    Site("resid_pre", "resid_pre", "batch pos d_model", False, True, "residual stream entering the block"),
    Site("resid_mid", "resid_mid", "batch pos d_model", False, True,
         "residual stream between attention and MLP (the MLP norm's input)"),
    Site("resid_post", "resid_post", "batch pos d_model", False, True, "residual stream leaving the block"),
    Site("attn_out", "attn_out", "batch pos d_model", False, True, "the attention layer's output"),
    Site("mlp_out", "mlp_out", "batch pos d_model", False, True, "the MLP's output"),
    Site("attn_head", "z", "batch pos head d_head", True, False, "each head's output before W_O (hook_z)"),
    Site("q", "q", "batch pos head d_head", True, False, "each head's queries"),
    Site("k", "k", "batch pos head d_head", True, False, "each head's keys"),
    Site("v", "v", "batch pos head d_head", True, False, "each head's values"),
    Site("pattern", "pattern", "batch head pos pos", True, False, "each head's attention pattern"),
)}

#: sites with a head axis
HEAD_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.per_head)
#: sites in the residual basis (d_model): what probes, detectors and direction interventions read
RESIDUAL_SITES: tuple[str, ...] = tuple(n for n, s in SITES.items() if s.residual)
#: sites that need an MLP (absent from attention-only models)
MLP_SITES: tuple[str, ...] = ("resid_mid", "mlp_out")


def get_site(name: str, allowed: Sequence[str] | None = None, *, field: str = "site") -> Site:
    """The registry entry of ``name``; an error names ``field`` and the allowed names."""
    allowed = tuple(SITES) if allowed is None else tuple(allowed)
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {name!r}")
    return SITES[name]


def architecture_name(model) -> str:
    """A model's architecture for messages: the wrapped Hugging Face class (``"LlamaForCausalLM"``)
    for a bridge over one, else the model's own class name."""
    inner = getattr(model, "original_model", None)
    return type(inner if inner is not None else model).__name__


def site_heads(model, site: str) -> int | None:
    """The size of ``site``'s head axis in ``model`` (``None`` for a site without one): the
    key / value heads for ``k`` and ``v`` of a grouped-query model (TransformerLens'
    ``hook_k`` / ``hook_v`` carry ``n_key_value_heads`` heads there), else ``n_heads``."""
    if not get_site(site).per_head:
        return None
    cfg = model.cfg
    if site in ("k", "v"):
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(cfg.n_heads)


def missing_site(model, site: str) -> str | None:
    """Why ``model`` has no ``site`` (a sentence naming the site and the architecture), or
    ``None`` when every layer has its hook. An attention-only model has no MLP sites; a
    parallel-residual block (GPT-NeoX / Pythia, GPT-J: attention and MLP both read
    ``resid_pre``) has no ``resid_mid``; any other missing hook is named as it is."""
    entry = get_site(site)
    cfg = getattr(model, "cfg", None)
    if site in MLP_SITES and getattr(cfg, "attn_only", False):
        return f"site {site!r} does not exist in an attention-only model"
    hooks = getattr(model, "hook_dict", None)
    if hooks is None or cfg is None:
        return None  # not a hooked model: nothing to check against
    absent = [layer for layer in range(cfg.n_layers) if entry.hook_name(layer) not in hooks]
    if not absent:
        return None
    arch = architecture_name(model)
    if site == "resid_mid" and getattr(cfg, "parallel_attn_mlp", False):
        return (f"site 'resid_mid' does not exist in {arch}: its blocks are parallel (attention and MLP both read "
                "resid_pre and add to it together), so there is no residual stream between them; use resid_pre, "
                "resid_post, attn_out or mlp_out")
    return (f"site {site!r} does not exist in {arch}: no hook {entry.hook_name(absent[0])!r} "
            f"(missing in layers {absent})")


def check_site(model, site: str, allowed: Sequence[str] | None = None, *, field: str = "site") -> Site:
    """:func:`get_site`, and a ValueError naming the site and the architecture when ``model`` lacks it."""
    entry = get_site(site, allowed, field=field)
    why = missing_site(model, site)
    if why is not None:
        raise ValueError(why)
    return entry


def hook_name(site: str, layer: int) -> str:
    """The hook name of ``site`` at ``layer``, e.g. ``hook_name("attn_head", 1)`` ->
    ``"blocks.1.attn.hook_z"``."""
    return get_site(site).hook_name(layer)


def sites_frame():
    """The registry as a table (one row per site)."""
    import pandas as pd

    return pd.DataFrame([{"site": s.name, "hook": s.hook_template(), "shape": s.shape, "per_head": s.per_head,
                          "residual": s.residual, "meaning": s.meaning} for s in SITES.values()])


__all__ = ["HEAD_SITES", "MLP_SITES", "RESIDUAL_SITES", "SITES", "Site", "architecture_name", "check_site", "get_site",
           "hook_name", "missing_site", "site_heads", "sites_frame"]
