"""Patching heatmaps for the report, with the caveat a reader needs when there is nothing to recover.

A patching result's recovery divides each cell's mean effect by the mean gap between the run
patched from and the run patched into (``reference - baseline``: for the backdoor, the triggered
minus the control logit difference). When that gap is zero (the count-0 control: both twins are
the same model) there is nothing to recover and the heatmap would be blank; when it is within
noise, the recovery of every cell is a ratio of noise to noise (values of +-5 to 8 on the tiny
gap of a model without a backdoor). :func:`gap_check` decides which case holds with a one-sample
t-test of the per-example gaps (``scipy.stats``; a single prompt counts as noise, its spread
being unknown), and :func:`patching_figure` then shows, in place
of the recovery heatmap, a note (zero gap) or the raw effect with the recovery masked and a note
in the figure (gap within noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from scipy import stats

#: a gap this small on every example counts as exactly zero (PatchResult's own NaN rule)
ZERO_GAP = 1e-6


@dataclass(frozen=True)
class GapCheck:
    """The per-example gap ``reference - baseline`` of a patching result, summarised.

    Attributes:
        mean, sd: mean and standard deviation (ddof 1) over the examples.
        n: number of examples.
        threshold: the largest ``|mean|`` that a two-sided one-sample t-test at level ``alpha``
            does not tell from zero (``t_{1 - alpha/2, n - 1} * sd / sqrt(n)``); NaN when ``n < 2``.
        alpha: the test level.
        max_abs: the largest ``|gap|`` of any example.
    """

    mean: float
    sd: float
    n: int
    threshold: float
    alpha: float
    max_abs: float

    @property
    def zero(self) -> bool:
        """Every example's gap is (numerically) zero: the two runs are the same."""
        return self.max_abs < ZERO_GAP

    @property
    def within_noise(self) -> bool:
        """The mean gap cannot be told from zero: zero, ``|mean| <= threshold``, or a single
        example (whose spread, and so whose noise, is unknown)."""
        return bool(self.zero or self.n < 2 or abs(self.mean) <= self.threshold)

    @property
    def sem(self) -> float:
        return self.sd / np.sqrt(self.n) if self.n > 1 else float("nan")

    def describe(self) -> str:
        spread = f" ± {self.sem:.3f} SE" if self.n > 1 else ""
        return f"mean gap {self.mean:.3f}{spread} over {self.n} prompt{'s' if self.n != 1 else ''}"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"mean": self.mean, "sd": self.sd, "sem": self.sem, "n": self.n,
                              "threshold": self.threshold, "alpha": self.alpha, "max_abs": self.max_abs,
                              "zero": self.zero, "within_noise": self.within_noise}])


def gap_check(result, alpha: float = 0.05) -> GapCheck:
    """Is the gap that ``result``'s recovery divides by distinguishable from zero?

    ``result`` is a :class:`~poisonmech.patching.result.PatchResult`; the test is a two-sided
    one-sample t-test of the per-example gaps at level ``alpha`` (with two or more examples,
    ``within_noise`` exactly when ``scipy.stats.ttest_1samp(gaps, 0).pvalue >= alpha``).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"gap_check: alpha must be in (0, 1), got {alpha!r}")
    gaps = (result.reference - result.baseline).detach().double().cpu().numpy().reshape(-1)
    n = int(gaps.size)
    if n == 0:
        raise ValueError("gap_check: the patching result holds no examples")
    mean = float(gaps.mean())
    sd = float(gaps.std(ddof=1)) if n > 1 else float("nan")
    thr = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    return GapCheck(mean=mean, sd=sd, n=n, threshold=thr, alpha=alpha, max_abs=float(np.abs(gaps).max()))


def patching_figure(result, title: str | None = None, n_poison: int | None = None,
                    alpha: float = 0.05) -> go.Figure | str:
    """The recovery heatmap of ``result``, or what to show instead.

    Returns a plotly Figure, or a sentence (str) to print in the figure's place when the gap is
    exactly zero (``n_poison == 0`` adds that there is no backdoor). A gap within noise gives
    the raw effect heatmap (the change of the metric, no division by the gap) with the recovery
    masked and the reason written in the figure.
    """
    chk = gap_check(result, alpha)
    control = " With 0 poisoned training rows there is no backdoor, so there is nothing to patch." \
        if n_poison == 0 else ""
    if chk.zero:
        return (f"No heatmap: the two runs give the same metric on every one of the {chk.n} prompts (gap 0), "
                f"so no cell has anything to recover.{control}")
    if chk.within_noise:
        fig = result.plot("effect", title=title and f"{title}: raw effect")
        fig.update_layout(title_text=f"{fig.layout.title.text} (recovery masked)")
        why = f"not distinguishable from zero at level {alpha:g}" if chk.n >= 2 else "one prompt: its noise is unknown"
        note = (f"recovery masked: the gap is within noise ({chk.describe()}, {why});<br>"
                "the cells show the raw change of the metric")
    else:
        fig = result.plot("recovery", title=title)
        note = f"recovery = mean effect / mean gap; {chk.describe()}"
    # the caveat sits under the title (plotly's subtitle), where it cannot cover the cells or axis labels
    color = "#a33" if chk.within_noise else "#555"
    fig.update_layout(title={"text": fig.layout.title.text,
                             "subtitle": {"text": note, "font": {"size": 11, "color": color}}},
                      margin={"t": 110})
    return fig


__all__ = ["GapCheck", "gap_check", "patching_figure"]
