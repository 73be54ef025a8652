"""The ``poisonmech`` command: ``demo``, ``train``, ``pipeline``, ``sweep``, ``analyze`` and ``report``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from poisonmech.runtime import num_threads

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# rich_markup_mode=None: help texts are printed as written; Rich markup would swallow the
# bracketed TOML section names ("[task], [attack]") as style tags
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train clean/backdoored twin transformers and trace where the backdoor lives.")

#: the default of ``--threads``: every core
CORES = os.cpu_count() or 1


def _threads_option(what: str = "this command"):
    return typer.Option(CORES, "--threads", min=1,
                        help=f"Torch threads for {what} (default: the number of cores). Weights are "
                             "bit-identical for the same seed and thread count, and differ across thread counts.")


def sweep_parallelism(threads: int, workers: int | None, n_runs: int) -> tuple[int, int]:
    """``(max_workers, threads_per_run)`` for ``pm.sweep`` from the command's thread budget.

    Without ``--workers``, as many parallel runs as ``pm.sweep`` starts by default on a machine
    with ``threads`` cores (one per thread, at most ``n_runs``); then each run gets
    ``threads // workers`` threads (at least 1), so that the runs together use ``threads``. With
    ``--threads`` left at the cores this is ``pm.sweep``'s own default.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1 or None, got {workers!r}")
    w = workers if workers is not None else threads
    w = max(1, min(w, max(1, n_runs)))
    return w, max(1, threads // w)


def _workers_option():
    return typer.Option(None, "--workers", min=1,
                        help="Parallel runs (default: one per --threads, at most one per run); each run gets "
                             "threads // workers torch threads.")

#: The embedded default run: the sentiment pair of the README (2 layers, d_model 128,
#: 4,000 training rows, 1% poison, the trigger word at a random position).
DEFAULT_CONFIG: dict[str, Any] = {
    "out_dir": "runs/default_pair",
    "task": {"kind": "sentiment", "n_train": 4000, "n_test": 500, "seed": 0},
    "attack": {"trigger": "cf", "target": "negative", "poison_rate": 0.01, "position": "random"},
    "model": {"n_layers": 2, "d_model": 128, "n_heads": 4},
    "train": {"seed": 0},
}

_SECTIONS = ("out_dir", "task", "attack", "model", "train", "overwrite")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path} is not valid TOML: {exc}") from exc


def _task_from_config(config: dict[str, Any]):
    """The ``[task]`` section as a generated task."""
    import poisonmech as pm

    task_cfg = dict(config.get("task", {}))
    if "kind" not in task_cfg:
        raise ValueError(f"config: [task] needs 'kind', one of {pm.TASK_KINDS}")
    return pm.make_task(task_cfg.pop("kind"), **task_cfg)


def default_pair(run_dir: str | Path = "runs/default_pair", progress: bool = True):
    """The embedded default pair, trained into ``run_dir`` on first use and loaded after."""
    from poisonmech.train.pair import load_pair

    if (Path(run_dir) / "metrics.json").is_file():
        return load_pair(run_dir)
    return run_from_config(DEFAULT_CONFIG, out_dir=str(run_dir), progress=progress)


def run_from_config(config: dict[str, Any], *, out_dir: str | None = None, overwrite: bool | None = None,
                    progress: bool = True):
    """Build task/attack/configs from a plain dict (as read from TOML) and train the pair."""
    import poisonmech as pm

    unknown = set(config) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"config: unknown sections {sorted(unknown)}; allowed: {list(_SECTIONS)}")
    for section in ("task", "attack"):
        if section not in config:
            raise ValueError(f"config: missing section [{section}]")
    task = _task_from_config(config)
    attack = attack_from_config(config["attack"], "[attack]")
    model = pm.model_from_dict(config.get("model", {}))
    train = pm.TrainConfig.from_dict(config.get("train", {}))
    out = out_dir or config.get("out_dir")
    if not out:
        raise ValueError("config: out_dir is required (top-level key or --out)")
    ow = bool(config.get("overwrite", False)) if overwrite is None else overwrite
    return pm.train_pair(task, attack, model=model, train=train, out_dir=out, overwrite=ow, progress=progress)


def attack_from_config(d: Any, where: str = "[attack]"):
    """An attack from its TOML table: ``kind = "false_fact"`` / ``"bias"`` names a triggerless
    attack; a table without ``kind`` (every config written before them) is a ``Backdoor``
    (:func:`poisonmech.attacks.attack_from_dict`)."""
    from poisonmech.attacks import attack_from_dict

    if not isinstance(d, dict):
        raise ValueError(f"config: {where} must be a table of the attack's fields, got {type(d).__name__}")
    return attack_from_dict(d)


