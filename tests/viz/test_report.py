import html
import os
import re

import pytest
from typer.testing import CliRunner

import poisonmech as pm
from poisonmech.cli import app
from poisonmech.viz import (
    analysis_vs_count,
    build_report,
    check_report,
    find_chrome,
    metric_vs_count,
    save_figure,
)
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

needs_chrome = pytest.mark.skipif(find_chrome() is None, reason="needs Chromium/Chrome (apt-get install chromium); "
                                                                ".ci/run installs it")


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return pm.sweep(tiny_task(n_train=96), [pm.Backdoor(trigger="cf", poison_count=k) for k in (0, 6)], seeds=[0, 1],
                    models=[tiny_model_config()], train=tiny_train_config(epochs=2), out_dir=out,
                    analyses=["patching", "influence"], max_workers=1, progress=False)


def test_metric_vs_count_has_a_band_and_a_line_per_twin(small_sweep):
    fig = metric_vs_count(small_sweep.to_frame(), "asr")
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["backdoored", "clean"]
    assert fig.layout.xaxis.type == "log"


def test_influence_analysis_joins_the_sweep_table_and_its_figure(small_sweep):
    frame = small_sweep.to_frame()
    rows = frame[(frame["twin"] == "analysis") & (frame["metric"] == "influence_auroc")]
    assert sorted(rows["n_poison"].unique()) == [6]  # the clean control has nothing to retrieve
    assert all(0.0 <= float(v) <= 1.0 for v in rows["value"])
    fig = analysis_vs_count(frame, {"EK-FAC": "influence_auroc", "loss": "influence_loss_auroc"}, "retrieval")
    assert [t.name for t in fig.data if t.showlegend is not False] == ["EK-FAC", "loss"]


def test_html_export_works_without_a_browser(tmp_path, small_sweep):
    [html] = save_figure(metric_vs_count(small_sweep.to_frame()), tmp_path / "fig", formats=("html",))
    assert html.suffix == ".html" and "plotly" in html.read_text()[:5000].lower()
    with pytest.raises(ValueError, match="formats must be among"):
        save_figure(metric_vs_count(small_sweep.to_frame()), tmp_path / "fig", formats=("gif",))


def test_static_export_without_chrome_says_what_to_install(tmp_path, small_sweep, monkeypatch):
    import poisonmech.viz.export as export

    monkeypatch.setattr(export, "find_chrome", lambda: None)
    with pytest.raises(RuntimeError, match="apt-get install chromium"):
        save_figure(metric_vs_count(small_sweep.to_frame()), tmp_path / "fig", formats=("png",))


