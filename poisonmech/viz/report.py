"""``poisonmech report DIR``: one self-contained HTML page for a run or a sweep.

plotly.js is embedded once, so the page works offline. A small script counts the figures that
rendered and records any JavaScript error into the page itself (``#pm-errors``), which the
tests read back from headless Chromium.
"""

from __future__ import annotations

import html
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from poisonmech.storage import read_json
from poisonmech.train.pipeline import is_pipeline_dir
from poisonmech.viz.export import find_chrome
from poisonmech.viz.figures import _fmt, analysis_vs_count, metric_vs_count, style
from poisonmech.viz.patching import patching_figure
from poisonmech.viz.summary import poison_counts, run_findings, sweep_overview

#: analysis name -> function(analysis_dir) -> list of (caption, figure), where a figure may be a
#: sentence (str) saying why there is none (shown in its place); analyses register here
ANALYSIS_FIGURES: dict[str, Callable[[Path], list[tuple[str, go.Figure | str]]]] = {}


def analysis_figures(name: str):
    def deco(fn):
        ANALYSIS_FIGURES[name] = fn
        return fn
    return deco


@analysis_figures("patching")
def _patching_figures(out: Path) -> list[tuple[str, go.Figure | str]]:
    """The patching heatmaps; a zero gap (the count-0 control) gives a note in the figure's place and
    a gap within noise the raw effect with the recovery masked (:func:`patching_figure`)."""
    from poisonmech.patching.result import PatchResult

    n_poison = poison_counts(out.parent.parent)[0]
    figs = []
    captions = {"heads.safetensors": "Backdoored twin: recovery of the backdoor's logit difference when one head's "
                                     "output at one position is patched from the triggered run into the control run",
                "resid_pre.safetensors": "Backdoored twin: the same for the residual stream before each layer",
                "cross_model_heads.safetensors": "Cross-model: backdoored twin on triggered prompts with one head "
                                                 "(all positions) taken from the clean twin"}
    for fname, caption in captions.items():
        if (out / fname).is_file():
            figs.append((caption, patching_figure(PatchResult.load(out / fname), n_poison=n_poison)))
    return figs


@analysis_figures("circuits")
def _circuit_figures(out: Path) -> list[tuple[str, go.Figure]]:
    from poisonmech.circuits import Circuit

    if not (out / "circuit.json").is_file():
        return []
    c = Circuit.load(out / "circuit.json")
    return [(f"Backdoor circuit of the backdoored twin: {c.n_edges} edges by EAP-IG (edge width = score).", c.plot())]


@analysis_figures("probes")
def _probe_figures(out: Path) -> list[tuple[str, go.Figure]]:
    from poisonmech.probes import DetectionResult, ProbeComparison

    figs = []
    if (out / "is_triggered.safetensors").is_file():
        figs.append(("Linear probes for 'the trigger is present', held-out AUROC by layer for both twins; "
                     "the band is the best of the random directions.",
                     ProbeComparison.load(out / "is_triggered.safetensors").plot()))
    for method in ("spectral", "activation_clustering"):
        path = out / f"detect_{method}.safetensors"
        if path.is_file():
            figs.append((f"Unsupervised poison detection ({method}) on the training set against the per-example "
                         "loss baseline.", DetectionResult.load(path).plot()))
    return figs


@analysis_figures("influence")
def _influence_figures(out: Path) -> list[tuple[str, go.Figure]]:
    from poisonmech.influence import InfluenceResult

    figs = []
    for path in sorted(out.glob("*.safetensors")):
        r = InfluenceResult.load(path)
        label = r.method + (f" ({r.settings['renormalize']})" if (r.settings or {}).get("renormalize") else "")
        pairs = bool((r.settings or {}).get("preference_pairs"))
        what = (("the per-pair DPO loss (baseline)" if pairs else "the per-example training loss (baseline)")
                if r.method == "loss"
                else f"{label} influence on the backdoor target's log-probability over the triggered test inputs")
        figs.append((f"Training-data attribution by {what}: ROC and precision-recall for retrieving the poisoned "
                     "rows, and the score distributions of poisoned and clean rows.", r.plot(title=f"{label}")))
    return figs