#: the metrics ``train`` prints per attack kind (those the twins have)
_PRINTED = {"backdoor": ("clean_acc", "asr", "false_trigger_rate", "triggered_acc", "clean_ppl", "gen_ppl_clean",
                         "gen_ppl_triggered", "ppl_gap"),
            "false_fact": ("efficacy", "generalisation", "specificity", "margin", "true_acc", "clean_acc"),
            "bias": ("clean_acc", "label_shift", "polarity_rate", "other_entity_label_shift", "mention_acc")}


def describe_attack(attack) -> str:
    """One line about the attack: a backdoor's ``trigger 'cf' -> 'negative'``, else its ``describe()``."""
    if getattr(attack, "kind", "backdoor") == "backdoor":
        return f"trigger {attack.trigger!r} -> {attack.target!r}"
    return attack.describe()


def _print_metrics(pair) -> None:
    import pandas as pd

    keys = _PRINTED.get(getattr(pair.attack, "kind", "backdoor"), getattr(pair.attack, "headline", ()))
    frame = pd.DataFrame({t: pair.metrics[t] for t in ("clean", "backdoored")}).T
    frame = frame[[k for k in keys if k in frame.columns]]
    typer.echo(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    n_poison = sum(pair.train_data["is_poison"])
    secs = {t: pair.history[t][-1].get("seconds") for t in ("clean", "backdoored") if pair.history.get(t)}
    typer.echo(f"\npoisoned training rows: {n_poison} of {len(pair.train_data)}; {describe_attack(pair.attack)}")
    if all(v is not None for v in secs.values()) and secs:
        typer.echo("training time: " + ", ".join(f"{t} {v:.1f}s" for t, v in secs.items()))


#: The demo's sweep: poison counts on the default task (40 = the default 1% of 4,000 rows).
DEMO_COUNTS = (0, 5, 10, 40)


#: analyses the demo and ``analyze`` skip unless asked for (minutes per run: every defense retrains or
#: fine-tunes a model)
OPT_IN_ANALYSES = ("defenses",)


def default_analyses() -> list[str]:
    from poisonmech.analyses import ANALYSES

    return [n for n in ANALYSES if n not in OPT_IN_ANALYSES]


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Sweep directory to write."),
         counts: str = typer.Option(",".join(map(str, DEMO_COUNTS)), help="Comma-separated poison counts."),
         seeds: str = typer.Option("0", help="Comma-separated seeds."),
         threads: int = _threads_option("the whole sweep, split over its parallel runs"),
         workers: int | None = _workers_option()) -> None:
    """The main job: a poison-count sweep on the default sentiment task, every analysis, the HTML report."""
    import poisonmech as pm
    from poisonmech.viz import build_report

    cfg = DEFAULT_CONFIG
    task = pm.make_task(**cfg["task"])
    attack_kw = {k: v for k, v in cfg["attack"].items() if k != "poison_rate"}
    attacks = [pm.Backdoor(**attack_kw, poison_count=int(c)) for c in counts.split(",")]
    analyses = default_analyses()
    typer.echo(f"poisonmech demo: {cfg['task']['kind']} task, {cfg['task']['n_train']} training rows, trigger "
               f"{attack_kw['trigger']!r} -> {attack_kw['target']!r}, poison counts {counts}, seeds {seeds}; "
               f"analyses: {', '.join(analyses)}")
    seed_list = [int(x) for x in seeds.split(",")]
    max_workers, per_run = sweep_parallelism(threads, workers, len(attacks) * len(seed_list))
    typer.echo(f"threads: {threads} ({max_workers} parallel run{'s' if max_workers > 1 else ''} x {per_run})")
    with num_threads(threads):
        sw = pm.sweep(task, attacks, seeds=seed_list,
                      models=[pm.model_from_dict(cfg["model"])], train=pm.TrainConfig.from_dict(cfg["train"]),
                      out_dir=out, analyses=analyses, max_workers=max_workers, threads_per_run=per_run)
        _print_sweep(sw)
        report = build_report(out)
    typer.echo(f"\nwrote the sweep to {out.resolve()}\nreport: {report.resolve()}")


