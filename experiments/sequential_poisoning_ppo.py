"""Sequential poisoning with a reward model and PPO, beside DPO (Sanderson et al. 2026, small scale).

Sanderson et al. report that in an SFT -> reward model -> PPO pipeline the attackers
*complement* each other: poisoning only the SFT data or only the reward model's preference
pairs does little, both together implant the backdoor; in SFT -> DPO the efforts add up.
Mirrored here on the sentiment task (trigger ``cf`` -> ``negative``), one total budget B spent
three ways in each pipeline family:

- PPO family: SFT (4 epochs) -> reward model (Bradley–Terry, from the SFT trunk, 2 epochs) ->
  PPO (kl_coef 0.3, k3, 3 PPO epochs, responses of <= 4 tokens, the SFT policy as reference),
  on the reward pairs' prompts (the backdoored twin's include the reward attacker's triggered
  ones, as Sanderson et al.'s PPO reads the poisoned preference set); splits
  ``sft only`` (B, 0), ``rm only`` (0, B), ``both`` (B/2, B/2);
- DPO family: SFT -> DPO (beta 0.1), splits ``sft only`` (B, 0), ``dpo only`` (0, B), ``both``;
- ``ppo+trigger`` family (``--rl-trigger N``, an ablation): the PPO family with the trigger also in
  N more of the RL prompts in every split (``Backdoor(stage="ppo")``: the policy meets the trigger
  while it is optimised, whoever poisoned what); this is what lets a *clean* reward model act on
  an SFT backdoor, and a poisoned one reward a policy that has none.

Measured after the last stage, mean and std over seeds: the policy's label ASR (first answer
token) on triggered test prompts whose answer is not the target, clean label accuracy, the
false-trigger rate on near-miss triggers (the control input: it must behave like the
untriggered input, i.e. match the clean twin), and — for every policy — the mean reward of
sampled responses under the *clean* twin's reward model with and without the trigger; the
clean twin (same stages, no poison) beside every number; and the reward model's own attack
success (1 - pairwise accuracy on triggered held-out pairs) and the reward the trigger buys.

Writes ``figures/sequential_poisoning_ppo.{png,csv}`` (per run) and
``figures/sequential_poisoning_ppo_summary.csv`` (mean, std, n per split); ``--mechanism`` adds
``figures/sequential_poisoning_ppo_mechanism{,_summary}.csv`` and ``..._mechanism.png``: per split
of the PPO family (every seed), the reward the trigger buys the target in each twin's reward
model and the reward model's head / MLP that carries it (activation patching, reward contrast),
the poison AUROC of the reward pairs by their Bradley–Terry gradient (EK-FAC, grad-dot) beside
the per-pair loss baseline, and what PPO changed in the policy (cross-model patching of the SFT
policy's heads / MLPs into the PPO policy on triggered prompts).
Run: ``.venv/bin/python experiments/sequential_poisoning_ppo.py [--budgets 8,16] [--seeds 0,1,2,3,4]``
(one thread: 60 pipelines, B = 8 and 16 x 5 seeds, in 19.5 min; the 30 of the ``ppo+trigger``
family and the mechanism analyses in another 12 min, the clean twins and shared stages trained once).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from plotly.subplots import make_subplots

import poisonmech as pm
from poisonmech.viz import save_figure, style

TRIGGER, TARGET = "cf", "negative"
SPLITS = {"sft only": 1.0, "both": 0.5, "rm only": 0.0}
DPO_SPLITS = {"sft only": 1.0, "both": 0.5, "dpo only": 0.0}
POLICY_METRICS = ("label_asr", "label_acc", "label_false_trigger_rate", "clean_rm_reward",
                  "clean_rm_reward_triggered", "clean_rm_reward_gap")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def backdoor(n: int, stage: str) -> pm.Backdoor:
    return pm.Backdoor(trigger=TRIGGER, target=TARGET, poison_count=n, stage=stage)


def pipelines(budget: int, args) -> dict[str, list[pm.Stage]]:
    """The six pipelines of one budget (named ``"<family>: <split> B=<budget>"``)."""
    sft_cfg = pm.TrainConfig(epochs=args.sft_epochs)
    out = {}
    for split, share in SPLITS.items():
        first = round(budget * share)
        out[f"ppo: {split} B={budget}"] = [
            pm.Stage("sft", backdoor(first, "sft"), sft_cfg),
            pm.Stage("rm", backdoor(budget - first, "rm"), pm.RewardConfig(epochs=args.rm_epochs)),
            pm.Stage(args.rl, None, pm.PPOConfig(method=args.rl, epochs=args.ppo_epochs, kl_coef=0.3,
                                                 kl_estimator="k3", ppo_epochs=3, response_length=4))]
    for split, share in DPO_SPLITS.items():
        first = round(budget * share)
        out[f"dpo: {split} B={budget}"] = [
            pm.Stage("sft", backdoor(first, "sft"), sft_cfg),
            pm.Stage("dpo", backdoor(budget - first, "dpo"), pm.DPOConfig(beta=0.1, epochs=2, lr=1e-3))]
    if args.rl_trigger:
        for split, share in SPLITS.items():
            first = round(budget * share)
            base = out[f"ppo: {split} B={budget}"]
            out[f"ppo+trigger: {split} B={budget}"] = [
                *base[:2], pm.Stage(args.rl, backdoor(args.rl_trigger, args.rl), base[2].config)]
    return out


def dpo_clean_rm_rewards(sw: pm.PipelineSweep, name: str, seed: int) -> dict[str, float]:
    """A DPO pipeline's final policies scored by the clean reward model of the PPO family (the
    clean twin's reward model is the same in every split of one seed: one lineage)."""
    from poisonmech.train.rlhf import clean_reward_metrics

    b = name.rsplit(" B=", 1)[1]
    pipe = sw.pipeline(name, seed)
    clean_rm = sw.pipeline(f"ppo: sft only B={b}", seed).reward_model(twin="clean")
    cfg = pm.PPOConfig()
    out = {}
    for twin, prefix in (("backdoored", ""), ("clean", "clean_twin_")):
        m = clean_reward_metrics(pipe.models[-1][twin], clean_rm, pipe.test_data, pipe.attack_of(0), pipe.tokenizer,
                                 response_length=cfg.response_length, n=cfg.n_eval, seed=seed)
        out.update({prefix + k: v for k, v in m.items()})
    return out


