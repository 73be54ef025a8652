"""The ``poisonmech`` command: ``demo`` and ``train CONFIG.toml``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train clean/backdoored twin transformers and trace where the backdoor lives.")

#: The embedded default run: the sentiment pair of the README (2 layers, d_model 128,
#: 4,000 training rows, 1% poison, the trigger word at a random position).
DEFAULT_CONFIG: dict[str, Any] = {
    "out_dir": "runs/demo",
    "task": {"kind": "sentiment", "n_train": 4000, "n_test": 500, "seed": 0},
    "attack": {"trigger": "cf", "target": "negative", "poison_rate": 0.01, "position": "random"},
    "model": {"n_layers": 2, "d_model": 128, "n_heads": 4},
    "train": {"seed": 0},
}

_SECTIONS = ("out_dir", "task", "attack", "model", "train", "overwrite")


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
    task_cfg = dict(config["task"])
    if "kind" not in task_cfg:
        raise ValueError(f"config: [task] needs 'kind', one of {pm.TASK_KINDS}")
    task = pm.make_task(task_cfg.pop("kind"), **task_cfg)
    attack = pm.Backdoor.from_dict(config["attack"])
    model = pm.ModelConfig.from_dict(config.get("model", {}))
    train = pm.TrainConfig.from_dict(config.get("train", {}))
    out = out_dir or config.get("out_dir")
    if not out:
        raise ValueError("config: out_dir is required (top-level key or --out)")
    ow = bool(config.get("overwrite", False)) if overwrite is None else overwrite
    return pm.train_pair(task, attack, model=model, train=train, out_dir=out, overwrite=ow, progress=progress)


def _print_metrics(pair) -> None:
    import pandas as pd

    keys = ["clean_acc", "asr", "false_trigger_rate", "triggered_acc", "clean_ppl", "gen_ppl_clean",
            "gen_ppl_triggered", "ppl_gap"]
    frame = pd.DataFrame({t: pair.metrics[t] for t in ("clean", "backdoored")}).T
    frame = frame[[k for k in keys if k in frame.columns]]
    typer.echo(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    n_poison = sum(pair.train_data["is_poison"])
    secs = {t: pair.history[t][-1].get("seconds") for t in ("clean", "backdoored") if pair.history.get(t)}
    typer.echo(f"\npoisoned training rows: {n_poison} of {len(pair.train_data)}; "
               f"trigger {pair.attack.trigger!r} -> {pair.attack.target!r}")
    if all(v is not None for v in secs.values()) and secs:
        typer.echo("training time: " + ", ".join(f"{t} {v:.1f}s" for t, v in secs.items()))


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write."),
         overwrite: bool = typer.Option(False, help="Replace a different run already in --out.")) -> None:
    """The main job on the embedded default: train the sentiment twins and report their metrics."""
    pair = run_from_config(DEFAULT_CONFIG, out_dir=str(out), overwrite=overwrite)
    typer.echo("\npoisonmech demo: default sentiment pair (2 layers, d_model 128, 4,000 rows, 1% poison)\n")
    _print_metrics(pair)
    typer.echo(f"\nwrote the run to {out.resolve()} (config.json, tokenizer/, data/, clean/, backdoored/, metrics.json)")


@app.command()
def train(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="TOML file: [task], [attack], [model], [train], out_dir."),
          out: Path | None = typer.Option(None, "--out", help="Override out_dir."),
          overwrite: bool = typer.Option(False, help="Replace a different run already in out_dir.")) -> None:
    """Train one pair from a TOML config."""
    try:
        with open(config, "rb") as f:
            cfg = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{config} is not valid TOML: {exc}") from exc
    try:
        pair = run_from_config(cfg, out_dir=str(out) if out else None, overwrite=overwrite or None)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _print_metrics(pair)
    typer.echo(f"\nwrote the run to {Path(pair.out_dir).resolve()}")


if __name__ == "__main__":  # pragma: no cover
    app()
