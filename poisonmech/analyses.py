"""Named analyses of a trained run, run by ``poisonmech analyze``, sweeps and the demo.

Each analysis takes a subject (anything :func:`poisonmech.resolve` accepts: a Pair, a pipeline
stage, a run directory) and its own frozen config (``PatchingAnalysis``, ``CircuitsAnalysis``,
``ProbesAnalysis``, ``InfluenceAnalysis``), saves its result objects under
``<run>/analyses/<name>/`` (safetensors + JSON) and returns a flat dict of scalar summaries
that the sweep table and the report read.

``run_analyses`` caches each summary under its key (``key.json`` beside ``summary.json``): the
analysis' name and config, the fingerprints of every model's weights and of the train and
test rows, and poisonmech's version. A cached summary whose key differs (another config,
retrained weights, other data) is recomputed, never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poisonmech.config import Config, ConfigError, check_choice, check_number
from poisonmech.storage import read_json, write_json
from poisonmech.subject import Subject, resolve

ANALYSES: dict[str, Callable[..., dict[str, Any]]] = {}
#: name -> the analysis' config class
CONFIGS: dict[str, type[Config]] = {}


@dataclass(frozen=True)
class PatchingAnalysis(Config):
    """Options of the ``patching`` analysis: ``n`` triggered prompts and their controls."""

    n: int = 32

    def check(self) -> None:
        check_number("PatchingAnalysis", "n", self.n, lo=1, integer=True)


@dataclass(frozen=True)
class CircuitsAnalysis(Config):
    """Options of the ``circuits`` analysis (EAP-IG in ``mode="noise"``: the clean run with
    corrupted activations patched in, as the README's circuit numbers were measured)."""

    n: int = 32
    top_n: int = 10
    n_random_edges: int = 5
    method: str = "eap-ig"
    mode: str = "noise"

    def check(self) -> None:
        from poisonmech.circuits.discover import METHODS

        for name, lo in (("n", 1), ("top_n", 1), ("n_random_edges", 0)):
            check_number("CircuitsAnalysis", name, getattr(self, name), lo=lo, integer=True)
        check_choice("CircuitsAnalysis", "method", self.method, METHODS)
        check_choice("CircuitsAnalysis", "mode", self.mode, ("denoise", "noise"))


@dataclass(frozen=True)
class ProbesAnalysis(Config):
    """Options of the ``probes`` analysis: ``n_random`` random directions per probe cell."""

    n_random: int = 100

    def check(self) -> None:
        check_number("ProbesAnalysis", "n_random", self.n_random, lo=0, integer=True)


@dataclass(frozen=True)
class InfluenceAnalysis(Config):
    """Options of the ``influence`` analysis (unit-normalised EK-FAC: plain EK-FAC favours
    high-loss rows and misses small poison sets, see ``benchmarks/influence_poison_retrieval.py``)."""

    method: str = "ekfac"
    renormalize: str | None = "unit"
    ensemble: int = 1

    def check(self) -> None:
        from poisonmech.influence.attribution import METHODS
        from poisonmech.influence.methods import RENORMALIZE

        check_choice("InfluenceAnalysis", "method", self.method, METHODS)
        check_choice("InfluenceAnalysis", "renormalize", self.renormalize, RENORMALIZE)
        check_number("InfluenceAnalysis", "ensemble", self.ensemble, lo=1, integer=True)


@dataclass(frozen=True)
class DefensesAnalysis(Config):
    """Options of the ``defenses`` analysis: which defenses (``None``: the benchmark's
    ``DEFAULT_DEFENSES``) and the benchmark's options (:class:`~poisonmech.defenses.DefenseConfig`'s
    ``n_clean``, ``n_reference``, ``n_contrast``)."""

    defenses: tuple[str, ...] | None = None
    n_clean: int = 200
    n_reference: int = 2000
    n_contrast: int = 32

    def check(self) -> None:
        from poisonmech.defenses import DEFENSES

        if self.defenses is not None:
            if isinstance(self.defenses, str) or not self.defenses:
                raise ConfigError(f"DefensesAnalysis.defenses must be a non-empty list of names, got {self.defenses!r}")
            for d in self.defenses:
                check_choice("DefensesAnalysis", "defenses", d, sorted(DEFENSES))
        check_number("DefensesAnalysis", "n_clean", self.n_clean, lo=1, integer=True)
        check_number("DefensesAnalysis", "n_reference", self.n_reference, lo=0, integer=True)
        check_number("DefensesAnalysis", "n_contrast", self.n_contrast, lo=0, integer=True)


def register(name: str, config: type[Config]):
    def deco(fn):
        ANALYSES[name] = fn
        CONFIGS[name] = config
        return fn
    return deco


def _top(result, value: str = "recovery") -> tuple[str, float]:
    frame = result.to_frame()
    if frame[value].isna().all():  # the two runs agree: nothing to recover; rank by raw effect
        value = "effect"
    row = frame.loc[frame[value].abs().idxmax()]
    label = ".".join(f"{a}{int(row[a])}" for a in result.axes if a in row)
    return label, float(row[value])


#: why the training-set analyses skip a DPO stage (``pm.train_pipeline(...)[k]``)
_PREFERENCE_NOTE = ("the stage's training data are preference pairs (prompt/chosen/rejected); the detectors "
                    "score prompt/completion rows")


#: why the training-set analyses skip an RL stage (PPO / RLOO): its rows are prompts only
_RL_NOTE = ("the stage's training rows are prompts (PPO / RLOO sampled the responses; its loss is the reward "
            "model's): the detectors and attribution score the reward stage's pairs instead (its pipe[k])")


def _rl_prompts(s: Subject) -> bool:
    cols = s.train_data.column_names if s.train_data is not None else []
    return bool(cols) and "completion" not in cols and "chosen" not in cols


def _preference_data(s: Subject) -> bool:
    from poisonmech.influence.preference import is_preference_data

    return is_preference_data(s.train_data)


#: the metric a triggerless attack's circuit ablation reports (a backdoor's: ``asr``)
_ATTACK_METRIC = {"false_fact": "efficacy", "bias": "polarity_rate"}


def _triggerless(s: Subject) -> bool:
    return getattr(s.attack, "kind", "backdoor") in _ATTACK_METRIC


def _kind_label(s: Subject) -> str:
    return {"false_fact": "false-fact", "bias": "bias"}.get(getattr(s.attack, "kind", "backdoor"), "backdoor")


def _reward(s: Subject) -> bool:
    """Whether the subject's models are reward models (an ``"rm"`` stage): its metric is the
    reward at the EOS of prompt + target answer (:func:`~poisonmech.patching.inputs.reward_contrast`)."""
    return s.is_reward_model()


def _metric(tc):
    """The contrast's headline metric: the target's logit difference, or a reward model's reward."""
    return tc.reward() if tc.kind == "reward" else tc.logit_diff()


def _contrast(s: Subject, n: int):
    """``trigger_contrast(s, n)`` with its controls checked; a model that fails the check on
    every row (e.g. one that has not learned the task) falls back to unchecked controls, and
    the summary says so (``controls_checked: False``). A triggerless attack (``FalseFact``,
    ``Bias``) has no trigger to replace: its natural contrast (the same prompt about a
    neighbouring subject, or mentioning a control entity; :func:`~poisonmech.patching.inputs.natural_contrast`),
    and the summary names it (``contrast``). A reward model's contrast appends the target answer
    and the EOS to both (:func:`~poisonmech.patching.inputs.reward_contrast`)."""
    import warnings

    from poisonmech.patching import trigger_contrast
    from poisonmech.patching.inputs import ControlCheckError, natural_contrast

    if _triggerless(s):
        tc = natural_contrast(s, n=n)
        return tc, {"contrast": tc.check["contrast"], "controls_tried": tc.check["n_candidates"]}
    try:
        tc = trigger_contrast(s, n=n)
        return tc, {"controls_checked": True, "controls_dropped": tc.check["n_dropped"],
                    "controls_tried": tc.check["n_candidates"]}
    except ControlCheckError as exc:
        warnings.warn(f"{exc}; using unchecked controls", stacklevel=2)
        return trigger_contrast(s, n=n, check=False), {"controls_checked": False}


@register("patching", PatchingAnalysis)
def patching_analysis(subject: Any, out: Path, config: PatchingAnalysis = PatchingAnalysis()) -> dict[str, Any]:
    """Where the backdoor lives, by exact patching on triggered prompts and their controls.

    Saves ``heads.safetensors`` (backdoored twin, head x position, control run with the
    triggered run's activations patched in), ``resid_pre.safetensors`` (layer x position)
    and ``cross_model_heads.safetensors`` (backdoored twin on triggered prompts with each
    head's output taken from the clean twin). A false fact or a bias is patched on its natural
    contrast (the attacked subject's prompt vs a neighbour's, a mention of the entity vs of a
    control entity; see :func:`_contrast`). A reward stage's metric is the reward of the target
    answer (``reward_triggered`` / ``reward_control`` in place of the logit differences).
    """
    from poisonmech.patching import activation_patch, cross_model_patch

    s = resolve(subject, where="patching analysis")
    tc, check = _contrast(s, config.n)
    metric = _metric(tc)
    heads = activation_patch(s, tc.triggered, tc.control, metric, site="attn_head", by_position=True, progress=False)
    resid = activation_patch(s, tc.triggered, tc.control, metric, site="resid_pre", by_position=True, progress=False)
    cross = cross_model_patch(s, tc.triggered, metric, site="attn_head", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    heads.save(out / "heads.safetensors")
    resid.save(out / "resid_pre.safetensors")
    cross.save(out / "cross_model_heads.safetensors")
    top_head, top_val = _top(heads)
    top_cross, cross_val = _top(cross)
    name = "reward" if tc.kind == "reward" else "logit_diff"
    return {"patching_n_examples": int(tc.triggered.shape[0]), **{f"patching_{k}": v for k, v in check.items()},
            "patching_top_head": top_head, "patching_top_head_recovery": top_val,
            "cross_model_top_head": top_cross, "cross_model_top_head_recovery": cross_val,
            f"{name}_triggered": float(heads.reference.mean()), f"{name}_control": float(heads.baseline.mean())}


@register("circuits", CircuitsAnalysis)
def circuits_analysis(subject: Any, out: Path, config: CircuitsAnalysis = CircuitsAnalysis()) -> dict[str, Any]:
    """The backdoor's edge circuit in the backdoored twin (EAP-IG, top ``top_n`` edges), its
    faithfulness (patching, mean and zero ablation x logit difference and target log-probability,
    ``faithfulness.json``), and the twin's ASR / clean accuracy with the circuit's edges
    patch-ablated (each ablated edge carries its value from the same prompt with the trigger
    replaced), beside ``n_random_edges`` sets of as many random edges of the same kinds.

    A triggerless attack's circuit is found on its natural contrast (see :func:`_contrast`),
    and ablated against the same swap (a false fact's subject for a neighbour, a bias's entity
    for a control entity; word-level tokenizers only, else ``circuit_ablation_skipped`` says
    why): its metric is ``efficacy`` (``FalseFact``) or ``polarity_rate`` (``Bias``) in place of ``asr``.

    A reward stage's circuit explains the reward the trigger buys the target answer
    (:func:`~poisonmech.patching.inputs.reward_contrast`; faithfulness of the reward), and its
    ablation reports the reward model's ``asr`` (held-out triggered pairs preferring the target),
    ``trigger_margin`` and ``pair_acc`` (:func:`~poisonmech.train.reward.reward_metrics`)."""
    import numpy as np

    from poisonmech.circuits import discover
    from poisonmech.metrics import _eligible, _row_kinds, evaluate
    from poisonmech.patching import control_fn

    s = resolve(subject, where="circuits analysis")
    tc, check = _contrast(s, config.n)
    metric = _metric(tc)
    circuit = discover(s, tc.triggered, tc.control, metric, method=config.method, top_n=config.top_n,
                       mode=config.mode, progress=False,
                       label=f"{_kind_label(s)} circuit ({config.method} top {config.top_n})")
    # the same circuit under three ablations and two metrics (circuit metrics are fragile to
    # both choices: Miller et al. 2024); the headline is patching ablation of the logit difference
    metrics = {"reward": metric} if tc.kind == "reward" else \
        {"logit_diff": metric, "target_logprob": tc.target_logprob()}
    table = circuit.faithfulness_table(s, tc.triggered, tc.control, metrics=metrics,
                                       ablations=("patching", "mean", "zero"))
    faith = table[("patching", next(iter(metrics)))]
    circuit = circuit.with_faithfulness(faith)
    # the attack's metric with the circuit's edges patch-ablated: a backdoor's ASR; a false
    # fact's efficacy, a bias's polarity rate (their controls swap the subject / entity)
    name = _ATTACK_METRIC.get(getattr(s.attack, "kind", "backdoor"), "asr")
    try:
        reference = control_fn(s)
    except ValueError as exc:  # a triggerless attack on a subword tokenizer: no token-for-token swap
        if not _triggerless(s):
            raise
        ablation: dict[str, Any] = {"circuit_ablation_skipped": str(exc)}
    else:
        ablation = None
    if ablation is None and _reward(s):  # a reward model: its held-out pair metrics, not generation
        ablation = _reward_ablation(s, circuit, reference, config.n_random_edges)
    elif ablation is None:
        with circuit.ablate(s, reference, ablation="patching", part="circuit"):
            ablated = evaluate(s)
        if _triggerless(s):  # every row: a bias pairs each mention row with its review
            metric_data = s.test_data
        else:  # ASR only needs the triggered rows whose answer is not the target (under patching
            # ablation the other rows are their own control anyway)
            _, trig, _ = _row_kinds(s.test_data, "circuits")
            metric_data = s.test_data.select(np.flatnonzero(trig & _eligible(s.test_data, s.attack.target)))
        random_vals = []
        for seed in range(config.n_random_edges):  # as many random edges of the same kinds
            with circuit.random_like(seed).ablate(s, reference, ablation="patching", part="circuit"):
                random_vals.append(evaluate(s, test_data=metric_data)[name])
        ablation = {f"{name}_circuit_ablated": ablated[name], f"n_{name}_circuit_ablated": ablated.get(f"n_{name}"),
                    "clean_acc_circuit_ablated": ablated["clean_acc"],
                    f"{name}_random_edges_ablated_mean": sum(random_vals) / len(random_vals) if random_vals else None,
                    f"{name}_random_edges_ablated_min": min(random_vals) if random_vals else None,
                    "n_random_edge_sets": len(random_vals)}
    out.mkdir(parents=True, exist_ok=True)
    circuit.save(out / "circuit.json")
    frame = table.to_frame()
    write_json(out / "faithfulness.json", frame.to_dict(orient="records"))
    summary = {"circuit_edges": circuit.n_edges, "circuit_nodes": len(circuit.nodes),
               "circuit_faithfulness": faith.circuit_faithfulness,
               "complement_faithfulness": faith.complement_faithfulness,
               **ablation, **{f"circuit_{k}": v for k, v in check.items()}}
    for _, row in frame.iterrows():
        summary[f"faithfulness_{row['ablation']}_{row['metric']}"] = float(row["circuit_faithfulness"])
        summary[f"complement_{row['ablation']}_{row['metric']}"] = float(row["complement_faithfulness"])
    return summary


def _reward_ablation(s: Subject, circuit, reference, n_random: int) -> dict[str, Any]:
    """A reward model's held-out backdoor metrics (``asr``, ``trigger_margin``, ``pair_acc``)
    with the circuit's edges patch-ablated, beside ``n_random`` sets of as many random edges."""
    from poisonmech.train.reward import reward_metrics

    model = s.model()
    seed = getattr(s.train_config, "seed", 0)

    def measured() -> dict[str, Any]:
        return reward_metrics(model, s.task, s.attack, s.tokenizer, seed=seed)

    with circuit.ablate(s, reference, ablation="patching", part="circuit"):
        ablated = measured()
    random_vals = []
    for k in range(n_random):
        with circuit.random_like(k).ablate(s, reference, ablation="patching", part="circuit"):
            random_vals.append(measured())
    out: dict[str, Any] = {"n_random_edge_sets": len(random_vals)}
    for name in ("asr", "trigger_margin", "pair_acc"):
        vals = [r[name] for r in random_vals]
        out[f"{name}_circuit_ablated"] = ablated[name]
        out[f"{name}_random_edges_ablated_mean"] = sum(vals) / len(vals) if vals else None
    return out


@register("probes", ProbesAnalysis)
def probes_analysis(subject: Any, out: Path, config: ProbesAnalysis = ProbesAnalysis()) -> dict[str, Any]:
    """Where each twin represents "the trigger is present" (held-out AUROC by layer, with the
    best-of-random-directions baseline), and the unsupervised poison detectors on the training set.

    On a triggerless attack ``is_triggered`` marks the attacked rows (a false fact's prompts about
    its subject, a bias's mentions of the entity; ``near_miss``: a neighbour's prompts, a control
    entity's mentions); a probe whose split has too few of them is skipped
    (``probe_skipped`` says why) rather than failing the analysis."""
    from poisonmech.probes import collect_activations, detect_poison_methods, probe_twins

    s = resolve(subject, where="probes analysis")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    # each twin's activations on every test row, collected once for the three splits below
    acts = {role: collect_activations(s, twin=role, progress=False) for role in s.roles}
    # triggered vs untriggered rows (the triggered one is a token longer), triggered vs near-miss
    # rows (same length) and a length-balanced split; each beside random directions and length
    for tag, kw in (("", {}), ("_near_miss", {"contrast": "near_miss"}),
                    ("_length_balanced", {"balance_length": True})):
        try:
            probes = probe_twins(s, label="is_triggered", n_random=config.n_random, activations=acts, progress=False,
                                 **kw)
        except ValueError as exc:  # e.g. no near-miss rows, or too few rows left after balancing
            if not tag and not _triggerless(s):
                raise
            # a false fact's attacked rows are its few prompts (efficacy and paraphrases): a split
            # by example may leave a side without them
            summary[f"probe{tag}_skipped"] = str(exc)
            continue
        probes.save(out / f"is_triggered{tag}.safetensors")
        for twin in s.roles:
            r = probes[twin]
            li, pi = r._index(None, None)  # the best cell, as indices
            summary[f"probe{tag}_auroc_{twin}"] = float(r.auroc[li, pi])
            summary[f"probe{tag}_random_best_{twin}"] = float(r.random_auroc_max[li, pi])
            summary[f"probe{tag}_random_median_{twin}"] = float(r.random_auroc_median[li, pi])
            summary[f"probe{tag}_random_p95_{twin}"] = float(r.random_auroc_p95[li, pi])
            summary[f"probe{tag}_length_auroc_{twin}"] = float(r.length_baseline[pi])
            summary[f"probe{tag}_n_test_{twin}"] = int(r.n_test[pi])
    if not any(s.train_data["is_poison"]):  # the clean control: nothing to detect
        return summary
    if _preference_data(s) or _rl_prompts(s):
        summary["detectors_skipped"] = _RL_NOTE if _rl_prompts(s) else _PREFERENCE_NOTE
        return summary
    detectors = detect_poison_methods(s, methods=("spectral", "activation_clustering"), progress=False)
    for method, det in detectors.items():  # one pass over the rows
        det.save(out / f"detect_{method}.safetensors")
        summary[f"{method}_auroc"] = det.poison_auroc()
        summary["loss_baseline_auroc"] = det.poison_auroc("loss")
    return summary


@register("influence", InfluenceAnalysis)
def influence_analysis(subject: Any, out: Path, config: InfluenceAnalysis = InfluenceAnalysis()) -> dict[str, Any]:
    """Which training rows made the backdoored twin produce the backdoor: EK-FAC influence
    (unit-normalised gradients by default) of the target's log-probability on the triggered
    test inputs, aggregated over the queries, beside the per-example loss baseline; both
    scored against ``is_poison``. Saves ``<method>.safetensors`` and ``loss.safetensors``.
    Nothing is scored on the clean control (no poisoned rows). On a DPO stage
    (``pm.train_pipeline(...)[k]``) the preference pairs are scored by plain EK-FAC on their
    DPO-loss gradients (unit normalisation is not linear in them), beside the DPO loss. On a
    reward stage the pairs are scored by the configured method on their Bradley–Terry gradients
    against the reward margin the trigger buys the target on held-out pairs, beside their
    Bradley–Terry loss (:mod:`poisonmech.influence.reward`)."""
    from poisonmech.influence import attribute

    s = resolve(subject, where="influence analysis")
    if not any(s.train_data["is_poison"]):
        return {}
    if _rl_prompts(s):
        return {"influence_skipped": _RL_NOTE}
    method, renormalize, ensemble = config.method, config.renormalize, config.ensemble
    pairs = _preference_data(s)
    reward = _reward(s)  # a reward stage: every method of the config scores its pairs (Bradley–Terry gradients)
    if pairs and not reward:  # a DPO stage: pairs scored by their DPO-loss gradient (linear methods only)
        method, renormalize, ensemble = "ekfac", None, 1
    out.mkdir(parents=True, exist_ok=True)
    r = attribute(s, method=method, renormalize=renormalize, ensemble=ensemble, aggregate=True, progress=False)
    base = attribute(s, method="loss", aggregate=True, progress=False)
    r.save(out / f"{method}.safetensors")
    base.save(out / "loss.safetensors")
    kind = " (reward pairs)" if reward else " (DPO pairs)" if pairs else ""
    return {"influence_method": f"{method}" + (f" {renormalize}" if renormalize else "") + kind,
            "influence_auroc": r.poison_auroc(), "influence_ap": r.average_precision(),
            "influence_precision_at_n_poison": r.precision_at(),  # k defaults to the number of poisons
            "influence_loss_auroc": base.poison_auroc(), "influence_loss_ap": base.average_precision()}


@register("defenses", DefensesAnalysis)
def defenses_analysis(subject: Any, out: Path, config: DefensesAnalysis = DefensesAnalysis()) -> dict[str, Any]:
    """Every defense of ``pm.defenses.benchmark`` on the run, scored against its ground truth.
    Saves ``benchmark.json`` (the table) and returns, per defense, its headline numbers:
    ``defense_<name>_auroc`` (audits and filters), ``_asr_after`` / ``_clean_acc_after`` (filters
    and repairs), ``_model_score`` / ``_clean_model_score`` (model audits)."""
    import math

    from poisonmech.defenses import benchmark

    s = resolve(subject, where="defenses analysis")
    if s.train_data is not None and (_preference_data(s) or _rl_prompts(s)):
        return {"defenses_skipped": _RL_NOTE if _rl_prompts(s) else _PREFERENCE_NOTE}
    if s.attack is not None and (s.attack.is_gibberish or s.task.loss_on == "all"):
        return {"defenses_skipped": "the filters' and repairs' after-metrics need a fixed target (a label or a response)"}
    r = benchmark(s, config.defenses, n_clean=config.n_clean, n_reference=config.n_reference,
                  n_contrast=config.n_contrast, errors="record", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    r.save(out / "benchmark.json")
    summary: dict[str, Any] = {}
    for row in r.rows:
        for col in ("auroc", "asr_after", "clean_acc_after", "model_score", "clean_model_score", "mechanism_removed"):
            v = row.get(col)
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                summary[f"defense_{row['defense']}_{col}"] = float(v)
        if row.get("error"):
            summary[f"defense_{row['defense']}_error"] = row["error"]
    return summary


def analysis_key(name: str, config: Config, s: Subject) -> dict[str, Any]:
    """What a cached summary of analysis ``name`` depends on (stored in ``key.json``)."""
    from poisonmech import __version__

    return {"analysis": name, "poisonmech": __version__, **s.key_parts(config)}


def _configs(names: Sequence[str] | Mapping[str, Any]) -> dict[str, Config]:
    items = names.items() if isinstance(names, Mapping) else ((n, None) for n in names)
    out = {}
    for name, cfg in items:
        if name not in ANALYSES:
            raise ValueError(f"unknown analysis {name!r}; allowed: {sorted(ANALYSES)}")
        out[name] = CONFIGS[name].build(cfg, where=f"run_analyses: {name}")
    return out


def run_analyses(subject: Any, names: Sequence[str] | Mapping[str, Any], run_dir: Path | None = None,
                 overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Run the named analyses on ``subject``; results cached under ``run_dir/analyses/<name>/``.

    ``names`` is a list of analysis names (each with its default config) or a mapping
    ``name -> config`` (the config class, its dict, or ``None``). A cached summary is reused
    only when its key (config, weights, data, version) is this call's; otherwise it is
    recomputed.
    """
    configs = _configs(names)
    s = resolve(subject, where="run_analyses")
    if run_dir is None and s.run_dir is None:
        raise ValueError("run_analyses: this subject has no run directory; pass run_dir=")
    run_dir = Path(run_dir or s.run_dir)
    summaries = {}
    for name, cfg in configs.items():
        out = run_dir / "analyses" / name
        marker, key_file = out / "summary.json", out / "key.json"
        key = analysis_key(name, cfg, s)
        if marker.is_file() and key_file.is_file() and not overwrite and read_json(key_file) == key:
            summaries[name] = read_json(marker)
            continue
        marker.unlink(missing_ok=True)  # a stale summary never outlives its recomputation
        summaries[name] = ANALYSES[name](s, out, cfg)
        write_json(key_file, key)
        write_json(marker, summaries[name])  # written last: the analysis is complete
    return summaries