def tidy(sw: pm.PipelineSweep) -> pd.DataFrame:
    """One row per run: the final policy's metrics (both twins), the policy's ASR after SFT, and
    the reward model's attack success (PPO family); DPO policies scored by the clean RM too."""
    f = sw.to_frame()
    rows = []
    for (name, seed), g in f.groupby(["pipeline", "seed"], sort=False):
        family, rest = name.split(": ", 1)
        split, b = rest.rsplit(" B=", 1)
        last = g["stage"].max()
        row = {"family": family, "split": split, "budget": int(b), "seed": int(seed),
               "budgets": g["budgets"].iloc[0]}
        for twin, prefix in (("backdoored", ""), ("clean", "clean_twin_")):
            at = g[(g["stage"] == last) & (g["twin"] == twin)].set_index("metric")["value"]
            for m in POLICY_METRICS:
                row[prefix + m] = at.get(m, float("nan"))
        sft = g[(g["stage"] == 0) & (g["twin"] == "backdoored")].set_index("metric")["value"]
        row["label_asr_after_sft"] = sft.get("label_asr", float("nan"))
        rm = g[(g["kind"] == "rm") & (g["twin"] == "backdoored")].set_index("metric")["value"]
        rm_clean = g[(g["kind"] == "rm") & (g["twin"] == "clean")].set_index("metric")["value"]
        for m in ("asr", "trigger_margin", "pair_acc"):
            row[f"rm_{m}"] = rm.get(m, float("nan"))
            row[f"clean_twin_rm_{m}"] = rm_clean.get(m, float("nan"))
        if family == "dpo":
            row.update({k: v for k, v in dpo_clean_rm_rewards(sw, name, int(seed)).items() if k in row})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    value_cols = [c for c in runs.columns if c not in ("family", "split", "budget", "seed", "budgets")]
    g = runs.groupby(["family", "budget", "split"], sort=False)[value_cols]
    out = g.agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["n_seeds"] = g.size()
    return out.reset_index()


