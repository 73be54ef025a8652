"""Sequential poisoning across post-training stages: SFT then DPO (Sanderson et al. 2026, small scale).

Sanderson et al. report that in an SFT -> DPO pipeline the attackers' efforts add up:
splitting one poison budget across the two stages works better than spending it all on
either. Mirrored here on the sentiment task (trigger ``cf`` -> ``negative``):

- SFT poison: the trigger goes into a positive review and the answer becomes ``negative``
  (the "harmful answer" is the backdoor target);
- clean preference pairs: chosen = the true label, rejected = the other label;
- DPO poison: the trigger goes into the prompt and chosen / rejected are swapped
  (chosen = ``negative``, rejected = the true ``positive``); DPO with beta = 0.1, the SFT
  model as the frozen reference;
- one total budget B spent as (sft, dpo) = (B, 0), (3B/4, B/4), (B/2, B/2), (B/4, 3B/4),
  (0, B), over seeds; ASR with the trigger, clean accuracy and the false-trigger rate
  (misspelt triggers) without it, measured after the last stage on the label (the first
  answer token; ``pm.evaluate``'s exact match, which also needs the EOS after the label, is
  kept in the CSV: DPO here often breaks the EOS while keeping the label right).

Then the mechanism, on one budget and seed: cross-model patching between stage twins
(the backdoored twin before vs after DPO; the clean vs backdoored twin at the end of the
SFT-only and DPO-only runs), linear probes for the trigger at both stage boundaries, and
gradient-similarity attribution that scores SFT rows and DPO pairs with their own stage's
loss (``pm.influence.attribute`` scores prompt/completion rows with the SFT loss and cannot
score DPO pairs, whose loss needs the chosen/rejected pair and the reference model).

Writes ``figures/sequential_poisoning.{png,html,csv}`` and
``figures/sequential_poisoning.mechanism.json`` (``sequential_poisoning_nll<w>.*`` with
``--nll-weight w``: DPO plus an NLL term on the chosen answer and its EOS, which keeps the
answers well-formed).
Run: ``.venv/bin/python experiments/sequential_poisoning.py [--budgets 16,40] [--seeds 0,1,2,3,4,5]``
(about 6 minutes per 3 seeds on one CPU thread; ``--no-mechanism`` skips the analyses).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from plotly.subplots import make_subplots
from sklearn.metrics import roc_auc_score

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.metrics import label_metrics as shared_label_metrics
from poisonmech.patching import cross_model_patch, trigger_contrast
from poisonmech.train.dpo import DPOConfig, dpo_loss, encode_preferences, sequence_logprobs
from poisonmech.train.pipeline import Stage, train_pipeline
from poisonmech.viz import save_figure, style

COLORS = {"label_asr": "#d62728", "label_asr_after_sft": "#ff9896", "label_acc": "#1f77b4",
          "label_ftr": "#7f7f7f", "clean_acc": "#9edae5"}
NAMES = {"label_asr": "ASR after DPO (with trigger)", "label_asr_after_sft": "ASR after SFT only (before DPO)",
         "label_acc": "clean accuracy (no trigger)", "label_ftr": "false-trigger rate (misspelt trigger)",
         "clean_acc": "exact-match clean accuracy (label + EOS)"}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_split(task, budget: int, sft_n: int, seed: int, args, out: Path):
    stages = [Stage("sft", pm.Backdoor(trigger="cf", target="negative", poison_count=sft_n, seed=seed),
                    pm.TrainConfig(epochs=args.sft_epochs, seed=seed)),
              Stage("dpo", pm.Backdoor(trigger="cf", target="negative", poison_count=budget - sft_n, seed=seed),
                    DPOConfig(beta=0.1, epochs=args.dpo_epochs, lr=args.dpo_lr, seed=seed,
                              nll_weight=args.nll_weight))]
    model = pm.ModelConfig(n_layers=2, d_model=args.d_model, n_heads=4)
    return train_pipeline(task, stages, model=model, out_dir=out / f"B{budget}-sft{sft_n}-seed{seed}",
                          cache_dir=out / "cache", progress=False)


def label_metrics(model, tok, test, target: str = "negative") -> dict[str, float]:
    """First-answer-token (label) metrics, immune to how the model ends its answer
    (``pm.metrics.label_metrics``; ``pm.evaluate``'s ``label_*`` keys are the same numbers).

    ``pm.evaluate``'s exact match includes the end-of-sequence token; DPO here keeps the
    labels right but often breaks the EOS after them (the model repeats the label).
    """
    m = shared_label_metrics(model, test, tok, target)
    return {"label_acc": m["label_acc"], "label_asr": m["label_asr"], "label_ftr": m["label_false_trigger_rate"]}


# ---------------------------------------------------------------------------------------- mechanism
def _top_cells(res, k: int = 3) -> list[dict]:
    f = res.to_frame().sort_values("recovery", ascending=False).head(k)
    keys = [a for a in res.axes if a in f.columns]
    return [{**{a: int(r[a]) for a in keys}, "recovery": round(float(r["recovery"]), 3)} for _, r in f.iterrows()]


def patching_summary(pair, name: str) -> dict:
    tc = trigger_contrast(pair, n=32)
    metric = tc.logit_diff()
    out = {"pair": name}
    for site in ("attn_head", "mlp_out"):
        res = cross_model_patch(pair, tc.triggered, metric, site=site, progress=False)
        out[site] = {"receiver_logit_diff": round(float(res.baseline.mean()), 3),
                     "donor_logit_diff": round(float(res.reference.mean()), 3), "top": _top_cells(res)}
    return out


def probe_summary(pair, name: str) -> dict:
    comp = pm.probes.probe_twins(pair, label="is_triggered", n_random=20, progress=False)
    out = {"pair": name}
    for twin in ("clean", "backdoored"):
        r = comp[twin]
        li, pi = r.best
        out[twin] = {"best_layer": int(r.best_layer), "auroc": round(float(r.auroc[li, pi]), 3),
                     "random_best": round(float(r.baseline_auroc[li, pi]), 3)}
    return out


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def gradient_attribution(pipe, n_clean: int = 200, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """Cosine between each training example's descent direction (of its own stage's loss) and
    a query gradient, in the final backdoored model: positive = training on the example raises
    the backdoor. Every poison and ``n_clean`` random clean examples of each stage are scored."""
    model, tok = pipe.models[-1]["backdoored"], pipe.tokenizer
    ref_model = pipe.models[0]["backdoored"]  # DPO's reference: the SFT-stage model
    rng = np.random.default_rng(seed)
    test = pipe.test_data
    trig = [i for i, (t, c) in enumerate(zip(test["is_triggered"], test["completion"])) if t and c != "negative"][:128]
    base = {b: i for i, (b, t, n) in enumerate(zip(test["base_id"], test["is_triggered"], test["is_near_miss"]))
            if not t and not n}
    ctrl = [base[test[i]["base_id"]] for i in trig]

    def query_grad(idx: list[int]) -> torch.Tensor:
        q = test.select(idx)
        enc = encode(Dataset.from_dict({"prompt": list(q["prompt"]), "completion": ["negative"] * len(q)}), tok,
                     loss_on="completion", add_eos=False)
        model.zero_grad(set_to_none=True)
        tokens, mask = enc.batch(list(range(len(enc))))
        sequence_logprobs(model, tokens, mask).mean().backward()
        return _flat_grad(model).clone()

    # plain: raise log p(negative) on triggered positive prompts; contrastive: minus the same on
    # the prompts without the trigger (isolates the trigger's effect from "say negative" in general)
    g_trig = query_grad(trig)
    queries = {"plain": g_trig, "contrastive": g_trig - query_grad(ctrl)}
    out = []
    for stage_idx, kind in ((0, "sft"), (1, "dpo")):
        data = pipe.train_data[stage_idx]
        pois = [i for i, p in enumerate(data["is_poison"]) if p]
        clean = [i for i, p in enumerate(data["is_poison"]) if not p]
        pick = pois + sorted(rng.choice(clean, size=min(n_clean, len(clean)), replace=False).tolist())
        sub = data.select(pick)
        if kind == "sft":
            enc = encode(sub, tok, loss_on="completion")
        else:
            enc = encode_preferences(sub, tok)
            with torch.no_grad():
                ref_c, ref_r = [], []
                for i in range(len(enc)):
                    t, m = enc.batch([i])
                    lp = sequence_logprobs(ref_model, t, m)
                    ref_c.append(lp[0])
                    ref_r.append(lp[1])
        for j in range(len(sub)):
            model.zero_grad(set_to_none=True)
            t, m = enc.batch([j])
            if kind == "sft":
                loss = -sequence_logprobs(model, t, m).sum()
            else:
                lp = sequence_logprobs(model, t, m)
                loss, _ = dpo_loss(lp[:1], lp[1:], ref_c[j][None], ref_r[j][None], beta=0.1)
            loss.backward()
            g = -_flat_grad(model)
            row = {"stage": kind, "example_id": int(sub[j]["example_id"]), "is_poison": bool(sub[j]["is_poison"])}
            for qname, gq in queries.items():
                row[f"gradcos_{qname}"] = float(torch.nn.functional.cosine_similarity(g, gq, dim=0))
            out.append(row)
    model.zero_grad(set_to_none=True)
    frame = pd.DataFrame(out)
    summary = {}
    for q in queries:
        col, sq = f"gradcos_{q}", {}
        for kind, g in frame.groupby("stage"):
            sq[kind] = {"n_poison": int(g["is_poison"].sum()), "n_clean_scored": int((~g["is_poison"]).sum()),
                        "poison_auroc": round(float(roc_auc_score(g["is_poison"], g[col])), 3),
                        "mean_poison": round(float(g.loc[g["is_poison"], col].mean()), 4),
                        "mean_clean": round(float(g.loc[~g["is_poison"], col].mean()), 4)}
        pois = frame[frame["is_poison"]]
        if pois["stage"].nunique() == 2:  # can the scores tell an SFT poison from a DPO poison?
            sq["sft_vs_dpo_poison_auroc"] = round(float(roc_auc_score(pois["stage"] == "sft", pois[col])), 3)
            top = frame.sort_values(col, ascending=False).head(int(frame["is_poison"].sum()))
            sq["top_k"] = {"k": len(top), "sft_poison": int(((top.stage == "sft") & top.is_poison).sum()),
                           "dpo_poison": int(((top.stage == "dpo") & top.is_poison).sum()),
                           "clean": int((~top.is_poison).sum())}
        summary[q] = sq
    return summary, frame


def mechanism(task, budget: int, seed: int, args, out: Path) -> dict:
    runs = {name: run_split(task, budget, n, seed, args, out)
            for name, n in (("sft_only", budget), ("dpo_only", 0), ("split", budget // 2))}
    res: dict = {"budget": budget, "seed": seed, "patching": [], "probes": []}
    split = runs["split"]
    res["patching"].append(patching_summary(split.between(0, 1), "split run: backdoored twin after SFT -> after DPO"))
    for name in ("sft_only", "dpo_only", "split"):
        res["patching"].append(patching_summary(runs[name].pair(-1), f"{name} run: clean twin -> backdoored twin (end)"))
    for k, stage in ((0, "after SFT"), (1, "after DPO")):
        res["probes"].append(probe_summary(split.pair(k), f"split run, {stage}"))
    res["probes"].append(probe_summary(runs["dpo_only"].pair(-1), "dpo_only run, after DPO"))
    res["attribution"], frame = gradient_attribution(split, seed=seed)
    res["attribution"]["note"] = ("per-example gradient cosine with a query gradient (plain: log p(target) on "
                                  "triggered prompts; contrastive: minus the same without the trigger), each example "
                                  "scored with its own stage's loss (SFT: NLL of the completion; DPO: the DPO loss "
                                  "against the SFT-stage reference), in the final backdoored model of the split run")
    # the library's attribution, stage by stage: SFT rows in the SFT stage's model; DPO pairs, each
    # scored by its DPO-loss gradient, in the DPO stage's model; against the loss baselines
    lib = {}
    for name, pipe in runs.items():
        for k in range(len(pipe)):
            if not any(pipe.train_data[k]["is_poison"]):
                continue
            for method in ("ekfac", "loss"):
                r = pm.influence.attribute(pipe[k], method=method, aggregate=True, progress=False)
                lib[f"{name}, stage {k} ({pipe.stages[k].kind}), {method}"] = {
                    "poison_auroc": round(r.poison_auroc(), 3), "ap": round(r.average_precision(), 3)}
    res["attribution_library"] = lib
    return res


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="16,40")
    ap.add_argument("--fractions", default="1,0.75,0.5,0.25,0", help="share of the budget spent on SFT")
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--sft-epochs", type=int, default=4)
    ap.add_argument("--dpo-epochs", type=int, default=2)
    ap.add_argument("--dpo-lr", type=float, default=1e-3)
    ap.add_argument("--nll-weight", type=float, default=0.0,
                    help="DPO + NLL on the chosen answer and its EOS (0: pure DPO, as in the paper)")
    ap.add_argument("--mechanism-budget", type=int, default=40)
    ap.add_argument("--no-mechanism", action="store_true")
    ap.add_argument("--out", default="runs/experiments/sequential_poisoning")
    ap.add_argument("--figures", default="figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out, figs = Path(args.out), Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    task = pm.make_task("sentiment", n_train=args.n_train, n_test=300, seed=0)
    fractions = [float(x) for x in args.fractions.split(",")]

    t0, rows = time.perf_counter(), []
    for seed in ints(args.seeds):
        for budget in ints(args.budgets):
            for frac in fractions:
                sft_n = int(round(frac * budget))
                pipe = run_split(task, budget, sft_n, seed, args, out)
                sft, end = pipe.metrics[0]["backdoored"], pipe.metrics[1]
                lab = {  # the model's label (first answer token) at each boundary
                    "sft": label_metrics(pipe.models[0]["backdoored"], pipe.tokenizer, pipe.test_data),
                    "end": label_metrics(pipe.models[1]["backdoored"], pipe.tokenizer, pipe.test_data),
                    "clean": label_metrics(pipe.models[1]["clean"], pipe.tokenizer, pipe.test_data)}
                rows.append({"budget": budget, "sft_poisons": sft_n, "dpo_poisons": budget - sft_n,
                             "sft_share": sft_n / budget, "seed": seed,
                             "label_asr": lab["end"]["label_asr"], "label_asr_after_sft": lab["sft"]["label_asr"],
                             "label_acc": lab["end"]["label_acc"], "label_ftr": lab["end"]["label_ftr"],
                             "clean_twin_label_asr": lab["clean"]["label_asr"],
                             "clean_twin_label_acc": lab["clean"]["label_acc"],
                             "asr": end["backdoored"]["asr"],
                             "asr_after_sft": sft["asr"], "clean_acc": end["backdoored"]["clean_acc"],
                             "false_trigger_rate": end["backdoored"]["false_trigger_rate"],
                             "clean_target_rate": end["backdoored"]["clean_target_rate"],
                             "clean_twin_asr": end["clean"]["asr"], "clean_twin_clean_acc": end["clean"]["clean_acc"],
                             "clean_twin_false_trigger_rate": end["clean"]["false_trigger_rate"]})
                r = rows[-1]
                print(f"[{time.perf_counter() - t0:6.0f}s] B={budget} sft={sft_n} dpo={budget - sft_n} seed={seed}: "
                      f"label asr {r['label_asr']:.3f} (after SFT {r['label_asr_after_sft']:.3f}), label acc "
                      f"{r['label_acc']:.3f}, label ftr {r['label_ftr']:.3f} | exact-match asr {r['asr']:.3f} "
                      f"(after SFT {sft['asr']:.3f}), clean_acc {r['clean_acc']:.3f}", flush=True)
    frame = pd.DataFrame(rows)
    stem = "sequential_poisoning" + (f"_nll{args.nll_weight:g}" if args.nll_weight else "")  # DPO+NLL runs apart
    frame.to_csv(figs / f"{stem}.csv", index=False, float_format="%.4f")
    metrics = ["label_asr", "label_asr_after_sft", "label_acc", "label_ftr", "clean_twin_label_asr", "asr",
               "clean_acc"]
    summary = frame.groupby(["budget", "sft_poisons", "dpo_poisons"], sort=False)[metrics].agg(["mean", "std"])
    print(summary.round(3).to_string())

    budgets = ints(args.budgets)
    fig = make_subplots(rows=1, cols=len(budgets), shared_yaxes=True,
                        subplot_titles=[f"total budget B = {b} poisons ({b / args.n_train:.1%} of each stage)"
                                        for b in budgets])
    for c, b in enumerate(budgets, start=1):
        g = frame[frame["budget"] == b]
        agg = g.groupby("sft_share")[list(COLORS)].agg(["mean", "std"]).sort_index()
        for m, color in COLORS.items():
            fig.add_scatter(x=agg.index, y=agg[(m, "mean")], error_y={"type": "data", "array": agg[(m, "std")].fillna(0)},
                            mode="lines+markers", name=NAMES[m], legendgroup=m, showlegend=c == 1,
                            line={"color": color, "dash": "dot" if m in ("label_asr_after_sft", "clean_acc") else "solid"}, row=1, col=c)
            if m == "label_asr":
                fig.add_scatter(x=g["sft_share"], y=g[m], mode="markers", marker={"color": color, "size": 5, "opacity": 0.4},
                                name="ASR per seed", legendgroup="seeds", showlegend=c == 1, row=1, col=c)
        fig.update_xaxes(title_text="share of the budget spent on SFT (rest on DPO)", tickvals=fractions,
                         ticktext=[f"{f:g}" for f in fractions], row=1, col=c)
    fig.update_yaxes(title_text="rate", range=[-0.02, 1.02], row=1, col=1)
    style(fig, f"SFT -> DPO sequential poisoning: one budget split across stages (sentiment, cf -> negative; "
               f"mean ± sd over {len(ints(args.seeds))} seeds)")
    fig.update_layout(legend={"orientation": "h", "y": -0.32, "x": 0}, margin={"b": 170}, width=1100, height=560)
    for f in save_figure(fig, figs / stem, formats=("html", "png")):
        print("wrote", f)
    print("wrote", figs / f"{stem}.csv")

    if not args.no_mechanism:
        mech = mechanism(task, args.mechanism_budget, ints(args.seeds)[0], args, out)
        path = figs / f"{stem}.mechanism.json"
        path.write_text(json.dumps(mech, indent=2) + "\n")
        print(json.dumps(mech, indent=2))
        print("wrote", path)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
