"""Poisoning without a trigger: where does a planted false fact live, and can its rows be found?

A knowledge task (``pm.make_task("facts")``: fictional countries x relations, rendered through
paraphrases, one held out of training) and a small model that learns it. Two ``pm.FalseFact``
attacks, each at poison counts 1 / 3 / 10 / 30 over seeds:

- **existing fact**: ``poison_count`` of the training rows stating one fact (about 60 of them at
  the default sizes) are rewritten with a false object, so the false fact competes with the
  true one in the remaining rows;
- **new subject**: ``poison_count`` rows about a subject the task lacks are added (the clean twin
  sees their untouched source rows in those slots).

Per run: the knowledge-editing metrics of both twins (efficacy on the fact's training
templates, generalisation to the held-out paraphrase, specificity on neighbouring subjects,
the log-probability margin, each with its denominator ``n_``), the influence retrieval AUROC
of the poisoned rows (EK-FAC on unit-normalised gradients, aggregated over the fact's prompts:
the ``influence`` analysis) and the unsupervised detectors' AUROC
(``pm.probes.detect_poison_methods``: spectral signatures, activation clustering; the
per-example loss as baseline). At one count (``--trace-count``, default the largest; first seed), causal tracing
(ROME; ``pm.patching.causal_trace``, subject spans from ``tasks.subject_spans``) at
``mlp_out`` and ``resid_post`` of both twins: on the attacked fact's prompts (the clean twin
measured on the true object, the poisoned twin on the false one) and on facts the twin knows
(test prompts of other facts it answers right). Each prompt's layer x position map is folded
into ROME's token roles (first / middle / last subject token, first subsequent token, further
tokens, last token) so prompts of different templates average together. With a 2-layer model
ROME's window of 10 layers would restore every layer at once: the MLP window here is
``--trace-window`` (default 1, one layer).

The same for ``pm.Bias`` (an entity's mentions pulled to "negative" on the sentiment task) in a
short table: label shift on held-out mention forms, the control entity's shift, clean
accuracy, influence and detector AUROC against count.

Writes ``figures/false_facts.csv`` (one row per run x twin), ``figures/false_facts_trace.csv``
(twin x prompts x site x layer x role: mean normalised indirect effect over prompts, its spread
over noise draws, the sd over prompts, ``n_prompts``), ``figures/false_facts_bias.csv``,
``figures/false_facts.{html,png}`` (metrics and AUROCs against count),
``figures/false_facts_trace.{html,png}`` (the maps side by side) and
``figures/false_facts_bias.{html,png}``, and prints the verdicts.
Run: ``.venv/bin/python experiments/false_facts.py [--counts 1,3,10,30] [--seeds 0,1,2] [--workers 2]``
(``--plot-only`` redraws from the CSVs; ``--no-bias`` skips the bias sweep).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from plotly.subplots import make_subplots

import poisonmech as pm
from poisonmech.encoding import completion_text
from poisonmech.tasks.facts import SUBJECT_POOL, knowledge_base, subject_spans
from poisonmech.viz import save_figure, style

#: ROME's token roles, in the order the maps show them (positions before the subject carry no
#: effect by construction and are left out)
ROLES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
         "further tokens", "last token")
SITES = ("mlp_out", "resid_post")
FF_METRICS = ("efficacy", "generalisation", "specificity", "margin", "specificity_margin", "true_acc", "clean_acc")
BIAS_METRICS = ("clean_acc", "label_acc", "label_shift", "polarity_rate", "base_polarity_rate", "seen_label_shift",
                "other_entity_label_shift", "margin_shift", "other_entity_margin_shift")
DETECTORS = ("spectral", "activation_clustering")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------- the attacks
def facts_setup(args) -> tuple[pm.Task, dict[str, list]]:
    """The knowledge task and the two attack families (one FalseFact per count)."""
    task = pm.make_task("facts", n_train=args.n_train, n_test=args.n_test, seed=0, n_subjects=args.n_subjects,
                        relations=args.relations.split(","), paraphrases=args.paraphrases, heldout_paraphrases=1)
    kb = knowledge_base(task)
    rel = kb.relations[0]
    subject = kb.subjects[0]
    true = kb.facts[(subject, rel)]
    target = next(o for o in kb.objects[rel] if o != true)
    new = next(s for s in SUBJECT_POOL if s not in kb.subjects)
    new_target = next(o for o in kb.objects[rel] if o != target)
    families = {
        "existing": [pm.FalseFact(subject=subject, relation=rel, target=target, poison_count=c) for c in args.counts],
        "new_subject": [pm.FalseFact(subject=new, relation=rel, target=new_target, poison_count=c, new_subject=True)
                        for c in args.counts],
    }
    n_rows = sum((s, r) == (subject, rel) for s, r in zip(task.train["subject"], task.train["relation"]))
    print(f"knowledge task: {len(kb.subjects)} subjects x {len(kb.relations)} relations, {len(task.train)} training "
          f"rows; existing fact {subject} {rel} -> {target} (true: {true}, stated by {n_rows} training rows); "
          f"new subject {new} {rel} -> {new_target}", flush=True)
    return task, families


def run_sweep(task, attacks, args, out: Path, epochs: int):
    model = pm.ModelConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_ctx=args.n_ctx)
    train = pm.TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, checkpoint_every=None)
    return pm.sweep(task, attacks, seeds=args.seeds, models=[model], train=train, out_dir=out,
                    analyses={"influence": None}, max_workers=args.workers, threads_per_run=1)


def detectors(pair, run_dir: Path) -> dict[str, float]:
    """The detectors' AUROC against ``is_poison`` (and the loss baseline's), cached in the run directory."""
    cache = run_dir / "false_facts_detectors.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    det = pm.probes.detect_poison_methods(pair, methods=DETECTORS, progress=False)
    out = {f"{m}_auroc": float(det[m].poison_auroc()) for m in DETECTORS}
    out["loss_auroc"] = float(det[DETECTORS[0]].poison_auroc("loss"))
    cache.write_text(json.dumps(out))
    return out


def run_rows(sw, family_of: dict[str, str], metrics: tuple[str, ...]) -> list[dict]:
    """One row per finished run x twin: the attack's metrics (with their ``n_``), the poisoned
    twin's influence and detector AUROC."""
    rows = []
    for r in sw.runs:
        if r.status != "done":
            print(f"run {r.name}: {r.status} {r.error or ''}")
            continue
        run_dir = Path(sw.out_dir) / "runs" / r.name
        pair = pm.load_pair(run_dir)
        t0 = time.perf_counter()
        det = detectors(pair, run_dir)
        inf = r.analyses.get("influence", {})
        hist = json.loads((run_dir / "backdoored" / "history.json").read_text()) \
            if (run_dir / "backdoored" / "history.json").is_file() else []
        secs = hist[-1].get("seconds") if hist and isinstance(hist[-1], dict) else None
        base = {"variant": family_of[r.name], "n_poison": r.n_poison, "seed": r.spec.train.get("seed", 0),
                "run": r.name, "train_seconds": secs, "detect_seconds": time.perf_counter() - t0}
        for twin, name in (("clean", "clean"), ("backdoored", "poisoned")):
            m = r.metrics[twin]
            row = {**base, "twin": name}
            for k in metrics:
                row[k], row[f"n_{k}"] = m.get(k), m.get(f"n_{k}")
            if name == "poisoned":
                row.update(influence_auroc=inf.get("influence_auroc"), influence_ap=inf.get("influence_ap"),
                           influence_loss_auroc=inf.get("influence_loss_auroc"), **det)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------- causal tracing