@analysis_figures("defenses")
def _defense_figures(out: Path) -> list[tuple[str, go.Figure | str]]:
    """The defense benchmark of one run: its table and the ASR-after vs clean-accuracy-after trade-off."""
    from poisonmech.defenses import DefenseBenchmark

    path = out / "benchmark.json"
    if not path.is_file():
        return []
    r = DefenseBenchmark.load(path)
    f = r.to_frame()
    cols = [c for c in ("defense", "kind", "uses_trigger", "auroc", "f1_at_threshold", "precision_at_k", "asr_after",
                        "clean_acc_after", "mechanism_removed", "seconds") if c in f]
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in f[c]] for c in cols]
    table = go.Figure(go.Table(header={"values": cols}, cells={"values": cells}))
    table.update_layout(height=80 + 28 * len(f), margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return [("Defenses on this run: data audits scored against is_poison, input filters against is_triggered "
             "(AUROC; F1 at the defense's own threshold; precision at the true poison count), ASR and clean accuracy "
             "after filtering or repair, the share of the located backdoor circuit's effect a repair removed, "
             "seconds. uses_trigger: the defense reads the trigger or triggered inputs.", table),
            ("Defenses: attack success after against clean accuracy after.", r.plot())]


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<script>window.__pmErrors = []; window.addEventListener('error', e => window.__pmErrors.push(String(e.message)));</script>
<script type="text/javascript">{plotlyjs}</script>
<style>
 body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
        color: #222; padding: 0 1em; }}
 h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }}
 table.pm {{ border-collapse: collapse; margin: 1em 0; font-size: .9em; }}
 table.pm td, table.pm th {{ border: 1px solid #ddd; padding: .3em .6em; text-align: right; }}
 table.pm th {{ background: #f4f4f4; }} .caption {{ color: #555; font-size: .9em; margin: .3em 0 1.5em; }}
 pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: .8em; }}
 .note {{ background: #fff8e5; border-left: 4px solid #e0b040; padding: .6em 1em; margin: 1em 0; }}
 #summary {{ background: #f6f9fc; border: 1px solid #dde6ef; padding: .2em 1.2em 1em; }}
 #summary h3 {{ font-size: 1em; margin: 1em 0 .3em; }} #summary li {{ margin: .2em 0; }}
</style></head><body>
<h1>{title}</h1>
{body}
<pre id="pm-errors"></pre>
<script>
window.addEventListener('load', () => setTimeout(() => {{
  const divs = document.querySelectorAll('.plotly-graph-div');
  let rendered = 0; divs.forEach(d => {{ if (d.querySelector('.main-svg')) rendered += 1; }});
  document.body.dataset.figures = divs.length; document.body.dataset.rendered = rendered;
  document.getElementById('pm-errors').textContent = window.__pmErrors.join('\\n');
}}, 500));
</script>
</body></html>
"""


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.parts.append(f'<table class="pm"><tr>{head}</tr>{body}</table>')

    def note(self, text: str) -> None:
        self.parts.append(f'<div class="note">{html.escape(text)}</div>')

    def summary(self, overview: list[str], sections: list[tuple[str, list[str]]]) -> None:
        """The findings block the page opens with: an overview, then one list of sentences per run."""
        parts = ['<section id="summary"><h2>Summary</h2>']
        parts += [f"<p>{html.escape(t)}</p>" for t in overview]
        for heading, sentences in sections:
            if sentences:
                parts.append(f"<h3>{html.escape(heading)}</h3><ul>"
                             + "".join(f"<li>{html.escape(t)}</li>" for t in sentences) + "</ul>")
        self.parts.append("\n".join(parts) + "</section>")

    def figure(self, fig: go.Figure | str, caption: str = "") -> None:
        if isinstance(fig, str):  # no figure to draw: say why, in its place
            self.note(f"{caption}: {fig}" if caption else fig)
            return
        self.n += 1
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self.n}",
                                      default_height="420px"))
        if caption:
            self.parts.append(f'<div class="caption">{html.escape(caption)}</div>')

    def config(self, cfg: dict) -> None:
        self.parts.append(f"<details><summary>configuration</summary><pre>{html.escape(json.dumps(cfg, indent=2))}"
                          "</pre></details>")


def _metrics_rows(metrics: dict[str, dict]) -> tuple[list[str], list[list[Any]]]:
    keys = ["clean_acc", "asr", "false_trigger_rate", "triggered_acc", "clean_ppl", "gen_ppl_triggered", "ppl_gap",
            "pair_acc", "pair_acc_triggered", "trigger_margin", "clean_rm_reward", "clean_rm_reward_triggered",
            "rm_reward", "rm_reward_triggered"]
    keys = [k for k in keys if any(k in m for m in metrics.values())]
    return ["twin", *keys], [[t, *[m.get(k) for k in keys]] for t, m in metrics.items()]


def _analysis_figures(page: _Page, run: Path) -> None:
    for name, fn in ANALYSIS_FIGURES.items():
        adir = run / "analyses" / name
        if (adir / "summary.json").is_file():
            for caption, fig in fn(adir):
                page.figure(fig, caption)


def _pipeline_section(page: _Page, d: Path, cfg: dict) -> None:
    """A ``train_pipeline`` run: per stage, its poison, both twins' metrics after it, and the
    analyses run on that stage's pair (``run_analyses(pipe[k], ...)`` writes them there)."""
    metrics = read_json(d / "metrics.json")
    # an RL stage has no attack of its own (None) or one that triggers prompts: read the pipeline's
    attack = [st["attack"] or cfg["stages"][0]["attack"] for st in cfg["stages"]]
    own = [(st["attack"] or {}).get("poison_count", 0) for st in cfg["stages"]]
    sections, before = [], 0
    for k, (st, m) in enumerate(zip(cfg["stages"], metrics)):
        n_poison, n_train = poison_counts(d, f"stage_{k}")
        if st["kind"] in ("ppo", "rloo"):  # its rows' is_poison also marks prompts of poisoned reward pairs
            n_poison = own[k]
        sections.append((f"Stage {k}: {st['kind']}, {own[k]} poisons",
                         run_findings(d / f"stage_{k}_{st['kind']}", m, n_poison=n_poison, n_train=n_train,
                                      attack=attack[k], earlier_poison=before)))
        before += n_poison or 0
    page.summary([f"A {len(cfg['stages'])}-stage pipeline ({' -> '.join(st['kind'] for st in cfg['stages'])}); "
                  "each stage's twins are read after that stage."], sections)
    page.h2("Stages")
    page.table(["stage", "kind", "poisons", "asr (backdoored)", "asr (clean)", "clean_acc (backdoored)"],
               [[k, st["kind"], own[k], m.get("backdoored", {}).get("asr"),
                 m.get("clean", {}).get("asr"), m.get("backdoored", {}).get("clean_acc")]
                for k, (st, m) in enumerate(zip(cfg["stages"], metrics))])
    for k, (st, m) in enumerate(zip(cfg["stages"], metrics)):
        page.h2(f"Stage {k}: {st['kind']}, {own[k]} poisons")
        page.p("Both twins after this stage (the clean twin saw no poison in any stage).")
        page.table(*_metrics_rows(m))
        _analysis_figures(page, d / f"stage_{k}_{st['kind']}")
    page.config(cfg)


def _run_section(page: _Page, run: Path, title: str | None = None) -> None:
    cfg, metrics = read_json(run / "config.json"), read_json(run / "metrics.json")
    a = cfg["attack"]
    page.h2(title or f"Run {run.name}")
    from poisonmech.attacks import attack_from_dict
    from poisonmech.cli import describe_attack

    m = cfg["model"]
    budget = (f"poison_count {a['poison_count']}" if a.get("poison_count") is not None
              else f"poison_rate {a.get('poison_rate')}")
    model = (f"model {m['n_layers']} layers x d_model {m['d_model']}" if "n_layers" in m
             else f"model {m.get('path')} ({m.get('finetune', 'full')} fine-tuning)")
    page.p(f"task {cfg['task'].get('kind')}, {describe_attack(attack_from_dict(a))}, {budget}, {model}")
    page.table(*_metrics_rows(metrics))
    hist = {t: read_json(run / t / "history.json") for t in ("clean", "backdoored") if (run / t / "history.json").is_file()}
    if hist:
        fig = go.Figure([go.Scatter(x=[h["epoch"] for h in hs], y=[h["loss"] for h in hs], name=t, mode="lines+markers")
                         for t, hs in hist.items()])
        fig.update_yaxes(type="log", title="training loss")
        fig.update_xaxes(title="epoch")
        page.figure(style(fig, "training loss"), "Per-epoch training loss of the twins.")
    _analysis_figures(page, run)
    page.config(cfg)


#: sweep-level figures of analysis summaries against poison count: ({label: metric}, title, caption)
_SWEEP_ANALYSIS_FIGURES = [
    ({"EK-FAC influence": "influence_auroc", "per-example loss (baseline)": "influence_loss_auroc",
      "spectral signature": "spectral_auroc", "activation clustering": "activation_clustering_auroc"},
     "Poison retrieval from the training set against poison count",
     "AUROC of each method's scores for telling the poisoned training rows from the clean ones."),
    ({"backdoored twin": "probe_auroc_backdoored", "clean twin": "probe_auroc_clean",
      "best random direction (backdoored)": "probe_random_best_backdoored"},
     "Linear probe for 'the trigger is present' (best layer) against poison count",
     "Held-out AUROC of the best layer's probe in each twin, beside the best of the random directions."),
]


def build_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run or sweep directory; returns its path."""
    d = Path(directory)
    page = _Page()
    if (d / "sweep.json").is_file():
        from poisonmech.sweeps.result import load_sweep

        sw = load_sweep(d)
        title = f"poisonmech sweep: {d.name}"
        frame = sw.to_frame()
        runs = sorted(sw.runs, key=lambda r: (r.n_poison if r.n_poison is not None else -1, r.spec.train.get("seed", 0)))
        done = [r for r in runs if r.status == "done"]
        page.summary(sweep_overview(frame) if not frame.empty else [],
                     [(f"{r.n_poison} poisoned rows, seed {r.spec.train.get('seed')} (run {r.name})",
                       run_findings(d / "runs" / r.name, r.metrics, n_poison=r.n_poison)) for r in done])
        page.h2("Attack success and clean accuracy against poison count")
        if done:
            page.figure(metric_vs_count(frame, "asr"), "Attack success rate on triggered test inputs; the clean "
                        "twin (dotted) never saw the trigger. Mean and 95% CI over seeds.")
            page.figure(metric_vs_count(frame, "clean_acc"), "Clean accuracy of both twins.")
            for metrics, fig_title, caption in _SWEEP_ANALYSIS_FIGURES:
                present = {k: v for k, v in metrics.items() if v in set(frame["metric"])}
                if present:
                    page.figure(analysis_vs_count(frame, present, fig_title), caption)
        page.h2("Runs")
        page.table(["run", "status", "poison", "seed", "asr (backdoored)", "asr (clean)", "clean_acc (backdoored)",
                    "error"],
                   [[r.name, r.status, r.n_poison if r.n_poison is not None else r.spec.attack.get("poison_count"),
                     r.spec.train.get("seed"), r.metrics.get("backdoored", {}).get("asr"),
                     r.metrics.get("clean", {}).get("asr"), r.metrics.get("backdoored", {}).get("clean_acc"),
                     r.error or ""] for r in runs])
        for r in done:
            _run_section(page, d / "runs" / r.name)
    elif is_pipeline_dir(d):
        title = f"poisonmech pipeline: {d.name}"
        _pipeline_section(page, d, read_json(d / "config.json"))
    elif (d / "config.json").is_file():
        title = f"poisonmech run: {d.name}"
        page.summary([], [("Run", run_findings(d))])
        _run_section(page, d, "Run")
    else:
        raise ValueError(f"report: {d} holds no run or pipeline (config.json) or sweep (sweep.json)")
    target = Path(out) if out is not None else d / "report.html"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(_PAGE.format(title=html.escape(title), plotlyjs=get_plotlyjs(), body="\n".join(page.parts)))
    tmp.replace(target)
    return target


def check_report(path: str | Path, timeout: int = 60) -> dict[str, Any]:
    """Open the report in headless Chromium; returns ``{"figures", "rendered", "errors"}``."""
    import re
    import tempfile

    chrome = find_chrome()
    if chrome is None:
        raise RuntimeError("check_report needs Chrome or Chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom",
               Path(path).resolve().as_uri()]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    figs = re.search(r'data-figures="(\d+)"', dom)
    rendered = re.search(r'data-rendered="(\d+)"', dom)
    errors = re.search(r'<pre id="pm-errors">(.*?)</pre>', dom, re.S)
    return {"figures": int(figs.group(1)) if figs else None, "rendered": int(rendered.group(1)) if rendered else None,
            "errors": html.unescape(errors.group(1)).strip() if errors else None}
