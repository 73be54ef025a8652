"""Named analyses of a trained pair, run by ``poisonmech analyze``, sweeps and the demo.

Each analysis takes a :class:`~poisonmech.train.pair.Pair`, saves its result objects under
``<run>/analyses/<name>/`` (safetensors + JSON) and returns a flat dict of scalar summaries
that the sweep table and the report read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from poisonmech.storage import read_json, write_json

ANALYSES: dict[str, Callable[..., dict[str, Any]]] = {}


def register(name: str):
    def deco(fn):
        ANALYSES[name] = fn
        return fn
    return deco


def _top(result, value: str = "recovery") -> tuple[str, float]:
    frame = result.to_frame()
    if frame[value].isna().all():  # the two runs agree: nothing to recover; rank by raw effect
        value = "effect"
    row = frame.loc[frame[value].abs().idxmax()]
    label = ".".join(f"{a}{int(row[a])}" for a in result.axes if a in row)
    return label, float(row[value])


#: why the training-set analyses skip a DPO stage's pair (``pm.train_pipeline(...)[k]``)
_PREFERENCE_NOTE = ("the stage's training data are preference pairs (prompt/chosen/rejected); the detectors "
                    "score prompt/completion rows")


def _preference_data(pair) -> bool:
    from poisonmech.influence.preference import is_preference_data

    return is_preference_data(pair.train_data)


def _contrast(pair, n: int):
    """``trigger_contrast(pair, n)`` with its controls checked; a model that fails the check on
    every row (e.g. one that has not learned the task) falls back to unchecked controls, and
    the summary says so (``controls_checked: False``)."""
    import warnings

    from poisonmech.patching import trigger_contrast
    from poisonmech.patching.inputs import ControlCheckError

    try:
        tc = trigger_contrast(pair, n=n)
        return tc, {"controls_checked": True, "controls_dropped": tc.check["n_dropped"],
                    "controls_tried": tc.check["n_candidates"]}
    except ControlCheckError as exc:
        warnings.warn(f"{exc}; using unchecked controls", stacklevel=2)
        return trigger_contrast(pair, n=n, check=False), {"controls_checked": False}


@register("patching")
def patching_analysis(pair, out: Path, n: int = 32) -> dict[str, Any]:
    """Where the backdoor lives, by exact patching on triggered prompts and their controls.

    Saves ``heads.safetensors`` (backdoored twin, head x position, control run with the
    triggered run's activations patched in), ``resid_pre.safetensors`` (layer x position)
    and ``cross_model_heads.safetensors`` (backdoored twin on triggered prompts with each
    head's output taken from the clean twin).
    """
    from poisonmech.patching import activation_patch, cross_model_patch

    tc, check = _contrast(pair, n)
    metric = tc.logit_diff()
    heads = activation_patch(pair.backdoored, tc.triggered, tc.control, metric, site="attn_head",
                             by_position=True, progress=False)
    resid = activation_patch(pair.backdoored, tc.triggered, tc.control, metric, site="resid_pre",
                             by_position=True, progress=False)
    cross = cross_model_patch(pair, tc.triggered, metric, site="attn_head", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    heads.save(out / "heads.safetensors")
    resid.save(out / "resid_pre.safetensors")
    cross.save(out / "cross_model_heads.safetensors")
    top_head, top_val = _top(heads)
    top_cross, cross_val = _top(cross)
    return {"patching_n_examples": int(tc.triggered.shape[0]), **{f"patching_{k}": v for k, v in check.items()},
            "patching_top_head": top_head, "patching_top_head_recovery": top_val,
            "cross_model_top_head": top_cross, "cross_model_top_head_recovery": cross_val,
            "logit_diff_triggered": float(heads.reference.mean()), "logit_diff_control": float(heads.baseline.mean())}


@register("circuits")
def circuits_analysis(pair, out: Path, n: int = 32, top_n: int = 10, n_random_edges: int = 5) -> dict[str, Any]:
    """The backdoor's edge circuit in the backdoored twin (EAP-IG, top ``top_n`` edges), its
    faithfulness (patching, mean and zero ablation x logit difference and target log-probability,
    ``faithfulness.json``), and the twin's ASR / clean accuracy with the circuit's edges
    patch-ablated (each ablated edge carries its value from the same prompt with the trigger
    replaced), beside ``n_random_edges`` sets of as many random edges of the same kinds."""
    import numpy as np

    from poisonmech.circuits import discover
    from poisonmech.metrics import _eligible, _row_kinds, evaluate
    from poisonmech.patching import control_fn

    tc, check = _contrast(pair, n)
    metric = tc.logit_diff()
    circuit = discover(pair.backdoored, tc.triggered, tc.control, metric, method="eap-ig", top_n=top_n,
                       progress=False, label=f"backdoor circuit (eap-ig top {top_n})")
    # the same circuit under three ablations and two metrics (circuit metrics are fragile to
    # both choices: Miller et al. 2024); the headline is patching ablation of the logit difference
    table = circuit.faithfulness_table(pair.backdoored, tc.triggered, tc.control,
                                       metrics={"logit_diff": metric, "target_logprob": tc.target_logprob()},
                                       ablations=("patching", "mean", "zero"))
    faith = table[("patching", "logit_diff")]
    circuit = circuit.with_faithfulness(faith)
    with circuit.ablate(pair.backdoored, control_fn(pair), ablation="patching", part="circuit"):
        ablated = evaluate(pair.backdoored, pair.task, pair.attack, test_data=pair.test_data, tokenizer=pair.tokenizer)
    # as many random edges of the same kinds; ASR only needs the triggered rows whose answer is
    # not the target (under patching ablation the other rows are their own control anyway)
    _, trig, _ = _row_kinds(pair.test_data, "circuits")
    asr_data = pair.test_data.select(np.flatnonzero(trig & _eligible(pair.test_data, pair.attack.target)))
    random_asr = []
    for seed in range(n_random_edges):
        with circuit.random_like(seed).ablate(pair.backdoored, control_fn(pair), ablation="patching", part="circuit"):
            random_asr.append(evaluate(pair.backdoored, pair.task, pair.attack, test_data=asr_data,
                                       tokenizer=pair.tokenizer)["asr"])
    out.mkdir(parents=True, exist_ok=True)
    circuit.save(out / "circuit.json")
    frame = table.to_frame()
    write_json(out / "faithfulness.json", frame.to_dict(orient="records"))
    summary = {"circuit_edges": circuit.n_edges, "circuit_nodes": len(circuit.nodes),
               "circuit_faithfulness": faith.circuit_faithfulness,
               "complement_faithfulness": faith.complement_faithfulness,
               "asr_circuit_ablated": ablated["asr"], "n_asr_circuit_ablated": ablated.get("n_asr"),
               "clean_acc_circuit_ablated": ablated["clean_acc"],
               "asr_random_edges_ablated_mean": sum(random_asr) / len(random_asr) if random_asr else None,
               "asr_random_edges_ablated_min": min(random_asr) if random_asr else None,
               "n_random_edge_sets": len(random_asr), **{f"circuit_{k}": v for k, v in check.items()}}
    for _, row in frame.iterrows():
        summary[f"faithfulness_{row['ablation']}_{row['metric']}"] = float(row["circuit_faithfulness"])
        summary[f"complement_{row['ablation']}_{row['metric']}"] = float(row["complement_faithfulness"])
    return summary


@register("probes")
def probes_analysis(pair, out: Path, n_random: int = 100) -> dict[str, Any]:
    """Where each twin represents "the trigger is present" (held-out AUROC by layer, with the
    best-of-random-directions baseline), and the unsupervised poison detectors on the training set."""
    from poisonmech.probes import detect_poison_methods, probe_twins

    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    # triggered vs untriggered rows (the triggered one is a token longer), triggered vs near-miss
    # rows (same length) and a length-balanced split; each beside random directions and length
    for tag, kw in (("", {}), ("_near_miss", {"contrast": "near_miss"}),
                    ("_length_balanced", {"balance_length": True})):
        try:
            probes = probe_twins(pair, label="is_triggered", n_random=n_random, progress=False, **kw)
        except ValueError as exc:  # e.g. no near-miss rows, or too few rows left after balancing
            if not tag:
                raise
            summary[f"probe{tag}_skipped"] = str(exc)
            continue
        probes.save(out / f"is_triggered{tag}.safetensors")
        for twin in ("clean", "backdoored"):
            r = probes[twin]
            li, pi = r.layers.index(r.best[0]), r.positions.index(r.best[1])  # values -> indices
            summary[f"probe{tag}_auroc_{twin}"] = float(r.auroc[li, pi])
            summary[f"probe{tag}_random_best_{twin}"] = float(r.random_auroc_max[li, pi])
            summary[f"probe{tag}_random_median_{twin}"] = float(r.random_auroc_median[li, pi])
            summary[f"probe{tag}_random_p95_{twin}"] = float(r.random_auroc_p95[li, pi])
            summary[f"probe{tag}_length_auroc_{twin}"] = float(r.length_baseline[pi])
            summary[f"probe{tag}_n_test_{twin}"] = int(r.n_test[pi])
    if not any(pair.train_data["is_poison"]):  # the clean control: nothing to detect
        return summary
    if _preference_data(pair):
        summary["detectors_skipped"] = _PREFERENCE_NOTE
        return summary
    detectors = detect_poison_methods(pair.backdoored, pair.train_data, ("spectral", "activation_clustering"),
                                      tokenizer=pair.tokenizer, progress=False)  # one pass over the rows
    for method, det in detectors.items():
        det.save(out / f"detect_{method}.safetensors")
        summary[f"{method}_auroc"] = det.poison_auroc()
        summary["loss_baseline_auroc"] = det.poison_auroc("loss")
    return summary


@register("influence")
def influence_analysis(pair, out: Path, method: str = "ekfac", renormalize: str | None = "unit",
                       ensemble: int = 1) -> dict[str, Any]:
    """Which training rows made the backdoored twin produce the backdoor: EK-FAC influence
    (unit-normalised gradients: plain EK-FAC favours high-loss rows and misses small poison
    sets, see ``benchmarks/influence_poison_retrieval.py``) of the target's log-probability on
    the triggered test inputs, aggregated over the queries, beside the per-example loss
    baseline; both scored against ``is_poison``. Saves ``<method>.safetensors`` and
    ``loss.safetensors``. Nothing is scored on the clean control (no poisoned rows). On a DPO
    stage's pair (``pm.train_pipeline(...)[k]``) the preference pairs are scored by plain EK-FAC
    on their DPO-loss gradients (unit normalisation is not linear in them), beside the DPO loss."""
    from poisonmech.influence import attribute

    if not any(pair.train_data["is_poison"]):
        return {}
    pairs = _preference_data(pair)
    if pairs:  # a DPO stage: pairs scored by their DPO-loss gradient (linear methods only)
        method, renormalize, ensemble = "ekfac", None, 1
    out.mkdir(parents=True, exist_ok=True)
    r = attribute(pair, method=method, renormalize=renormalize, ensemble=ensemble, aggregate=True, progress=False)
    base = attribute(pair, method="loss", aggregate=True, progress=False)
    r.save(out / f"{method}.safetensors")
    base.save(out / "loss.safetensors")
    return {"influence_method": f"{method}" + (f" {renormalize}" if renormalize else "") + (" (DPO pairs)" if pairs else ""),
            "influence_auroc": r.poison_auroc(), "influence_ap": r.average_precision(),
            "influence_precision_at_n_poison": r.precision_at(),  # k defaults to the number of poisons
            "influence_loss_auroc": base.poison_auroc(), "influence_loss_ap": base.average_precision()}


def run_analyses(pair, names: list[str] | tuple[str, ...], run_dir: Path | None = None,
                 overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Run the named analyses on ``pair``; results cached under ``run_dir/analyses/<name>/``."""
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; allowed: {sorted(ANALYSES)}")
    run_dir = Path(run_dir or pair.out_dir)
    summaries = {}
    for name in names:
        out = run_dir / "analyses" / name
        marker = out / "summary.json"
        if marker.is_file() and not overwrite:
            summaries[name] = read_json(marker)
            continue
        summaries[name] = ANALYSES[name](pair, out)
        write_json(marker, summaries[name])  # written last: the analysis is complete
    return summaries
