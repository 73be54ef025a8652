"""The backdoor circuit of the default sentiment pair, and what ablating it does to ASR and accuracy.

On the backdoored twin of ``runs/default_pair`` (``poisonmech train (the default pair)``), the circuit is
discovered with EAP-IG on ``trigger_contrast(pair, 32)`` (clean = triggered prompts, corrupted
= the same prompts with the trigger swapped for a task word, metric = target minus true-answer
logit) and kept as its ``--top-n`` best edges. Then, under ``circuit.ablate(..., part="circuit")``
(the circuit's own edges ablated, everything else intact), ``pm.evaluate`` runs on the pair's
whole test set (clean, triggered and near-miss rows), against the same number of random edges
of the same kinds (``circuit.random_like(seed)``, ``--seeds`` draws). Two ablations:

- ``patching``: an ablated edge carries its value from the same prompt with every trigger word
  replaced by a control word (computed per evaluated batch). Rows without a trigger are their
  own control, so clean accuracy cannot move under this ablation: its clean-accuracy column is
  a sanity check, not evidence;
- ``mean``: an ablated edge carries its mean over all clean test prompts and positions (input
  independent, so it also tests whether the circuit's edges are needed for the clean task).

Prints the circuit and its faithfulness table: circuit and complement faithfulness under
patching, mean and zero ablation for two metrics (logit difference and target log-probability),
side by side with their denominators (circuit metrics are fragile to these choices: Miller et
al. 2024); then one line per (ablation, edges) with ``asr``,
``clean_acc``, ``triggered_acc``, ``false_trigger_rate``, then the criteria of issue 3:
ASR down by >= 80% (relative) with clean accuracy down by <= 5 points, and random edges of
the same kinds doing far less. Also compares EAP, EAP-IG and ACDC circuits, and a random circuit
of the same edge kinds (its scores a random permutation: the chance level of each column).

Run: ``.venv/bin/python benchmarks/circuit_default_pair.py [--run runs/default_pair] [--top-n 10] [--seeds 5]``
(uses one intra-op thread: many small forwards; about 3 minutes on 2 busy CPU cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

import poisonmech as pm
import poisonmech.circuits as pc
from poisonmech.cli import default_pair
from poisonmech.patching import trigger_contrast
from poisonmech.patching.inputs import control_fn


def clean_prompt_batches(pair) -> list[torch.Tensor]:
    """Every clean test prompt, grouped into batches of one length (the mean-ablation reference)."""
    data = pair.test_data.to_pandas()
    rows = data[~data["is_triggered"] & ~data["is_near_miss"]]
    by_len: dict[int, list[list[int]]] = {}
    for p in rows["prompt"]:
        ids = pair.tokenizer(p)["input_ids"]
        by_len.setdefault(len(ids), []).append(ids)
    return [torch.tensor(v) for _, v in sorted(by_len.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/default_pair")
    ap.add_argument("--top-n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--acdc-threshold", type=float, default=0.25)
    ap.add_argument("--check-args", action="store_true", help="parse the arguments, print them and exit")
    args = ap.parse_args()
    if args.check_args:
        print(vars(args))
        return
    torch.set_num_threads(1)

    pair = default_pair(args.run)
    model = pair.backdoored
    tc = trigger_contrast(pair, 32)
    metric = tc.logit_diff()

    t0 = time.perf_counter()
    scores = pc.edge_attribution(model, tc.triggered, tc.control, metric, method="eap-ig", steps=args.steps,
                                 progress=False)
    circuit = scores.circuit(top_n=args.top_n, label=f"eap-ig top {args.top_n}")
    print(f"eap_ig_seconds: {time.perf_counter() - t0:.2f}  (batch {tc.triggered.shape[0]}, "
          f"{tc.triggered.shape[1]} tokens, {scores.graph.n_edges} edges, {args.steps} steps)")
    print(f"circuit_edges: {', '.join(f'{e} ({circuit.score(e):+.2f})' for e in circuit.edges)}")
    print(f"circuit_edge_kinds: {circuit.edge_kinds()}")
    print(f"total_effect (mean logit diff triggered - control): {scores.total_effect:.2f}")
    t0 = time.perf_counter()
    table = circuit.faithfulness_table(model, tc.triggered, tc.control,
                                       {"logit_diff": metric, "target_logprob": tc.target_logprob()})
    print(f"\nfaithfulness_seconds: {time.perf_counter() - t0:.1f}  (mean ablation: mean over the control batch; "
          "empty = every edge ablated)")
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_frame()[["ablation", "metric", "circuit_faithfulness", "complement_faithfulness",
                                "clean_metric", "empty_metric", "corrupted_metric", "n_examples"]]
              .to_string(index=False))
    circuit = circuit.with_faithfulness(table[("patching", "logit_diff")])
    print(f"circuit: {circuit!r}\n")

    def evaluate() -> dict:
        return pm.evaluate(model, pair.task, pair.attack, test_data=pair.test_data, tokenizer=pair.tokenizer)

    base = evaluate()
    rows = [{"ablation": "none", "edges": "none", **{k: base[k] for k in
             ("asr", "clean_acc", "triggered_acc", "false_trigger_rate")}}]
    references = {"patching": control_fn(pair), "mean": clean_prompt_batches(pair)}
    t0 = time.perf_counter()
    for ablation, ref in references.items():
        for label, c in [("circuit", circuit)] + [(f"random seed {s}", circuit.random_like(s))
                                                   for s in range(args.seeds)]:
            with c.ablate(model, ref, ablation=ablation, part="circuit"):
                r = evaluate()
            rows.append({"ablation": ablation, "edges": label,
                         **{k: r[k] for k in ("asr", "clean_acc", "triggered_acc", "false_trigger_rate")}})
    frame = pd.DataFrame(rows)
    print(f"ablation_eval_seconds: {time.perf_counter() - t0:.1f}")
    with pd.option_context("display.width", 140, "display.float_format", "{:.3f}".format):
        print(frame.to_string(index=False))

    print(f"\ncriteria (base asr {base['asr']:.3f}, clean_acc {base['clean_acc']:.3f}):")
    for ablation in references:
        sub = frame[frame["ablation"] == ablation]
        circ = sub[sub["edges"] == "circuit"].iloc[0]
        rnd = sub[sub["edges"].str.startswith("random")]
        asr_drop = (base["asr"] - circ["asr"]) / base["asr"]
        ca_drop = 100 * (base["clean_acc"] - circ["clean_acc"])
        rnd_drop = (base["asr"] - rnd["asr"]) / base["asr"]
        rnd_ca = 100 * (base["clean_acc"] - rnd["clean_acc"])
        ok = asr_drop >= 0.8 and ca_drop <= 5
        print(f"  {ablation:8s} circuit: asr_relative_drop {asr_drop:.1%}, clean_acc_drop {ca_drop:.1f} points "
              f"-> {'PASS' if ok else 'FAIL'} (>=80% and <=5 points)")
        print(f"  {ablation:8s} random same-kind edges ({len(rnd)} seeds): asr_relative_drop mean "
              f"{rnd_drop.mean():.1%} (max {rnd_drop.max():.1%}), clean_acc_drop mean {rnd_ca.mean():.1f} points")

    t0 = time.perf_counter()
    eap = pc.discover(model, tc.triggered, tc.control, metric, method="eap", top_n=args.top_n, label="eap",
                      mode="noise", progress=False)  # noising EAP / ACDC: the numbers the README reports
    acdc = pc.discover(model, tc.triggered, tc.control, metric, method="acdc", threshold=args.acdc_threshold,
                       label="acdc", mode="noise", progress=False)
    print(f"\neap_and_acdc_seconds: {time.perf_counter() - t0:.1f}; acdc kept {acdc.n_edges} edges "
          f"(threshold {args.acdc_threshold}), faithfulness "
          f"{acdc.faithfulness(model, tc.triggered, tc.control, metric).circuit_faithfulness:.3f}")
    table = pc.compare([circuit, eap, acdc, circuit.random_like(0)], labels=["eap-ig", "eap", "acdc", "random"]).to_frame()
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table[["a", "b", "n_edges_a", "n_edges_b", "edge_jaccard", "node_jaccard", "score_spearman",
                     "union_score_spearman", "note"]].to_string(index=False))
    assert np.isfinite(table["edge_jaccard"]).all()


if __name__ == "__main__":
    main()
