"""Attribution patching is exact where the model is linear after the site; AtP*'s QK fix is exact
through the softmax when nothing non-linear follows the attention pattern."""

import pytest
import torch

from poisonmech.patching import activation_patch, attribution_patch, logit_diff, trigger_contrast
from tests.helpers import small_model


@pytest.mark.parametrize("site", ["attn_out", "mlp_out", "attn_head", "v", "pattern"])
def test_exact_when_only_linear_maps_follow(site, tokens):
    # no normalisation and nothing after the site but linear maps: the first-order estimate is exact
    model = small_model(n_layers=1, normalization_type=None, attn_only=site != "mlp_out")
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 4, 5]))
    exact = activation_patch(model, clean, corrupted, metric, site=site, by_position=True, progress=False)
    approx = attribution_patch(model, clean, corrupted, metric, site=site, by_position=True)
    torch.testing.assert_close(approx.values, exact.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_is_exact_through_the_softmax(site, tokens):
    model = small_model(n_layers=1, normalization_type=None, attn_only=True)
    clean, corrupted = tokens
    metric = logit_diff(5, 6, torch.tensor([6, 4, 5]))
    exact = activation_patch(model, clean, corrupted, metric, site=site, by_position=True, progress=False)
    fixed = attribution_patch(model, clean, corrupted, metric, site=site, by_position=True, qk_fix=True)
    torch.testing.assert_close(fixed.values, exact.values, atol=1e-4, rtol=0)
    plain = attribution_patch(model, clean, corrupted, metric, site=site, by_position=True, qk_fix=False)
    assert (plain.values - exact.values).abs().max() >= (fixed.values - exact.values).abs().max()


def test_attribution_tracks_exact_patching_on_a_trained_twin(tiny_pair):
    tc = trigger_contrast(tiny_pair, n=16)
    metric = tc.logit_diff()
    exact = activation_patch(tiny_pair.backdoored, tc.triggered, tc.control, metric, site="attn_out",
                             by_position=True, progress=False)
    approx = attribution_patch(tiny_pair.backdoored, tc.triggered, tc.control, metric, site="attn_out",
                               by_position=True)
    a, b = exact.effect.mean(-1).flatten(), approx.effect.mean(-1).flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8
    assert torch.equal(exact.baseline, approx.baseline) or torch.allclose(exact.baseline, approx.baseline, atol=1e-5)