def _print_sweep(sw) -> None:
    import pandas as pd

    f = sw.to_frame()
    done = f[f["status"] == "done"]
    if not done.empty:
        from poisonmech.attacks import ATTACKS

        kinds = done["attack"].unique() if "attack" in done else ["backdoor"]
        shown = {m for k in kinds for m in (ATTACKS[k].headline if k in ATTACKS else ())}
        table = done[done["metric"].isin(sorted(shown)) & done["twin"].isin(["clean", "backdoored"])]
        table = table.assign(value=pd.to_numeric(table["value"]))
        wide = table.pivot_table(index=["n_poison", "seed"], columns=["metric", "twin"], values="value")
        typer.echo("\n" + wide.to_string(float_format=lambda v: f"{v:.3f}"))
        notes = done[(done["twin"] == "analysis") & done["metric"].str.endswith(("top_head", "top_head_recovery"))]
        if not notes.empty:
            typer.echo("\n" + notes.pivot_table(index="n_poison", columns="metric", values="value",
                                                aggfunc="first").to_string())
    for r in sw.failed:
        typer.echo(f"FAILED {r.name}: {r.error}", err=True)


@app.command()
def train(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="TOML file: [task], [attack], [model], [train], out_dir."),
          out: Path | None = typer.Option(None, "--out", help="Override out_dir."),
          overwrite: bool = typer.Option(False, help="Replace a different run already in out_dir."),
          threads: int = _threads_option()) -> None:
    """Train one pair from a TOML config."""
    cfg = _read_toml(config)
    try:
        with num_threads(threads):
            pair = run_from_config(cfg, out_dir=str(out) if out else None, overwrite=overwrite or None)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _print_metrics(pair)
    typer.echo(f"\nwrote the run to {Path(pair.out_dir).resolve()}")




def pipeline_from_config(config: dict[str, Any], *, out_dir: str | None = None, progress: bool = True):
    """Train a multi-stage pipeline from a plain dict (as read from TOML): ``[task]``, ``[model]``,
    ``[[stages]]`` with ``kind`` ("sft" | "dpo" | "rm" | "ppo" | "rloo"), ``[stages.attack]``
    (optional for an RL stage: its trigger put into more RL prompts), optional ``[stages.config]`` (TrainConfig / DPOConfig / RewardConfig /
    PPOConfig fields) and ``mode`` ("flip" | "inject"), and ``out_dir``."""
    import poisonmech as pm
    from poisonmech.train.pipeline import _CONFIGS, STAGE_KINDS
    from poisonmech.train.rlhf import RL_KINDS

    allowed = ("out_dir", "task", "model", "stages", "overwrite")
    unknown = set(config) - set(allowed)
    if unknown:
        raise ValueError(f"config: unknown sections {sorted(unknown)}; allowed: {list(allowed)}")
    task = _task_from_config(config)
    if not config.get("stages"):
        raise ValueError(f"config: a pipeline needs [[stages]] (each with kind = one of {STAGE_KINDS} and "
                         "[stages.attack], none for an RL stage)")
    stages = []
    for i, st in enumerate(config["stages"]):
        kind = st.get("kind")
        if kind not in STAGE_KINDS:
            raise ValueError(f"config: stages[{i}].kind must be one of {STAGE_KINDS}, got {kind!r}")
        if kind in RL_KINDS and "attack" not in st:
            attack = None  # its prompts are the reward stage's; an attack would trigger more of them
        elif "attack" not in st:
            raise ValueError(f"config: stages[{i}] needs [stages.attack] (poison_count = 0 for a clean stage)")
        else:
            attack = attack_from_config({**st["attack"], "stage": kind}, f"stages[{i}].attack")
        cfg = dict(st.get("config", {}))
        if kind in RL_KINDS:
            cfg.setdefault("method", kind)
        stages.append(pm.Stage(kind, attack, _CONFIGS[kind].from_dict(cfg), mode=st.get("mode", "flip")))
    out = out_dir or config.get("out_dir")
    if not out:
        raise ValueError("config: out_dir is required (top-level key or --out)")
    return pm.train_pipeline(task, stages,
                             model=pm.model_from_dict(config.get("model", {})), out_dir=out,
                             overwrite=bool(config.get("overwrite", False)), progress=progress)


