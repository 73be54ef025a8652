"""The report's patching heatmaps: the gap test against scipy, and what is drawn when there is no gap."""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from scipy import stats

from poisonmech.patching.result import PatchResult
from poisonmech.viz.patching import gap_check, patching_figure
from poisonmech.viz.summary import top_cells


def _result(gaps, effects=None, seed=0, shape=(2, 3)):
    """A (layer, head) patching result with per-example gap ``gaps`` (reference - baseline)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.as_tensor(gaps, dtype=torch.float64).float()
    baseline = torch.randn(len(gaps), generator=g)
    eff = effects if effects is not None else torch.randn(*shape, len(gaps), generator=g)
    return PatchResult(values=baseline + eff, axes=("layer", "head"), site="attn_head", mode="denoise",
                       method="exact", baseline=baseline, reference=baseline + gaps)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shift", [0.0, 0.3, 0.8, 3.0])
def test_gap_within_noise_is_scipys_one_sample_t_test(seed, shift):
    rng = np.random.default_rng(seed)
    gaps = rng.normal(shift, 1.0, size=8)
    chk = gap_check(_result(gaps))
    ref = stats.ttest_1samp(gaps, 0.0)
    assert chk.mean == pytest.approx(gaps.mean(), abs=1e-6) and chk.sd == pytest.approx(gaps.std(ddof=1), rel=1e-5)
    assert chk.within_noise == bool(ref.pvalue >= 0.05)
    assert not chk.zero


def test_gap_check_cases_and_bad_alpha():
    assert gap_check(_result([0.0, 0.0, 0.0])).zero and gap_check(_result([0.0, 0.0])).within_noise
    assert not gap_check(_result([12.0, 11.5, 12.4, 12.1])).within_noise
    one = gap_check(_result([0.4]))  # one prompt: its spread, and so its noise, is unknown
    assert one.n == 1 and one.within_noise and not one.zero and np.isnan(one.threshold)
    assert "one prompt" in patching_figure(_result([0.4])).layout.title.subtitle.text
    with pytest.raises(ValueError, match="alpha must be in"):
        gap_check(_result([1.0, 2.0]), alpha=1.5)


def test_patching_figure_notes_a_zero_gap_and_masks_a_noisy_one():
    note = patching_figure(_result([0.0, 0.0, 0.0, 0.0]), n_poison=0)
    assert isinstance(note, str) and "gap 0" in note and "no backdoor" in note
    noisy = _result([0.03, -0.02, 0.01, -0.015])  # the count-0 picture: recovery of noise over noise
    assert noisy.recovery.abs().max() > 1.0
    fig = patching_figure(noisy, title="heads")
    assert isinstance(fig, go.Figure)
    note = fig.layout.title.subtitle.text
    assert "recovery masked" in note and "within noise" in note and "raw effect" in fig.layout.title.text
    # the heatmap shows the raw effect (no division by the gap), not the recovery
    np.testing.assert_allclose(np.asarray(fig.data[0].z), noisy.effect.mean(-1).numpy(), rtol=1e-6)
    strong = _result([10.0, 9.0, 11.0, 10.5])
    fig = patching_figure(strong)
    assert "masked" not in fig.layout.title.subtitle.text and "mean gap 10.125" in fig.layout.title.subtitle.text
    np.testing.assert_allclose(np.asarray(fig.data[0].z), strong.recovery.numpy(), rtol=1e-6)


def test_top_cells_match_a_hand_computation():
    rng = np.random.default_rng(1)
    gaps = rng.normal(5.0, 0.5, size=6)
    eff = rng.normal(0.0, 1.0, size=(2, 3, 6))
    eff[1, 2] += 4.0  # the backdoor head
    eff[0, 1] -= 3.0  # a strong negative cell ranks second by |recovery|
    r = _result(gaps, effects=torch.tensor(eff, dtype=torch.float32))
    cells = top_cells(r, k=2)
    assert list(cells["cell"]) == ["L1.H2", "L0.H1"]
    gap = gaps.mean()
    for (layer, head), row in zip([(1, 2), (0, 1)], cells.itertuples()):
        per_prompt = eff[layer, head] / gap
        assert row.recovery == pytest.approx(per_prompt.mean(), rel=1e-4)
        assert row.recovery == pytest.approx(float(r.recovery[layer, head]), rel=1e-4)
        assert row.sd == pytest.approx(per_prompt.std(ddof=1), rel=1e-4) and row.n == 6
    assert top_cells(_result([0.0, 0.0])).empty
