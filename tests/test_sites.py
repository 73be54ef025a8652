"""The one site registry: hook names are TransformerLens' and exist on the bridges."""

from __future__ import annotations

import pytest

from poisonmech.sites import HEAD_SITES, RESIDUAL_SITES, SITES, get_site, hook_name, sites_frame
from tests.helpers import small_model


def test_every_site_hooks_a_real_bridge_hook():
    m = small_model()
    hooks = set(m.hook_dict)
    for name in SITES:
        for layer in range(2):
            assert hook_name(name, layer) in hooks, name
    assert hook_name("attn_head", 1) == "blocks.1.attn.hook_z"
    assert SITES["resid_post"].hook_template() == "blocks.{layer}.hook_resid_post"
    assert set(HEAD_SITES) == {"attn_head", "q", "k", "v", "pattern"}
    assert set(RESIDUAL_SITES) == {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
    assert len(sites_frame()) == len(SITES)


def test_unknown_site_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"site must be one of \('resid_pre'"):
        get_site("resid")
    with pytest.raises(ValueError, match=r"probe_site must be one of \('resid_pre', 'resid_post'\)"):
        get_site("q", ("resid_pre", "resid_post"), field="probe_site")