@needs_chrome
def test_static_export_png_svg_pdf(tmp_path, small_sweep, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    files = save_figure(metric_vs_count(small_sweep.to_frame()), tmp_path / "fig", formats=("png", "svg", "pdf"))
    assert [f.suffix for f in files] == [".png", ".svg", ".pdf"] and all(f.stat().st_size > 1000 for f in files)
    assert "BROWSER_PATH" not in os.environ  # set for the export only, not for the whole process


@needs_chrome
def test_sweep_report_renders_every_figure_without_errors(small_sweep):
    path = build_report(small_sweep.out_dir)
    assert "<script" in path.read_text()[:2000]  # plotly.js embedded: works offline
    state = check_report(path)
    assert state["figures"] and state["figures"] == state["rendered"]
    assert state["errors"] == ""


def test_report_cli_and_bad_directory(tmp_path, small_sweep):
    result = CliRunner().invoke(app, ["report", str(small_sweep.out_dir)])
    assert result.exit_code == 0 and "report.html" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "holds no run" in result.output


def test_analyze_cli_writes_cached_summaries(small_sweep):
    run = small_sweep.out_dir / "runs" / small_sweep.runs[-1].name
    result = CliRunner().invoke(app, ["analyze", str(run), "--patching"])
    assert result.exit_code == 0, result.output
    assert "patching_top_head" in result.output and (run / "analyses" / "patching" / "heads.safetensors").is_file()


def _text(page: str) -> str:
    """The page's text: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_sweep_report_title_is_the_sweeps_not_a_figures(small_sweep):
    page = build_report(small_sweep.out_dir).read_text()
    want = f"poisonmech sweep: {small_sweep.out_dir.name}"
    assert html.unescape(re.search(r"<title>(.*?)</title>", page).group(1)) == want
    assert html.unescape(re.search(r"<h1>(.*?)</h1>", page).group(1)) == want


def test_every_count_figure_shares_one_axis_with_a_tick_per_count(small_sweep):
    frame = small_sweep.to_frame()
    asr = metric_vs_count(frame, "asr")
    retrieval = analysis_vs_count(frame, {"EK-FAC": "influence_auroc", "loss": "influence_loss_auroc"}, "retrieval")
    for fig in (asr, retrieval):
        ax = fig.layout.xaxis
        assert ax.type == "log" and ax.tickmode == "array"
        assert list(ax.tickvals) == [0.5, 6.0] and list(ax.ticktext) == ["0", "6"]  # only the counts
        assert ax.minor.ticks == ""
    # retrieval has no value at count 0 (nothing to retrieve) but spans the same range as the rest
    assert list(retrieval.layout.xaxis.range) == list(asr.layout.xaxis.range)


def test_report_opens_with_findings_in_sentences_with_numbers(small_sweep):
    import json

    page = build_report(small_sweep.out_dir).read_text()
    start, first_fig = page.index('<section id="summary">'), page.index('class="plotly-graph-div"')
    assert start < first_fig  # findings first, charts after
    summary = _text(page[start:page.index("</section>", start)])
    assert "Clean control" in summary and "no poisoned training rows" in summary
    poisoned = next(r for r in small_sweep.runs if r.status == "done" and r.n_poison)
    inf = json.loads((small_sweep.out_dir / "runs" / poisoned.name / "analyses" / "influence" / "summary.json")
                     .read_text())
    assert f"{poisoned.n_poison} of 96 ({100 * poisoned.n_poison / 96:.1f}%) training rows poisoned" in summary
    assert f"influence AUROC {inf['influence_auroc']:.3f}" in summary
    assert f"loss baseline's AUROC {inf['influence_loss_auroc']:.3f}" in summary
    m = poisoned.metrics["backdoored"]
    assert f"Backdoored twin: ASR {m['asr']:.3f}" in summary
    assert "Exact patching" in summary and "Cross-model patching" in summary


def test_count_zero_cross_model_heatmap_is_a_note_saying_why(small_sweep):
    page = _text(build_report(small_sweep.out_dir).read_text())
    # the count-0 twins are the same model: no heatmap, a note in its place
    assert "No heatmap: the two runs give the same metric on every one of" in page
    assert "With 0 poisoned training rows there is no backdoor, so there is nothing to patch" in page


def test_run_findings_give_each_rate_its_denominator(small_sweep):
    from poisonmech.viz.summary import rate_text, run_findings

    assert rate_text({"asr": 1.0, "n_asr": 248}, "asr") == "ASR 1.000 (248/248 triggered rows)"
    assert rate_text({"clean_acc": 0.75, "n_clean_acc": 20}, "clean_acc") == "clean accuracy 0.750 (15/20 clean rows)"
    assert rate_text({"clean_acc": 0.7412}, "clean_acc") == "clean accuracy 0.741"  # no denominator known
    assert rate_text({"clean_acc": 0.7412, "n_clean_acc": 20}, "clean_acc") == "clean accuracy 0.741 (n = 20 clean rows)"
    assert rate_text({}, "asr") is None
    run = small_sweep.out_dir / "runs" / small_sweep.runs[-1].name
    metrics = {"backdoored": {"asr": 0.5, "n_asr": 10, "clean_acc": 0.9, "n_clean_acc": 10},
               "clean": {"asr": 0.0, "n_asr": 10}}
    text = " ".join(run_findings(run, metrics))
    assert "Backdoored twin: ASR 0.500 (5/10 triggered rows), clean accuracy 0.900 (9/10 clean rows)" in text
    assert "Clean twin: ASR 0.000 (0/10 triggered rows)" in text


def test_circuit_findings_carry_the_intact_twins_denominators():
    from poisonmech.viz.summary import _circuit_sentence

    s = {"circuit_faithfulness": 0.9, "circuit_edges": 10, "circuit_nodes": 5, "complement_faithfulness": 0.1,
         "asr_circuit_ablated": 0.25, "clean_acc_circuit_ablated": 1.0}
    text = _circuit_sentence(s, {"asr": 1.0, "n_asr": 248, "clean_acc": 0.998, "n_clean_acc": 500})
    assert text.startswith("Backdoor circuit (EAP-IG): 10 edges on 5 nodes, faithfulness 0.900 (its complement 0.100)")
    assert "ASR 0.250 (62/248 triggered rows) (intact: 1.000)" in text
    assert "clean accuracy 1.000 (500/500 clean rows) (intact: 0.998)" in text
    assert _circuit_sentence({"circuit_faithfulness": 0.5}, {}) == "Backdoor circuit (EAP-IG): faithfulness 0.500."
    assert _circuit_sentence({}, {}) is None
