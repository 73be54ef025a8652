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


def hook_name(site: str, layer: int) -> str:
    """The hook name of ``site`` at ``layer``, e.g. ``hook_name("attn_head", 1)`` ->
    ``"blocks.1.attn.hook_z"``."""
    return get_site(site).hook_name(layer)


def sites_frame():
    """The registry as a table (one row per site)."""
    import pandas as pd

    return pd.DataFrame([{"site": s.name, "hook": s.hook_template(), "shape": s.shape, "per_head": s.per_head,
                          "residual": s.residual, "meaning": s.meaning} for s in SITES.values()])


__all__ = ["HEAD_SITES", "MLP_SITES", "RESIDUAL_SITES", "SITES", "Site", "get_site", "hook_name", "sites_frame"]
