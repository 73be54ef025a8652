"""Publication figures built from sweep tables and analysis results (plotly, one template)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

TEMPLATE = "plotly_white"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def style(fig: go.Figure, title: str | None = None) -> go.Figure:
    """The house style: white template, readable fonts, legend on top."""
    fig.update_layout(template=TEMPLATE, title=title, font={"size": 13},
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
                      margin={"l": 60, "r": 20, "t": 70, "b": 50})
    return fig


def _mean_ci(values: pd.Series) -> tuple[float, float, float]:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return np.nan, np.nan, np.nan
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return m, m - half, m + half


def _sweep_counts(frame: pd.DataFrame) -> list[int]:
    return sorted({int(c) for c in pd.to_numeric(frame["n_poison"], errors="coerce").dropna()}) \
        if "n_poison" in frame else []


def count_axis(fig: go.Figure, counts) -> go.Figure:
    """The poison-count x-axis every sweep figure shares: log scale, count 0 drawn at 0.5, one
    labelled tick per count of the sweep and no minor ticks, and the same range for every figure
    given the same ``counts`` (so figures whose methods skip count 0 line up with the others)."""
    counts = sorted({int(c) for c in counts})
    xs = [float(c) if c > 0 else 0.5 for c in counts]
    fig.update_xaxes(type="log", title="poisoned training examples (log scale; 0 drawn at the left)",
                     minor={"ticks": "", "showgrid": False})
    if xs:
        lo, hi = np.log10(min(xs)), np.log10(max(xs))
        pad = 0.1 * max(hi - lo, 1.0)
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=[str(c) for c in counts], range=[lo - pad, hi + pad])
    return fig


def metric_vs_count(frame: pd.DataFrame, metric: str = "asr", group: str | None = None,
                    twins: tuple[str, ...] = ("backdoored", "clean"), title: str | None = None,
                    counts=None) -> go.Figure:
    """``metric`` against poison count (log x; count 0 drawn at 0.5), mean and 95% band over seeds.

    ``frame`` is ``Sweep.to_frame()``; ``group`` splits lines by a config column such as
    ``n_train`` or ``d_model``. ``counts``: the poison counts on the x-axis (default: every
    count in ``frame``, also those without a value of ``metric``), see :func:`count_axis`.
    """
    counts = _sweep_counts(frame) if counts is None else counts
    f = frame[(frame["metric"] == metric) & frame["twin"].isin(twins)].copy()
    f["value"] = pd.to_numeric(f["value"], errors="coerce")
    f["x"] = f["n_poison"].astype(float).replace(0.0, 0.5)
    fig = go.Figure()
    groups = [(None, f)] if group is None else list(f.groupby(group))
    k = 0
    for gval, gf in groups:
        for twin in twins:
            tf = gf[gf["twin"] == twin]
            if tf.empty:
                continue
            stats = tf.groupby("x")["value"].apply(_mean_ci)
            xs = stats.index.to_numpy()
            mean, lo, hi = (np.array([s[i] for s in stats]) for i in range(3))
            color = COLORS[k % len(COLORS)]
            name = twin if gval is None else f"{twin}, {group}={gval}"
            fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                                     fill="toself", fillcolor=color, opacity=0.15, line={"width": 0},
                                     hoverinfo="skip", showlegend=False))
            fig.add_trace(go.Scatter(x=xs, y=mean, mode="lines+markers", name=name, line={"color": color},
                                     line_dash="solid" if twin == "backdoored" else "dot"))
            k += 1
    count_axis(fig, counts)
    fig.update_yaxes(title=metric, rangemode="tozero")
    return style(fig, title or f"{metric} against poison count (mean and 95% CI over seeds)")


def analysis_vs_count(frame: pd.DataFrame, metrics: dict[str, str], title: str, yaxis: str = "AUROC",
                      chance: float | None = 0.5) -> go.Figure:
    """Analysis summaries (the sweep table's ``twin == "analysis"`` rows) against poison count:
    one line per ``{label: metric}`` entry, mean and 95% band over seeds, with a chance line.
    The x-axis spans every poison count of ``frame`` (as :func:`metric_vs_count`'s does), also
    counts where a method has no value (the clean control has nothing to retrieve)."""
    counts = _sweep_counts(frame)
    f = frame[(frame["twin"] == "analysis") & frame["metric"].isin(list(metrics.values()))].copy()
    names = {m: label for label, m in metrics.items()}
    f["twin"] = f["metric"].map(names)
    f["metric"] = yaxis
    fig = metric_vs_count(f, yaxis, twins=tuple(label for label in metrics if label in set(f["twin"])), title=title,
                          counts=counts)
    fig.update_traces(line_dash="solid")
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="grey", annotation_text="chance")
    return fig


def metrics_table(metrics: dict[str, dict], keys: tuple[str, ...] = ("clean_acc", "asr", "false_trigger_rate",
                                                                     "clean_ppl", "ppl_gap")) -> go.Figure:
    """Both twins' metrics as a table figure."""
    cols = [k for k in keys if any(k in m for m in metrics.values())]
    cells = [list(metrics)] + [[_fmt(metrics[t].get(k)) for t in metrics] for k in cols]
    fig = go.Figure(go.Table(header={"values": ["twin", *cols]}, cells={"values": cells}))
    fig.update_layout(height=120 + 30 * len(metrics))
    return style(fig, "metrics")


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)
