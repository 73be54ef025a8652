"""Figures (plotly, one house style), static/HTML export and the self-contained HTML report."""

from poisonmech.viz.export import FORMATS, find_chrome, save_figure
from poisonmech.viz.figures import (
           analysis_vs_count,
           count_axis,
           metric_vs_count,
           metrics_table,
           style,
)
from poisonmech.viz.patching import GapCheck, gap_check, patching_figure
from poisonmech.viz.report import build_report, check_report
from poisonmech.viz.summary import rate_text, run_findings, sweep_overview, top_cells

__all__ = ["FORMATS", "GapCheck", "analysis_vs_count", "build_report", "check_report", "count_axis", "find_chrome",
           "gap_check", "metric_vs_count", "metrics_table", "patching_figure", "rate_text", "run_findings",
           "save_figure", "style", "sweep_overview", "top_cells"]
