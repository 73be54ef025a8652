"""The findings a report opens with: sentences with numbers, written from a run's saved results.

Per run: how many training rows were poisoned, ASR and clean accuracy of both twins (with the
denominator of each rate where the metrics carry it as ``n_<metric>``), where the backdoor lives
(the top patching cells with their recovery and spread over prompts, cross-model patching, the
circuit), the probes beside their random baseline, and how well each method retrieves the poisoned
rows beside the per-example loss baseline. Everything degrades gracefully: a missing analysis or
key leaves its sentence out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poisonmech.storage import read_json
from poisonmech.viz.patching import gap_check

#: rate metrics of ``pm.evaluate``: name -> (label in a sentence, what its denominator counts)
RATES: dict[str, tuple[str, str]] = {
    "asr": ("ASR", "triggered rows"),
    "label_asr": ("label ASR", "triggered rows"),
    "clean_acc": ("clean accuracy", "clean rows"),
    "label_acc": ("label accuracy", "clean rows"),
    "false_trigger_rate": ("false-trigger rate", "near-miss rows"),
    "label_false_trigger_rate": ("label false-trigger rate", "near-miss rows"),
    "triggered_acc": ("accuracy on triggered rows", "triggered rows"),
}


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{float(v):.3f}"


def rate_text(metrics: dict[str, Any], name: str) -> str | None:
    """``"ASR 1.000 (248/248 triggered rows)"``: the rate with its denominator when ``metrics``
    holds ``n_<name>``; ``k/n`` when the rate is a whole count of it, else ``n = ...``; None
    when the metric is absent."""
    if name not in metrics or metrics[name] is None:
        return None
    label, unit = RATES.get(name, (name, "rows"))
    v, n = metrics[name], metrics.get(f"n_{name}")
    text = f"{label} {_f(v)}"
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 and np.isfinite(v):
        k = float(v) * n
        text += f" ({int(round(k))}/{n} {unit})" if abs(k - round(k)) < 1e-6 * max(1.0, n) else f" (n = {n} {unit})"
    elif n == 0:
        text += f" (0 {unit})"
    return text


def top_cells(result, k: int = 3) -> pd.DataFrame:
    """The ``k`` cells of a patching result with the largest ``|recovery|``.

    Columns: ``cell`` (``L0.H3``, ``L1``), ``pos`` / ``token`` where the result is by position,
    ``recovery`` (mean effect / mean gap, as :attr:`PatchResult.recovery`), ``sd`` (standard
    deviation over prompts of each prompt's effect divided by the same mean gap, so that
    ``recovery`` is exactly their mean) and ``n`` (prompts). Empty when the gap is zero.
    """
    gaps = (result.reference - result.baseline).detach().double().cpu().numpy()
    gap = float(gaps.mean())
    if abs(gap) < 1e-6:
        return pd.DataFrame(columns=["cell", "recovery", "sd", "n"])
    eff = (result.values.detach().double().cpu().numpy() - result.baseline.detach().double().cpu().numpy()) / gap
    n = eff.shape[-1]
    rec, sd = eff.mean(-1), (eff.std(-1, ddof=1) if n > 1 else np.full(eff.shape[:-1], np.nan))
    order = np.argsort(-np.abs(rec), axis=None, kind="stable")[:k]
    rows = []
    for flat in order:
        idx = dict(zip(result.axes, np.unravel_index(flat, rec.shape)))
        cell = f"L{int(idx['layer'])}" + (f".H{int(idx['head'])}" if "head" in idx else "")
        row: dict[str, Any] = {"cell": cell}
        if "pos" in idx:
            row["pos"] = int(idx["pos"])
            row["token"] = result.str_tokens[int(idx["pos"])] if result.str_tokens else None
        row.update(recovery=float(rec.flat[flat]), sd=float(sd.flat[flat]), n=n)
        rows.append(row)
    return pd.DataFrame(rows)


def _cells_text(cells: pd.DataFrame) -> str:
    parts = []
    for _, r in cells.iterrows():
        where = f" at position {r['pos']}" + (f" ({r['token']!r})" if r.get("token") else "") if "pos" in r else ""
        spread = f", sd {r['sd']:.2f}" if np.isfinite(r["sd"]) else ""
        parts.append(f"{r['cell']}{where}: recovery {r['recovery']:.2f}{spread}")
    return "; ".join(parts)


def _patching_sentences(adir: Path) -> list[str]:
    from poisonmech.patching.result import PatchResult

    out = []
    for fname, what in (("heads.safetensors", "Exact patching of each head and position in the backdoored twin "
                                              "(triggered run into its control)"),
                        ("cross_model_heads.safetensors", "Cross-model patching (each head of the clean twin "
                                                          "into the backdoored twin on triggered prompts)")):
        if not (adir / fname).is_file():
            continue
        r = PatchResult.load(adir / fname)
        chk = gap_check(r)
        if chk.zero:
            out.append(f"{what}: the two runs agree on all {chk.n} prompts (logit-difference gap 0), so there is "
                       "nothing to localise.")
        elif chk.within_noise:
            out.append(f"{what}: the logit-difference gap cannot be told from noise ({chk.describe()}), so recovery "
                       "is not meaningful and no component is singled out.")
        else:
            cells = top_cells(r, 3)
            out.append(f"{what}, {chk.describe()}: top cells by recovery (sd over prompts) {_cells_text(cells)}.")
    return out


def _circuit_sentence(s: dict[str, Any], metrics: dict[str, Any]) -> str | None:
    if "circuit_faithfulness" not in s:
        return None
    size = f"{s['circuit_edges']} edges" + (f" on {s['circuit_nodes']} nodes" if "circuit_nodes" in s else "") + ", " \
        if "circuit_edges" in s else ""
    text = f"Backdoor circuit (EAP-IG): {size}faithfulness {_f(s['circuit_faithfulness'])}"
    if "complement_faithfulness" in s:
        text += f" (its complement {_f(s['complement_faithfulness'])})"
    if "asr_circuit_ablated" in s:  # evaluated on the same test rows as the intact twin: same denominators
        def ablated(name: str) -> str:
            return rate_text({name: s[f"{name}_circuit_ablated"], f"n_{name}": metrics.get(f"n_{name}")}, name)

        text += f"; with its edges ablated the backdoored twin's {ablated('asr')} (intact: {_f(metrics.get('asr'))})"
        if "clean_acc_circuit_ablated" in s:
            text += f" and its {ablated('clean_acc')} (intact: {_f(metrics.get('clean_acc'))})"
    return text + "."


def _probe_sentence(s: dict[str, Any]) -> str | None:
    parts = []
    for twin in ("backdoored", "clean"):
        if f"probe_auroc_{twin}" not in s:
            continue
        base = [f"{label} {_f(s[key])}" for key, label in ((f"probe_random_median_{twin}", "median random direction"),
                                                           (f"probe_random_p95_{twin}", "95th percentile"),
                                                           (f"probe_random_best_{twin}", "best random direction"),
                                                           (f"probe_length_auroc_{twin}", "length alone"))
                if key in s]
        parts.append(f"{twin} twin {_f(s[f'probe_auroc_{twin}'])}" + (f" ({', '.join(base)})" if base else ""))
    return "Linear probe for 'the trigger is present' (best layer, held-out AUROC): " + "; ".join(parts) + "." \
        if parts else None


def _retrieval_sentences(inf: dict[str, Any], probes: dict[str, Any], n_poison: int | None,
                         n_train: int | None) -> list[str]:
    out = []
    what = f"the {n_poison} poisoned rows among {n_train} training rows" if n_poison and n_train else "the poisoned rows"
    chance = f"; AP of a random ranking: {n_poison / n_train:.3f}" if n_poison and n_train else ""
    if "influence_auroc" in inf:
        text = f"Retrieving {what} ({'AUROC 0.5 is chance' + chance}): {inf.get('influence_method', 'influence')} " \
               f"influence AUROC {_f(inf['influence_auroc'])}"
        if "influence_ap" in inf:
            text += f", AP {_f(inf['influence_ap'])}"
        p = inf.get("influence_precision_at_n_poison")
        if p is not None and n_poison:
            text += f", precision at {n_poison} {_f(p)} ({int(round(p * n_poison))}/{n_poison})"
        if "influence_loss_auroc" in inf:
            base = "per-pair DPO loss" if "DPO pairs" in str(inf.get("influence_method", "")) else "per-example loss"
            text += f", against the {base} baseline's AUROC {_f(inf['influence_loss_auroc'])}"
            if "influence_loss_ap" in inf:
                text += f" (AP {_f(inf['influence_loss_ap'])})"
        out.append(text + ".")
    dets = [f"{label} AUROC {_f(probes[key])}" for key, label in (("spectral_auroc", "spectral signature"),
                                                                  ("activation_clustering_auroc",
                                                                   "activation clustering")) if key in probes]
    if dets:
        base = f", against the loss baseline's {_f(probes['loss_baseline_auroc'])}" \
            if "loss_baseline_auroc" in probes else ""
        out.append(f"Unsupervised detectors on the training set: {', '.join(dets)}{base}.")
    elif probes.get("detectors_skipped"):
        out.append(f"The unsupervised detectors were skipped: {probes['detectors_skipped']}.")
    return out


def poison_counts(run: Path, data: str = "train") -> tuple[int | None, int | None]:
    """``(n_poison, n_train)`` of the backdoored twin's training set in a run directory
    (``data/<data>.parquet``: ``train`` for a pair, ``stage_K`` for a pipeline stage), or Nones."""
    path = Path(run) / "data" / f"{data}.parquet"
    if not path.is_file():
        return None, None
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["is_poison"]).column("is_poison").to_pylist()
    return int(sum(bool(x) for x in col)), len(col)


def twin_sentences(metrics: dict[str, dict]) -> list[str]:
    """One sentence per twin: its rates with their denominators."""
    out = []
    for twin in ("backdoored", "clean"):
        m = metrics.get(twin) or {}
        parts = [t for t in (rate_text(m, k) for k in ("asr", "clean_acc", "false_trigger_rate", "label_asr",
                                                         "label_acc")) if t]
        if parts:
            out.append(f"{twin.capitalize()} twin: {', '.join(parts)}.")
    return out


def run_findings(run: str | Path, metrics: dict[str, dict] | None = None, *, n_poison: int | None = None,
                 n_train: int | None = None, attack: dict[str, Any] | None = None,
                 earlier_poison: int = 0) -> list[str]:
    """The findings of one run (or pipeline stage) directory, as sentences.

    ``metrics`` defaults to the run's ``metrics.json``, the poison counts to its training data,
    ``attack`` to its ``config.json``'s. ``earlier_poison``: for a pipeline stage, the poisoned
    rows of the stages before it (the backdoored twin carries them).
    """
    run = Path(run)
    if metrics is None and (run / "metrics.json").is_file():
        metrics = read_json(run / "metrics.json")
    metrics = metrics or {}
    if n_poison is None or n_train is None:
        found = poison_counts(run)
        n_poison, n_train = n_poison if n_poison is not None else found[0], n_train if n_train is not None else found[1]
    if attack is None and (run / "config.json").is_file():
        attack = read_json(run / "config.json").get("attack")
    out = []
    trig = f" (trigger {attack['trigger']!r} -> {attack['target']!r})" if attack and "trigger" in attack else ""
    if n_poison == 0 and earlier_poison:
        out.append(f"No poisoned rows in this stage's training data{trig}; the backdoored twin carries the "
                   f"{earlier_poison} poisoned rows of earlier stages.")
    elif n_poison == 0:
        out.append(f"Clean control{trig}: no poisoned training rows, so there is no backdoor to find; its numbers "
                   "are the null against which the other runs are read.")
    elif n_poison is not None:
        of = f" of {n_train} ({100 * n_poison / n_train:.1f}%)" if n_train else ""
        out.append(f"{n_poison}{of} training rows poisoned{trig}.")
    out += twin_sentences(metrics)
    adir = run / "analyses"

    def summary(name: str) -> dict[str, Any]:
        path = adir / name / "summary.json"
        return read_json(path) if path.is_file() else {}

    out += _patching_sentences(adir / "patching") if (adir / "patching" / "summary.json").is_file() else []
    circ = _circuit_sentence(summary("circuits"), metrics.get("backdoored") or {})
    probes = summary("probes")
    out += [t for t in (circ, _probe_sentence(probes)) if t]
    out += _retrieval_sentences(summary("influence"), probes, n_poison, n_train)
    return out


def sweep_overview(frame: pd.DataFrame) -> list[str]:
    """Sentences on the whole sweep: the runs, and ASR / clean accuracy by poison count (mean over seeds)."""
    runs = frame.drop_duplicates("run")
    done = runs[runs["status"] == "done"]
    out = [f"{len(runs)} runs ({len(done)} done"
           + (f", {len(runs) - len(done)} not done" if len(done) < len(runs) else "") + ") over poison counts "
           f"{sorted({int(c) for c in runs['n_poison'].dropna()})} and seeds {sorted({int(s) for s in runs['seed']})}."]
    f = frame[(frame["status"] == "done") & frame["twin"].isin(["backdoored", "clean"])
              & frame["metric"].isin(["asr", "clean_acc"])].copy()
    if f.empty:
        return out
    f["value"] = pd.to_numeric(f["value"], errors="coerce")
    means = f.groupby(["metric", "twin", "n_poison"])["value"].agg(["mean", "count"])
    for metric, label in (("asr", "ASR"), ("clean_acc", "Clean accuracy")):
        for twin in ("backdoored", "clean"):
            if (metric, twin) not in means.index.droplevel(2):
                continue
            rows = means.loc[(metric, twin)]
            seeds = " (mean over seeds)" if (rows["count"] > 1).any() else ""
            vals = ", ".join(f"{_f(r['mean'])} at {int(c)}" for c, r in rows.iterrows())
            out.append(f"{label} of the {twin} twin by poison count{seeds}: {vals}.")
    return out


__all__ = ["RATES", "poison_counts", "rate_text", "run_findings", "sweep_overview", "top_cells", "twin_sentences"]