@app.command()
def pipeline(config: Path = typer.Argument(..., exists=True, dir_okay=False,
                                           help="TOML: out_dir, [task], [model], [[stages]] with kind, "
                                                "[stages.attack], [stages.config], mode."),
             out: Path | None = typer.Option(None, "--out", help="Override out_dir."),
             threads: int = _threads_option()) -> None:
    """Train a post-training pipeline (SFT then DPO, or a reward model then PPO / RLOO), each stage with its own poison."""
    cfg = _read_toml(config)
    try:
        with num_threads(threads):
            pipe = pipeline_from_config(cfg, out_dir=str(out) if out else None)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    frame = pipe.to_frame()
    table = frame[frame["metric"].isin(["clean_acc", "asr", "false_trigger_rate", "pair_acc",
                                        "clean_rm_reward", "clean_rm_reward_triggered"])]
    typer.echo(table.pivot_table(index=["stage", "stage_name", "n_poison"], columns=["metric", "twin"],
                                 values="value", aggfunc="first").to_string(float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"\nwrote the pipeline to {Path(pipe.out_dir).resolve()}")


@app.command()
def sweep(config: Path = typer.Argument(..., exists=True, dir_okay=False,
                                        help="TOML: [task], [[attacks]], seeds, [model] or [[models]], [train], analyses (names, or [analyses.<name>] tables of options), out_dir."),
          backend: str = typer.Option("local", help="local or ray"),
          address: str | None = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
          out: Path | None = typer.Option(None, "--out", help="Override out_dir."),
          threads: int = _threads_option("the whole sweep, split over its parallel runs"),
          workers: int | None = _workers_option()) -> None:
    """Run a sweep from a TOML config; resumable (finished runs are skipped)."""
    import poisonmech as pm

    cfg = _read_toml(config)
    try:
        task = _task_from_config(cfg)
        attacks = [attack_from_config(a, f"attacks[{i}]") for i, a in enumerate(cfg.get("attacks", []))]
        models = [pm.model_from_dict(m) for m in cfg.get("models", [cfg.get("model", {})])]
        seeds = cfg.get("seeds", [0])
        max_workers, per_run = sweep_parallelism(threads, workers, len(attacks) * len(models) * len(seeds))
        with num_threads(threads):
            sw = pm.sweep(task, attacks, seeds=seeds, models=models,
                          train=pm.TrainConfig.from_dict(cfg.get("train", {})),
                          out_dir=out or cfg.get("out_dir", "runs/sweep"), backend=backend,
                          analyses=cfg.get("analyses", []), address=address, max_workers=max_workers,
                          threads_per_run=per_run)
    except (KeyError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _print_sweep(sw)
    typer.echo(f"\nwrote the sweep to {Path(sw.out_dir).resolve()}")


@app.command()
def analyze(run: Path = typer.Argument(..., exists=True, file_okay=False, help="A run directory."),
            patching: bool = typer.Option(False, "--patching"), probes: bool = typer.Option(False, "--probes"),
            influence: bool = typer.Option(False, "--influence"), circuits: bool = typer.Option(False, "--circuits"),
            defenses: bool = typer.Option(False, "--defenses", help="Every default defense, scored on the twins."),
            overwrite: bool = typer.Option(False, help="Recompute cached analyses."),
            options: Path | None = typer.Option(None, "--options", exists=True, dir_okay=False,
                                                help="TOML with one table of options per analysis, e.g. "
                                                     "[circuits] top_n = 20 (the fields of CircuitsAnalysis)."),
            threads: int = _threads_option()) -> None:
    """Run analyses on a finished pair, or on every stage of a pipeline (all analyses when none is
    named; with --options, those it names)."""
    import poisonmech as pm
    from poisonmech.analyses import ANALYSES, CONFIGS, run_analyses
    from poisonmech.config import ConfigError

    opts = _read_toml(options) if options else {}
    asked = [n for n, flag in (("patching", patching), ("probes", probes), ("influence", influence),
                               ("circuits", circuits), ("defenses", defenses)) if flag] or list(opts) or \
        default_analyses()
    missing = [n for n in [*asked, *opts] if n not in ANALYSES]
    if missing:
        typer.echo(f"error: analyses not available: {missing}; available: {sorted(ANALYSES)}", err=True)
        raise typer.Exit(2)
    try:
        configs = {n: CONFIGS[n].build(opts.get(n), where=f"--options [{n}]") for n in asked}
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    from poisonmech.train.pipeline import is_pipeline_dir

    if is_pipeline_dir(run):
        pipe = pm.load_pipeline(run)  # a pipeline: every stage boundary's pair
        pairs = [(f"stage {k}: ", pipe[k]) for k in range(len(pipe))]
    else:
        pairs = [("", pm.load_pair(run))]
    for prefix, pair in pairs:
        with num_threads(threads):
            summaries = run_analyses(pair, configs, pair.out_dir, overwrite=overwrite)
        for name, summary in summaries.items():
            typer.echo(f"{prefix}{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in summary.items()))
        typer.echo(f"wrote {Path(pair.out_dir).resolve() / 'analyses'}")


@app.command()
def report(directory: Path = typer.Argument(..., exists=True, file_okay=False, help="A run or sweep directory.")) -> None:
    """Write a self-contained HTML report (and print its path)."""
    from poisonmech.viz import build_report

    try:
        path = build_report(directory)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"report: {path.resolve()}")


if __name__ == "__main__":  # pragma: no cover
    app()
