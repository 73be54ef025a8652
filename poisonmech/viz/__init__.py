"""Figures (plotly, one house style), static/HTML export and the self-contained HTML report."""

from poisonmech.viz.export import FORMATS, find_chrome, save_figure
from poisonmech.viz.figures import analysis_vs_count, metric_vs_count, metrics_table, style
from poisonmech.viz.report import build_report, check_report

__all__ = ["FORMATS", "analysis_vs_count", "build_report", "check_report", "find_chrome", "metric_vs_count", "metrics_table",
           "save_figure", "style"]