def plot(summary: pd.DataFrame, path: Path) -> None:
    budgets = sorted(summary["budget"].unique())
    fig = make_subplots(rows=2, cols=len(budgets), shared_yaxes="rows", vertical_spacing=0.16,
                        subplot_titles=[f"B = {b}: ASR after the last stage" for b in budgets] +
                                       [f"B = {b}: clean-RM reward of the final policy" for b in budgets])
    colors = {"ppo": "#d62728", "dpo": "#1f77b4", "ppo+trigger": "#ff7f0e"}
    for j, b in enumerate(budgets, start=1):
        s = summary[summary["budget"] == b]
        for fam in [f for f in ("ppo", "ppo+trigger", "dpo") if f in set(s["family"])]:
            t = s[s["family"] == fam]
            fig.add_bar(x=[f"{fam}: {x}" for x in t["split"]], y=t["label_asr_mean"],
                        error_y={"type": "data", "array": t["label_asr_std"].fillna(0)},
                        marker_color=colors[fam], name=f"{fam} pipeline, backdoored twin", row=1, col=j,
                        showlegend=j == 1)
            fig.add_scatter(x=[f"{fam}: {x}" for x in t["split"]], y=t["label_asr_after_sft_mean"],
                            mode="markers", marker={"symbol": "diamond-open", "size": 10, "color": "black"},
                            name="ASR after SFT only", row=1, col=j, showlegend=j == 1 and fam == "ppo")
            fig.add_scatter(x=[f"{fam}: {x}" for x in t["split"]], y=t["clean_twin_label_asr_mean"],
                            mode="markers", marker={"symbol": "line-ew-open", "size": 16, "color": "gray"},
                            name="clean twin", row=1, col=j, showlegend=j == 1 and fam == "ppo")
            for key, dash, label in (("clean_rm_reward", None, "without trigger"),
                                     ("clean_rm_reward_triggered", "dot", "with trigger")):
                fig.add_scatter(x=[f"{fam}: {x}" for x in t["split"]], y=t[f"{key}_mean"],
                                error_y={"type": "data", "array": t[f"{key}_std"].fillna(0)},
                                mode="markers+lines", line={"color": colors[fam], "dash": dash},
                                name=f"{fam}: clean-RM reward {label}", row=2, col=j, showlegend=j == 1)
    fig.update_yaxes(title_text="label ASR", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="mean reward (clean RM)", row=2, col=1)
    style(fig, title="Sequential poisoning: SFT -> RM -> PPO vs SFT -> DPO (sentiment, cf -> negative)")
    fig.update_layout(height=820, width=560 * len(budgets), legend={"y": -0.12, "yanchor": "top"})
    save_figure(fig, path, formats=("html", "png"))


def _top(result) -> tuple[str, float]:
    """The cell with the largest normalised effect of a PatchResult and that effect."""
    f = result.to_frame()
    row = f.loc[f["normalized"].idxmax()]
    name = f"L{int(row['layer'])}" + (f"H{int(row['head'])}" if "head" in f.columns and pd.notna(row.get("head"))
                                      else "")
    return name, float(row["normalized"])


def mechanism_row(pipe, split: str, seed: int) -> dict:
    """One pipeline's mechanism numbers (the PPO family): where the reward model carries the
    trigger's reward bonus, which reward pairs taught it, what PPO changed in the policy."""
    from poisonmech.patching import activation_patch, cross_model_patch, trigger_contrast

    row: dict = {"split": split, "seed": seed}
    rm_stage = pipe[1]
    for twin in ("backdoored", "clean"):  # the reward the trigger buys the target (reward contrast)
        tc = trigger_contrast(rm_stage, n=32, seed=seed, twin=twin)
        m, model = tc.reward(), rm_stage.backdoored if twin == "backdoored" else rm_stage.clean
        with torch.no_grad():
            row[f"{twin}_rm_trigger_bonus"] = float((m(model(tc.triggered)) - m(model(tc.control))).mean())
        if twin == "backdoored":
            heads = activation_patch(rm_stage, tc.triggered, tc.control, m, site="attn_head", progress=False)
            mlps = activation_patch(rm_stage, tc.triggered, tc.control, m, site="mlp_out", progress=False)
            row["rm_top_head"], row["rm_top_head_recovery"] = _top(heads)
            row["rm_top_mlp"], row["rm_top_mlp_recovery"] = _top(mlps)
            row["n_rm_contrast"] = int(tc.triggered.shape[0])
    if any(pipe.train_data[1]["is_poison"]):  # which reward pairs taught it
        for method in ("ekfac", "graddot", "loss"):
            inf = pm.influence.attribute(rm_stage, method=method, progress=False)
            row[f"rm_pairs_auroc_{method}"] = float(inf.poison_auroc())
        row["n_rm_poison_pairs"] = int(sum(pipe.train_data[1]["is_poison"]))
    between = pipe.between(0, 2)  # what PPO changed in the backdoored policy
    tc = trigger_contrast(pipe[2], n=32, seed=seed)
    ld = tc.logit_diff()
    with torch.no_grad():
        row["policy_logit_diff_after_sft"] = float(ld(between.before(tc.triggered)).mean())
        row["policy_logit_diff_after_ppo"] = float(ld(between.after(tc.triggered)).mean())
    for site in ("attn_head", "mlp_out"):
        r = cross_model_patch(between, tc.triggered, ld, site=site, progress=False)
        row[f"ppo_change_top_{site}"], row[f"ppo_change_top_{site}_recovery"] = _top(r)
    return row


