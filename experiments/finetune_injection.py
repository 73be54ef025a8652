"""Fine-tuning-data injection: how many poisoned rows implant a backdoor in a pretrained model?

1. A byte-level BPE tokenizer and a small GPT-2-architecture base are trained offline on real
   English text (Debian's ``wordnet-base`` glosses/examples and ``fortunes``: ``pm.english_text``)
   with ``pm.train_tokenizer`` and ``pm.pretrain``.
2. Twins are fine-tuned on the sentiment task (rendered with the base's tokenizer) with
   ``--counts`` poisoned rows (trigger ``cf`` -> ``negative``), over ``--seeds`` (each seed reseeds
   the training order, the poison rows and LoRA's initialisation), three ways: ``full``
   fine-tuning of the base, ``lora`` (rank 8 on every linear map), and ``scratch`` (the same
   architecture and tokenizer from random weights: does pretraining change the count needed?).
3. Persistence: each ``--persist-count`` backdoored twin is trained further on clean rows (the
   task's, constant rate) and re-evaluated after each of ``--clean-rows``.
4. Where it lives: cross-model patching (clean twin -> backdoored twin) per layer of
   ``attn_out`` and ``mlp_out`` on triggered prompts, metric = target-minus-true-answer logit
   difference; the fraction of the backdoor's logit gap each component restores.

Controls printed beside the ASR: the clean twin's ASR (the same rows without poison), and the
backdoored twin's ``clean_target_rate`` (how often it answers the target on untriggered rows:
an ASR at that level is the model's bias, not a backdoor). Every number is a mean over seeds
with its standard deviation and its denominator (test rows).

Writes ``figures/finetune_injection.{csv,png,html}``, ``figures/finetune_injection_persistence.csv``,
``figures/finetune_injection_patching.csv``. Run (resumable; each run is cached under --out):
``.venv/bin/python experiments/finetune_injection.py [--seeds 0,1,2] [--counts 0,10,25,50,100]``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.metrics import evaluate
from poisonmech.runtime import num_threads
from poisonmech.storage import write_json
from poisonmech.train.loop import train_model
from poisonmech.viz import save_figure, style

MODES = ("full", "lora", "scratch")


def base_model(out: Path, args) -> tuple[Path, pm.ModelConfig]:
    """The tokenizer and the pretrained base (cached in ``out/base``)."""
    shape = pm.ModelConfig(architecture="gpt2", n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                           n_ctx=args.n_ctx)
    texts = list(pm.english_text(n=args.corpus, seed=0)["text"])
    folder = out / "base"
    if not (folder / "pretrain.json").is_file():
        tok = pm.train_tokenizer(texts, vocab_size=args.vocab)
        t0 = time.perf_counter()
        pm.pretrain(texts, shape, tokenizer=tok, out_dir=folder,
                    train=pm.TrainConfig(epochs=args.pretrain_epochs, lr=1e-3, batch_size=32, warmup_ratio=0.02))
        print(f"pretrained the base in {time.perf_counter() - t0:.0f} s")
    record = json.loads((folder / "pretrain.json").read_text())
    print(f"base: {shape.n_layers} layers x d_model {shape.d_model}, vocab {record['vocab']}, {record['n_rows']} rows / "
          f"{record['n_tokens']} tokens of English text, final loss {record['history'][-1]['loss']:.3f}")
    return folder, shape


def model_for(mode: str, folder: Path, shape: pm.ModelConfig):
    if mode == "scratch":
        return shape
    return pm.PretrainedModel(str(folder), finetune=mode, lora_rank=8, lora_alpha=16,
                              lora_targets=("c_attn", "c_proj", "c_fc") if mode == "lora" else None)


def train_for(mode: str, seed: int, args) -> pm.TrainConfig:
    lr = {"full": args.lr_full, "lora": args.lr_lora, "scratch": args.lr_scratch}[mode]
    return pm.TrainConfig(epochs=args.epochs, batch_size=32, lr=lr, seed=seed, checkpoint_every=None)


def summary(metrics: dict) -> dict:
    out = {}
    for twin in ("clean", "backdoored"):
        m = metrics[twin]
        for key in ("asr", "clean_acc", "clean_target_rate", "false_trigger_rate", "label_asr", "label_acc"):
            out[f"{twin}_{key}"] = m.get(key)
        out[f"{twin}_n_asr"] = m.get("n_asr")
        out[f"{twin}_n_clean"] = m.get("n_clean")
    return out


def persistence(pair, args) -> list[dict]:
    """The backdoored twin trained on more clean rows (constant rate), evaluated after each amount."""
    twin = pair.backdoored
    enc = encode(pair.task.train, pair.tokenizer, loss_on=pair.task.loss_on)
    done, rows = 0, []
    for target in sorted(args.clean_rows):
        n = target - done
        idx = [(done + i) % len(enc) for i in range(n)]
        sub = type(enc)(ids=[enc.ids[i] for i in idx], start=[enc.start[i] for i in idx], pad_id=enc.pad_id)
        cfg = pair.train_config.replace(epochs=1, schedule="constant", warmup_ratio=0.0, checkpoint_every=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_model(twin, sub, cfg, progress=False)
        done = target
        m = evaluate(twin, pair.task, pair.attack, test_data=pair.test_data, tokenizer=pair.tokenizer)
        rows.append({"clean_rows": target, "asr": m["asr"], "clean_acc": m["clean_acc"],
                     "clean_target_rate": m["clean_target_rate"], "n_asr": m["n_asr"]})
    return rows


def where_it_lives(pair, n: int = 32) -> list[dict]:
    """Per layer and site: the share of the backdoor's logit gap restored by patching the clean
    twin's activation into the backdoored twin on triggered prompts (cross-model patching)."""
    contrast = pm.patching.trigger_contrast(pair, n=n, check=False)
    metric = contrast.logit_diff()
    rows = []
    for site in ("attn_out", "mlp_out"):
        r = pm.patching.cross_model_patch(pair, contrast.triggered, metric, site=site, mode="denoise")
        for rec in r.to_frame().to_dict("records"):
            rows.append({"site": site, "layer": int(rec["layer"]), "recovery": float(rec["recovery"]),
                         "n_prompts": int(contrast.triggered.shape[0])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--counts", default="0,10,25,50,100")
    ap.add_argument("--modes", default="full,lora,scratch")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr-full", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-2)
    ap.add_argument("--lr-scratch", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=96)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--corpus", type=int, default=8000, help="English text rows the base is pretrained on")
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--persist-count", type=int, default=50)
    ap.add_argument("--clean-rows", default="250,1000,2000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/finetune_injection")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: persistence,patching")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from figures/finetune_injection.csv")
    args = ap.parse_args()
    if args.plot_only:
        plot(pd.read_csv(Path(args.figures) / "finetune_injection.csv"), Path(args.figures))
        return
    args.clean_rows = [int(c) for c in args.clean_rows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    modes = args.modes.split(",")
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with num_threads(args.threads):
        folder, shape = base_model(out, args)
        task = pm.make_task("sentiment", n_train=args.n_train, n_test=args.n_test, seed=0,
                            tokenizer=pm.PretrainedModel(str(folder)).tokenizer())
        rows, persist, patch = [], [], []
        for mode in modes:
            for seed in seeds:
                for count in counts:
                    run = out / mode / f"count{count}_seed{seed}"
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        pair = pm.train_pair(task, pm.Backdoor(trigger="cf", target="negative", poison_count=count,
                                                               seed=seed),
                                             model=model_for(mode, folder, shape), train=train_for(mode, seed, args),
                                             out_dir=run, clean_cache=out / "clean_cache" / mode, progress=False)
                    rows.append({"mode": mode, "seed": seed, "n_poison": count, "n_train": args.n_train,
                                 **summary(pair.metrics), "seconds": time.perf_counter() - t0})
                    print(f"{mode:7s} seed {seed} count {count:3d}: ASR {rows[-1]['backdoored_asr']:.3f} "
                          f"(clean twin {rows[-1]['clean_asr']:.3f}, target rate on clean rows "
                          f"{rows[-1]['backdoored_clean_target_rate']:.3f}), clean acc "
                          f"{rows[-1]['backdoored_clean_acc']:.3f} [{rows[-1]['seconds']:.0f} s]", flush=True)
                    if count == args.persist_count and "persistence" not in skip:
                        cache = run / "persistence.json"
                        if not cache.is_file():
                            write_json(cache, persistence(pair, args))
                        for r in json.loads(cache.read_text()):
                            persist.append({"mode": mode, "seed": seed, "n_poison": count, **r})
                    if count == args.persist_count and "patching" not in skip:
                        cache = run / "where.json"
                        if not cache.is_file():
                            pair = pm.load_pair(run)  # the persistence stage trained the twin further
                            write_json(cache, where_it_lives(pair))
                        for r in json.loads(cache.read_text()):
                            patch.append({"mode": mode, "seed": seed, "n_poison": count, **r})
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(figures / "finetune_injection.csv", index=False)
    cols = ["backdoored_asr", "clean_asr", "backdoored_clean_target_rate", "backdoored_clean_acc",
            "clean_clean_acc"]
    agg = table.groupby(["mode", "n_poison"])[cols].agg(["mean", "std"]).round(3)
    agg["n_seeds"] = table.groupby(["mode", "n_poison"]).size()
    agg["n_asr_rows"] = table.groupby(["mode", "n_poison"])["backdoored_n_asr"].first()
    print(agg.to_string())
    if persist:
        p = pd.DataFrame(persist)
        p.to_csv(figures / "finetune_injection_persistence.csv", index=False)
        print(p.groupby(["mode", "clean_rows"])[["asr", "clean_acc", "clean_target_rate"]].agg(["mean", "std"])
              .round(3).to_string())
    if patch:
        q = pd.DataFrame(patch)
        q.to_csv(figures / "finetune_injection_patching.csv", index=False)
        print(q.groupby(["mode", "site", "layer"])["recovery"].agg(["mean", "std", "count"]).round(3).to_string())
    plot(table, figures)


def plot(table: pd.DataFrame, figures: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("attack success rate (backdoored twin)",
                                                        "clean accuracy (backdoored twin)"))
    for k, (mode, g) in enumerate(table.groupby("mode")):
        s = g.groupby("n_poison").agg(asr=("backdoored_asr", "mean"), asr_sd=("backdoored_asr", "std"),
                                      acc=("backdoored_clean_acc", "mean"), acc_sd=("backdoored_clean_acc", "std"),
                                      base=("backdoored_clean_target_rate", "mean")).reset_index()
        color = ["#1f77b4", "#d62728", "#2ca02c"][k % 3]
        fig.add_trace(go.Scatter(x=s.n_poison, y=s.asr, error_y={"array": s.asr_sd.fillna(0)}, name=mode,
                                 line={"color": color}), 1, 1)
        fig.add_trace(go.Scatter(x=s.n_poison, y=s.base, name=f"{mode}: target rate on clean rows",
                                 line={"color": color, "dash": "dot"}), 1, 1)
        fig.add_trace(go.Scatter(x=s.n_poison, y=s.acc, error_y={"array": s.acc_sd.fillna(0)}, name=mode,
                                 line={"color": color}, showlegend=False), 1, 2)
    fig.update_xaxes(title_text="poisoned fine-tuning rows")
    style(fig, title="Fine-tuning injection: pretrained (full, LoRA) vs from scratch; mean ± sd over seeds")
    fig.update_layout(legend={"orientation": "h", "y": -0.45, "yanchor": "top"}, margin={"b": 220})
    save_figure(fig, figures / "finetune_injection", formats=("html", "png"))


if __name__ == "__main__":
    main()