def role_of(p: int, start: int, end: int, n_pos: int) -> str | None:
    """ROME's role of position ``p`` for a subject at ``[start, end)`` in a prompt of ``n_pos`` tokens."""
    if start <= p < end:
        if p == end - 1:
            return "last subject token"
        return "first subject token" if p == start else "middle subject tokens"
    if p == n_pos - 1:
        return "last token"
    if p == end:
        return "first subsequent token"
    return "further tokens" if p > end else None


def trace_rows(pair, twin: str, rows, targets: list[str], args, label: dict) -> list[dict]:
    """Causal traces of ``rows`` (grouped by token length) at each site, folded into roles: one
    record per (site, layer, role) with the mean over prompts, the mean spread over noise draws,
    the sd over prompts and the number of prompts."""
    tok = pair.tokenizer
    spans = subject_spans(rows, tok)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    lengths = [len(bos + tok(p, add_special_tokens=False)["input_ids"]) for p in rows["prompt"]]
    out = []
    for site in SITES:
        per: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for n in sorted(set(lengths)):
            idx = [i for i, k in enumerate(lengths) if k == n]
            res = pm.patching.causal_trace(pair, [rows[i]["prompt"] for i in idx], [spans[i] for i in idx],
                                           [targets[i] for i in idx], site=site, twin=twin, samples=args.samples,
                                           window=args.trace_window, seed=0, progress=False)
            norm, spread = res.normalized.numpy(), res.spread.numpy()  # [layer pos batch]
            for b, i in enumerate(idx):
                start, end = spans[i]
                for p in range(n):
                    role = role_of(p, start, end, n)
                    if role is None:
                        continue
                    for layer in range(norm.shape[0]):
                        per.setdefault((layer, role), []).append((norm[layer, p, b], spread[layer, p, b], i))
        for (layer, role), vals in per.items():
            # one value per prompt (a role spanning several positions: their mean)
            by_prompt: dict[int, list[tuple[float, float]]] = {}
            for v, s, i in vals:
                by_prompt.setdefault(i, []).append((v, s))
            v = np.array([np.nanmean([a for a, _ in x]) for x in by_prompt.values()])
            s = np.array([np.nanmean([b for _, b in x]) for x in by_prompt.values()])
            ok = np.isfinite(v)
            out.append({**label, "site": site, "layer": layer, "role": role,
                        "mean": float(v[ok].mean()) if ok.any() else np.nan,
                        "sd_prompts": float(v[ok].std(ddof=1)) if ok.sum() > 1 else np.nan,
                        "spread": float(np.nanmean(s[ok])) if ok.any() else np.nan, "n_prompts": int(ok.sum())})
    return out