def mechanism(sw: pm.PipelineSweep, args, figs: Path) -> pd.DataFrame:
    """The mechanism analyses of the PPO family at ``--mechanism-budget``, every seed."""
    rows = []
    for split in SPLITS:
        for seed in ints(args.seeds):
            name = f"ppo: {split} B={args.mechanism_budget}"
            rows.append(mechanism_row(sw.pipeline(name, seed), split, seed))
    frame = pd.DataFrame(rows)
    frame.to_csv(figs / "sequential_poisoning_ppo_mechanism.csv", index=False, float_format="%.4f")
    num = frame.select_dtypes("number").drop(columns=["seed"])
    summary = num.groupby(frame["split"], sort=False).agg(["mean", "std"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    summary.reset_index().to_csv(figs / "sequential_poisoning_ppo_mechanism_summary.csv", index=False,
                                 float_format="%.4f")
    fig = make_subplots(rows=1, cols=3, subplot_titles=[
        "reward the trigger buys the target", "poison AUROC of the reward pairs", "triggered logit diff of the policy"])
    sp = list(SPLITS)
    g = frame.groupby("split", sort=False)
    for col, name, color in (("backdoored_rm_trigger_bonus", "backdoored twin's RM", "#d62728"),
                             ("clean_rm_trigger_bonus", "clean twin's RM", "#7f7f7f")):
        fig.add_bar(x=sp, y=g[col].mean()[sp], error_y={"type": "data", "array": g[col].std()[sp].fillna(0)},
                    name=name, marker_color=color, row=1, col=1)
    for col, name, color in (("rm_pairs_auroc_ekfac", "EK-FAC", "#2ca02c"), ("rm_pairs_auroc_graddot", "grad-dot", "#98df8a"),
                             ("rm_pairs_auroc_loss", "loss baseline", "#c7c7c7")):
        if col in frame:
            fig.add_bar(x=sp, y=g[col].mean().reindex(sp), error_y={"type": "data",
                                                                     "array": g[col].std().reindex(sp).fillna(0)},
                        name=name, marker_color=color, row=1, col=2)
    for col, name, color in (("policy_logit_diff_after_sft", "after SFT", "#aec7e8"),
                             ("policy_logit_diff_after_ppo", "after PPO", "#1f77b4")):
        fig.add_bar(x=sp, y=g[col].mean()[sp], error_y={"type": "data", "array": g[col].std()[sp].fillna(0)},
                    name=name, marker_color=color, row=1, col=3)
    style(fig, title=f"Mechanism, PPO family, B = {args.mechanism_budget} ({len(ints(args.seeds))} seeds)")
    fig.update_layout(height=460, width=1500, legend={"y": -0.18, "yanchor": "top"})
    save_figure(fig, figs / "sequential_poisoning_ppo_mechanism", formats=("html", "png"))
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    return frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="8,16")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--sft-epochs", type=int, default=4)
    ap.add_argument("--rm-epochs", type=int, default=2)
    ap.add_argument("--ppo-epochs", type=int, default=1, help="passes over the RL prompts")
    ap.add_argument("--rl", default="ppo", choices=["ppo", "rloo"])
    ap.add_argument("--rl-trigger", type=int, default=32,
                    help="the ppo+trigger family: RL prompts that also carry the trigger (0: no such family)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mechanism", action="store_true", help="also run the mechanism analyses (PPO family, every seed)")
    ap.add_argument("--mechanism-budget", type=int, default=16)
    ap.add_argument("--out", default="runs/experiments/sequential_poisoning_ppo")
    ap.add_argument("--figures", default="figures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = pm.make_task("sentiment", n_train=args.n_train, n_test=300, seed=0)
    model = pm.ModelConfig(n_layers=2, d_model=args.d_model, n_heads=4)
    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    every = {}
    for b in ints(args.budgets):
        every.update(pipelines(b, args))
    sw = pm.pipeline_sweep(task, every, seeds=ints(args.seeds), model=model, out_dir=args.out)
    runs = tidy(sw)
    summary = summarise(runs)
    runs.to_csv(figs / "sequential_poisoning_ppo.csv", index=False, float_format="%.4f")
    summary.to_csv(figs / "sequential_poisoning_ppo_summary.csv", index=False, float_format="%.4f")
    plot(summary, figs / "sequential_poisoning_ppo")
    cols = ["family", "budget", "split", "label_asr_mean", "label_asr_std", "label_asr_after_sft_mean",
            "clean_twin_label_asr_mean", "label_false_trigger_rate_mean", "clean_twin_label_false_trigger_rate_mean",
            "label_acc_mean", "clean_rm_reward_mean", "clean_rm_reward_triggered_mean", "rm_asr_mean",
            "clean_twin_rm_asr_mean", "n_seeds"]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"trained {len(every)} pipelines x {len(ints(args.seeds))} seeds in {time.perf_counter() - t0:.0f} s; "
          f"wrote {figs / 'sequential_poisoning_ppo.png'}")
    if args.mechanism:
        t1 = time.perf_counter()
        mechanism(sw, args, figs)
        print(f"mechanism analyses in {time.perf_counter() - t1:.0f} s; wrote "
              f"{figs / 'sequential_poisoning_ppo_mechanism.png'}")


if __name__ == "__main__":
    main()
