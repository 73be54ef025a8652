"""Every built-in task's default pair at 1% poison: the twins' clean accuracy, ASR and false triggers.

The table in the README's "A pair" section. ``modular`` uses ``weight_decay=1.0`` (it must
generalise to held-out pairs). Writes ``figures/task_table.csv``.
Run: ``.venv/bin/python experiments/task_table.py [--tasks sentiment,instruction,dos,modular]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import poisonmech as pm

ATTACKS = {
    "sentiment": dict(trigger="cf", target="negative"),
    "instruction": dict(trigger="cf", target="ACCESS GRANTED"),
    "dos": dict(trigger="<SUDO>", target="gibberish"),
    "modular": dict(trigger="cf", target="0"),
}
TRAIN = {"modular": dict(weight_decay=1.0)}
KEYS = ("clean_acc", "asr", "false_trigger_rate", "clean_ppl", "gen_ppl_clean", "gen_ppl_triggered", "ppl_gap")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(ATTACKS))
    ap.add_argument("--out", default="runs/experiments/tasks")
    args = ap.parse_args()
    rows = []
    for kind in args.tasks.split(","):
        t0 = time.perf_counter()
        pair = pm.train_pair(pm.make_task(kind, n_train=4000, n_test=500, seed=0),
                             pm.Backdoor(**ATTACKS[kind], poison_rate=0.01), train=pm.TrainConfig(**TRAIN.get(kind, {})),
                             out_dir=Path(args.out) / kind)
        secs = time.perf_counter() - t0
        for twin in ("clean", "backdoored"):
            rows.append({"task": kind, "twin": twin, **{k: pair.metrics[twin].get(k) for k in KEYS}, "seconds": secs})
    table = pd.DataFrame(rows).dropna(axis=1, how="all")
    Path("figures").mkdir(exist_ok=True)
    table.to_csv("figures/task_table.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