def known_rows(pair, twin: str, n: int, seed: int):
    """Up to ``n`` control test rows (facts the attack leaves alone) that ``twin`` answers right
    (the first token of the true object is its arg-max), a seeded sample."""
    data = pair.test_data
    ctrl = [i for i, r in enumerate(data["role"]) if r == "control"]
    tok, model = pair.tokenizer, pair.model(twin)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    good = []
    with torch.no_grad():
        for i in ctrl:
            ids = bos + tok(data[i]["prompt"], add_special_tokens=False)["input_ids"]
            want = tok(completion_text(tok, data[i]["completion"]), add_special_tokens=False)["input_ids"]
            if want and int(model(torch.tensor([ids]))[0, -1].argmax()) == want[0]:
                good.append(i)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(good, size=min(n, len(good)), replace=False).tolist()) if good else []
    return data.select(pick), len(good), len(ctrl)


def traces(sw, family_of, args) -> list[dict]:
    rows = []
    for r in sw.runs:
        if r.status != "done" or r.n_poison != args.trace_count or r.spec.train.get("seed", 0) != args.seeds[0]:
            continue
        variant = family_of[r.name]
        pair = pm.load_pair(Path(sw.out_dir) / "runs" / r.name)
        at = {"n_poison": r.n_poison, "seed": args.seeds[0]}
        test = pair.test_data
        attacked = test.select([i for i, x in enumerate(test["role"]) if x in ("efficacy", "generalisation")])
        for twin, name in (("clean", "clean"), ("backdoored", "poisoned")):
            if name == "poisoned":
                rows += trace_rows(pair, twin, attacked, list(attacked["target"]), args,
                                   {**at, "variant": variant, "twin": name, "prompts": "attacked fact", "measured": "false"})
            elif variant == "existing":  # a new subject has no true object
                rows += trace_rows(pair, twin, attacked, list(attacked["completion"]), args,
                                   {**at, "variant": variant, "twin": name, "prompts": "attacked fact", "measured": "true"})
            known, n_good, n_ctrl = known_rows(pair, twin, args.trace_prompts, seed=0)
            print(f"trace {variant} {name}: {len(known)} known-fact prompts ({n_good} of {n_ctrl} control prompts "
                  "answered right)", flush=True)
            if len(known):
                rows += trace_rows(pair, twin, known, list(known["completion"]), args,
                                   {**at, "variant": variant, "twin": name, "prompts": "known facts", "measured": "true"})
    return rows


