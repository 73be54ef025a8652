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
from tests.conftest import tiny_model_config, tiny_task, tiny_train_config

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
def test_static_export_png_svg_pdf(tmp_path, small_sweep):
    files = save_figure(metric_vs_count(small_sweep.to_frame()), tmp_path / "fig", formats=("png", "svg", "pdf"))
    assert [f.suffix for f in files] == [".png", ".svg", ".pdf"] and all(f.stat().st_size > 1000 for f in files)


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