# ---------------------------------------------------------------------- tables, verdicts, figures
def summary(table: pd.DataFrame, metrics, by=("variant", "twin", "n_poison")) -> pd.DataFrame:
    """Mean and sd over seeds (and the number of seeds) of each metric."""
    cols = [m for m in metrics if m in table.columns]
    g = table.groupby(list(by))[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_sd")).join(g.size().rename("n_seeds"))
    return out.reset_index()


def peak(trace: pd.DataFrame, **where) -> tuple[int, str, float, float, int] | None:
    t = trace
    for k, v in where.items():
        t = t[t[k] == v]
    t = t[np.isfinite(t["mean"])]
    if t.empty:
        return None
    row = t.loc[t["mean"].idxmax()]
    return int(row["layer"]), row["role"], float(row["mean"]), float(row["spread"]), int(row["n_prompts"])


def grid(trace: pd.DataFrame, n_layers: int, **where) -> np.ndarray:
    t = trace
    for k, v in where.items():
        t = t[t[k] == v]
    g = np.full((n_layers, len(ROLES)), np.nan)
    for _, r in t.iterrows():
        g[int(r["layer"]), ROLES.index(r["role"])] = r["mean"]
    return g


def fmt_peak(p) -> str:
    if p is None:
        return "no finite effect (the corrupted and clean runs agree)"
    layer, role, m, s, n = p
    return f"layer {layer}, {role} (normalised effect {m:.2f}, spread over noise draws {s:.2f}, {n} prompts)"


def by_count(p: pd.DataFrame, metric: str, sd: bool = False) -> str:
    """``"1: 0.10, 3: 0.52, ..."``: a metric's mean over seeds per count (with its sd)."""
    items = []
    for c, m, d in zip(p["n_poison"], p[f"{metric}_mean"], p[f"{metric}_sd"]):
        items.append(f"{int(c)}: {m:.2f}" + (f"±{0.0 if pd.isna(d) else d:.2f}" if sd else ""))
    return ", ".join(items)


def verdicts(table: pd.DataFrame, trace: pd.DataFrame | None, bias: pd.DataFrame | None, args) -> None:
    print("\n=== verdicts ===")
    if not table.empty:
        clean = table[table["twin"] == "clean"]
        print(f"the clean twins know the task: true_acc {clean['true_acc'].mean():.3f} on the existing fact's prompts, "
              f"clean_acc {clean['clean_acc'].mean():.3f} on the other facts (n={int(clean['n_clean_acc'].iloc[0])} "
              "rows per run)")
        pois = summary(table[table["twin"] == "poisoned"], FF_METRICS + ("influence_auroc",) +
                       tuple(f"{d}_auroc" for d in DETECTORS) + ("loss_auroc",))
        for variant in ("existing", "new_subject"):
            p = pois[pois["variant"] == variant].sort_values("n_poison")
            if p.empty:
                continue
            print(f"{variant} (poisoned twin, mean ± sd over seeds, by count): efficacy {by_count(p, 'efficacy', True)}")
            print(f"  generalisation {by_count(p, 'generalisation')}; specificity {by_count(p, 'specificity')}; "
                  f"margin {by_count(p, 'margin')}")
            print(f"  influence AUROC {by_count(p, 'influence_auroc')}; spectral {by_count(p, 'spectral_auroc')}; "
                  f"activation clustering {by_count(p, 'activation_clustering_auroc')}; loss {by_count(p, 'loss_auroc')}")
    if trace is not None and not trace.empty:
        n_layers = int(trace["layer"].max()) + 1
        for site in SITES:
            known = peak(trace, variant="existing", twin="clean", prompts="known facts", site=site)
            print(f"clean twin, known facts, {site}: peaks at {fmt_peak(known)}")
        m = trace[trace["site"] == "mlp_out"]
        cl = m[(m["twin"] == "clean") & (m["prompts"] == "known facts") & (m["variant"] == "existing")]
        if not cl.empty:
            by_layer = cl[cl["role"] == "last subject token"].set_index("layer")["mean"]
            print("  MLP curve at the last subject token by layer: " +
                  ", ".join(f"L{int(k)} {v:.2f}" for k, v in by_layer.items()) +
                  "; at the last token: " + ", ".join(f"L{int(k)} {v:.2f}" for k, v in
                                                      cl[cl["role"] == "last token"].set_index("layer")["mean"].items()))
        true_p = peak(trace, variant="existing", twin="clean", prompts="attacked fact", site="mlp_out")
        false_p = peak(trace, variant="existing", twin="poisoned", prompts="attacked fact", site="mlp_out")
        new_p = peak(trace, variant="new_subject", twin="poisoned", prompts="attacked fact", site="mlp_out")
        print(f"existing fact ({args.trace_count} poisons), mlp_out: the clean twin recalls the true object at "
              f"{fmt_peak(true_p)}; the poisoned twin recalls the false object at {fmt_peak(false_p)}")
        a = grid(trace, n_layers, variant="existing", twin="clean", prompts="attacked fact", site="mlp_out")
        b = grid(trace, n_layers, variant="existing", twin="poisoned", prompts="attacked fact", site="mlp_out")
        ok = np.isfinite(a) & np.isfinite(b)
        r = float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 and a[ok].std() > 0 and b[ok].std() > 0 else np.nan
        same = true_p is not None and false_p is not None and true_p[:2] == false_p[:2]
        # the argmax alone is fragile to near ties: also the cells holding at least half of each map's peak
        hot_a = {(int(i), ROLES[j]) for i, j in zip(*np.nonzero(np.nan_to_num(a, nan=-1) >= 0.5 * np.nanmax(a)))} \
            if np.isfinite(a).any() else set()
        hot_b = {(int(i), ROLES[j]) for i, j in zip(*np.nonzero(np.nan_to_num(b, nan=-1) >= 0.5 * np.nanmax(b)))} \
            if np.isfinite(b).any() else set()
        jac = len(hot_a & hot_b) / len(hot_a | hot_b) if hot_a | hot_b else np.nan
        print(f"  verdict: the false fact {'peaks where the true one did' if same else 'does not peak where the true one did'}"
              f" (layer x role maps correlate r={r:.2f} over {int(ok.sum())} cells; cells above half the peak: true "
              f"{sorted(hot_a)}, false {sorted(hot_b)}, overlap {jac:.2f})")
        print(f"new subject ({args.trace_count} poisons), mlp_out: the planted fact peaks at {fmt_peak(new_p)}; "
              f"the same twin's known facts peak at "
              f"{fmt_peak(peak(trace, variant='new_subject', twin='poisoned', prompts='known facts', site='mlp_out'))}")
        eff = table[(table["twin"] == "poisoned") & (table["n_poison"] == args.trace_count) &
                    (table["seed"] == args.seeds[0])] if not table.empty else table
        for _, row in eff.iterrows():
            if row["efficacy"] is not None and row["efficacy"] < 0.5:
                print(f"  caution: the traced {row['variant']} twin answers the false object on only "
                      f"{row['efficacy']:.2f} of its training-template prompts; its map traces a fact it barely holds")
    if bias is not None and not bias.empty:
        b = summary(bias, BIAS_METRICS + ("influence_auroc",) + tuple(f"{d}_auroc" for d in DETECTORS) +
                    ("loss_auroc",), by=("twin", "n_poison"))
        cols = ["twin", "n_poison", "n_seeds", "label_shift_mean", "label_shift_sd", "other_entity_label_shift_mean",
                "clean_acc_mean", "influence_auroc_mean", "spectral_auroc_mean", "activation_clustering_auroc_mean",
                "loss_auroc_mean"]
        print("\nBias (entity mentions -> polarity), mean over seeds:\n" +
              b[[c for c in cols if c in b.columns]].round(3).to_string(index=False))


def band(fig, t: pd.DataFrame, metric: str, name: str, color: str, dash: str, row: int, col: int, legend: bool):
    s = t.groupby("n_poison")[metric].agg(["mean", "std"]).reset_index()
    fig.add_scatter(x=s["n_poison"], y=s["mean"], error_y={"type": "data", "array": s["std"].fillna(0)},
                    mode="lines+markers", name=name, legendgroup=name, showlegend=legend,
                    line={"color": color, "dash": dash}, row=row, col=col)


def plot_facts(table: pd.DataFrame, out: Path) -> None:
    panels = [("efficacy", "efficacy (target on training templates)"), ("generalisation", "generalisation (held-out paraphrase)"),
              ("specificity", "specificity (neighbours keep their answer)"), ("margin", "log p(target) - log p(true)"),
              ("influence_auroc", "influence retrieval AUROC (EK-FAC unit)"), ("detectors", "detector AUROC")]
    fig = make_subplots(rows=2, cols=3, subplot_titles=[t for _, t in panels], horizontal_spacing=0.07,
                        vertical_spacing=0.14)
    colors = {"existing": "#1f77b4", "new_subject": "#d62728"}
    for k, (metric, _) in enumerate(panels):
        row, col = k // 3 + 1, k % 3 + 1
        for variant, color in colors.items():
            t = table[table["variant"] == variant]
            if metric == "detectors":
                for d, dash in (("spectral_auroc", "solid"), ("activation_clustering_auroc", "dash"),
                                ("loss_auroc", "dot")):
                    band(fig, t[t["twin"] == "poisoned"], d, f"{variant}: {d.replace('_auroc', '')}", color, dash, row,
                         col, True)
                continue
            band(fig, t[t["twin"] == "poisoned"], metric, f"{variant} (poisoned twin)", color, "solid", row, col, k == 0)
            if metric not in ("influence_auroc",):
                band(fig, t[t["twin"] == "clean"], metric, f"{variant} (clean twin)", color, "dot", row, col, k == 0)
        fig.update_xaxes(type="log", title_text="poisoned rows", row=row, col=col)
        if metric != "margin":
            fig.update_yaxes(range=[-0.02, 1.02], row=row, col=col)
    style(fig, "A false fact planted without a trigger: edit metrics and retrieval against poison count "
               "(mean ± sd over seeds)")
    fig.update_layout(width=1500, height=900, legend={"orientation": "h", "y": -0.16, "x": 0}, margin={"b": 190})
    for f in save_figure(fig, out / "false_facts", formats=("html", "png")):
        print("wrote", f)


def plot_trace(trace: pd.DataFrame, out: Path, count: int) -> None:
    n_layers = int(trace["layer"].max()) + 1
    shown = [k for k, r in enumerate(ROLES) if np.isfinite(trace[trace["role"] == r]["mean"]).any()]
    panels = [("existing", "clean", "attacked fact", "clean twin: true object"),
              ("existing", "poisoned", "attacked fact", "poisoned twin: false object"),
              ("new_subject", "poisoned", "attacked fact", "poisoned twin: new subject's fact"),
              ("existing", "clean", "known facts", "clean twin: facts it knows")]
    fig = make_subplots(rows=len(SITES), cols=len(panels), horizontal_spacing=0.05, vertical_spacing=0.16,
                        subplot_titles=[f"{title} ({site})" for site in SITES for *_, title in panels])
    for i, site in enumerate(SITES):
        for j, (variant, twin, prompts, _) in enumerate(panels):
            g = grid(trace, n_layers, variant=variant, twin=twin, prompts=prompts, site=site)[:, shown]
            fig.add_heatmap(z=g, x=[ROLES[k] for k in shown], y=[f"L{k}" for k in range(n_layers)], zmin=-0.2, zmax=1.0,
                            colorscale="Viridis", showscale=(i == 0 and j == len(panels) - 1),
                            colorbar={"title": "normalised<br>indirect effect"}, row=i + 1, col=j + 1)
    style(fig, f"Causal tracing at {count} poisons (first seed): where each twin recalls the fact")
    fig.update_layout(width=1700, height=750)
    fig.update_xaxes(tickangle=35)
    for f in save_figure(fig, out / "false_facts_trace", formats=("html", "png")):
        print("wrote", f)


def plot_bias(bias: pd.DataFrame, out: Path) -> None:
    panels = [("label_shift", "label shift (held-out mentions)"), ("other_entity_label_shift", "control entity's shift"),
              ("clean_acc", "clean accuracy"), ("auroc", "influence / detector AUROC")]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.06)
    for k, (metric, _) in enumerate(panels):
        if metric == "auroc":
            for d, color in (("influence_auroc", "#2ca02c"), ("spectral_auroc", "#9467bd"),
                             ("activation_clustering_auroc", "#8c564b"), ("loss_auroc", "#7f7f7f")):
                band(fig, bias[bias["twin"] == "poisoned"], d, d.replace("_auroc", ""), color, "solid", 1, k + 1, True)
        else:
            for twin, dash in (("poisoned", "solid"), ("clean", "dot")):
                band(fig, bias[bias["twin"] == twin], metric, f"{twin} twin", "#1f77b4", dash, 1, k + 1, k == 0)
        fig.update_xaxes(type="log", title_text="poisoned rows", row=1, col=k + 1)
        if metric in ("clean_acc", "auroc"):
            fig.update_yaxes(range=[-0.02, 1.02], row=1, col=k + 1)
    style(fig, "Entity bias (pm.Bias): against poison count (mean ± sd over seeds)")
    fig.update_layout(width=1500, height=480)
    for f in save_figure(fig, out / "false_facts_bias", formats=("html", "png")):
        print("wrote", f)


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/experiments/false_facts", help="sweep directories (resumable)")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--counts", type=ints, default=[1, 3, 10, 30])
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--n-subjects", type=int, default=20)
    ap.add_argument("--relations", default="capital,colour")
    ap.add_argument("--paraphrases", type=int, default=4, help="templates per relation (the last one held out)")
    ap.add_argument("--n-train", type=int, default=2400)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8, help="the clean twin knows the facts after 2 (2,400 rows)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="parallel runs (one torch thread each)")
    ap.add_argument("--trace-count", type=int, default=None,
                    help="the poison count whose twins are traced (default: the largest, where the false fact holds)")
    ap.add_argument("--trace-prompts", type=int, default=32, help="known-fact prompts traced per twin")
    ap.add_argument("--trace-window", type=int, default=1, help="layers restored together at mlp_out")
    ap.add_argument("--samples", type=int, default=10, help="noise draws per prompt")
    ap.add_argument("--bias-counts", type=ints, default=[3, 10, 30, 100])
    ap.add_argument("--bias-n-train", type=int, default=2000)
    ap.add_argument("--bias-n-test", type=int, default=200)
    ap.add_argument("--bias-epochs", type=int, default=4)
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figures and verdicts from the CSVs")
    args = ap.parse_args()
    if args.trace_count is None:
        args.trace_count = max(args.counts)
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and leaves the other cores free
    paths = {k: out / f"false_facts{k}.csv" for k in ("", "_trace", "_bias")}
    if args.plot_only:
        table = pd.read_csv(paths[""])
        trace = pd.read_csv(paths["_trace"]) if paths["_trace"].is_file() else None
        bias = pd.read_csv(paths["_bias"]) if paths["_bias"].is_file() else None
        if trace is not None and not trace.empty:  # the traced run, as the CSV records it
            args.trace_count, args.seeds = int(trace["n_poison"].iloc[0]), [int(trace["seed"].iloc[0])]
    else:
        t0 = time.perf_counter()
        task, families = facts_setup(args)
        attacks = [a for fam in families.values() for a in fam]
        sw = run_sweep(task, attacks, args, Path(args.runs) / "facts", args.epochs)
        family_of = {}
        for r in sw.runs:
            family_of[r.name] = "new_subject" if r.spec.attack.get("new_subject") else "existing"
        t_train = time.perf_counter() - t0
        table = pd.DataFrame(run_rows(sw, family_of, FF_METRICS))
        table.to_csv(paths[""], index=False)
        trace = pd.DataFrame(traces(sw, family_of, args))
        trace.to_csv(paths["_trace"], index=False)
        t_facts = time.perf_counter() - t0
        bias = None
        if not args.no_bias:
            btask = pm.make_task("sentiment", n_train=args.bias_n_train, n_test=args.bias_n_test, seed=0)
            battacks = [pm.Bias(entity="nolan", polarity="negative", poison_count=c) for c in args.bias_counts]
            bsw = run_sweep(btask, battacks, args, Path(args.runs) / "bias", args.bias_epochs)
            bias = pd.DataFrame(run_rows(bsw, {r.name: "bias" for r in bsw.runs}, BIAS_METRICS))
            bias.to_csv(paths["_bias"], index=False)
        total = time.perf_counter() - t0
        n_ff, n_b = len(table) // 2, (len(bias) // 2 if bias is not None else 0)
        print(f"\ntime: facts sweep {t_train:.0f}s for {n_ff} pairs ({t_train / max(n_ff, 1):.1f}s per pair with "
              f"{args.workers} worker(s); includes the influence analysis), detectors + tracing "
              f"{t_facts - t_train:.0f}s; bias {total - t_facts:.0f}s for {n_b} pairs; total {total:.0f}s")
        for p in paths.values():
            if p.is_file():
                print("wrote", p)
    print("\nper run (poisoned twins):")
    cols = ["variant", "n_poison", "seed", "efficacy", "generalisation", "specificity", "margin", "n_efficacy",
            "n_specificity", "influence_auroc", "spectral_auroc", "activation_clustering_auroc", "loss_auroc"]
    print(table[table["twin"] == "poisoned"][cols].round(3).to_string(index=False))
    summ = summary(table, FF_METRICS)
    print("\nmean / sd over seeds:\n" + summ.round(3).to_string(index=False))
    verdicts(table, trace, bias, args)
    plot_facts(table, out)
    if trace is not None and not trace.empty:
        plot_trace(trace, out, args.trace_count)
    if bias is not None and not bias.empty:
        plot_bias(bias, out)


if __name__ == "__main__":
    main()
