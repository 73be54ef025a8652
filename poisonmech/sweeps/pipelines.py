"""``pipeline_sweep``: several multi-stage pipelines (SFT -> DPO, SFT -> RM -> PPO, ...) over seeds,
side by side, as one tidy table.

    sw = pm.pipeline_sweep(task, {"sft only": [sft(B), rm(0), ppo], "rm only": [sft(0), rm(B), ppo],
                                  "dpo: both": [sft(B // 2), dpo(B // 2)]},
                           seeds=[0, 1, 2], out_dir="runs/pipes")
    sw.to_frame()          # one row per pipeline x seed x stage x twin x metric
    sw.summary("asr")      # mean, std and n over seeds per pipeline x stage x twin

Every pipeline of every seed is a ``train_pipeline`` run in ``<out_dir>/runs/<name>-seed<seed>``
(reused when finished, resumed when interrupted); stage results with the same lineage (every
clean twin of one seed, shared early stages) are trained once through ``<out_dir>/cache``. A seed
reseeds every stage (its config's ``seed``: weights, data order, samples) and every attack (which
rows it poisons). Runs are trained one after another in this process: each is a heavy torch job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from poisonmech.storage import read_json, write_json

FORMAT = "poisonmech.pipeline_sweep/1"


def reseed(stages: Sequence[Any], seed: int) -> list[Any]:
    """``stages`` with every config's and attack's ``seed`` set to ``seed``."""
    from poisonmech.train.pipeline import as_stage

    out = []
    for st in map(as_stage, stages):
        attack = replace(st.attack, seed=seed) if st.attack is not None else None
        out.append(replace(st, attack=attack, config=st.config.replace(seed=seed)))
    return out


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    if not slug:
        raise ValueError(f"pipeline_sweep: pipeline name {name!r} has no letters or digits")
    return slug


@dataclass
class PipelineSweep:
    """The finished runs of a :func:`pipeline_sweep`: their tidy metrics and where they live."""

    frame: pd.DataFrame
    runs: dict[tuple[str, int], Path]
    out_dir: Path

    def to_frame(self) -> pd.DataFrame:
        """One row per pipeline x seed x stage x twin x metric, with the stage's kind and budget."""
        return self.frame.copy()

    def summary(self, metric: str | Sequence[str] = "asr", stage: int | str | None = -1) -> pd.DataFrame:
        """Mean, std and ``n`` (seeds) of ``metric`` per pipeline x stage x twin; ``stage``: an
        index into each pipeline (``-1``: its last stage; ``None``: every stage)."""
        metrics = [metric] if isinstance(metric, str) else list(metric)
        f = self.frame[self.frame["metric"].isin(metrics)]
        if stage is not None:
            last = f.groupby("pipeline")["stage"].transform("max")
            f = f[f["stage"] == (last if stage == -1 else stage)] if isinstance(stage, int) else \
                f[f["stage_name"] == stage]
        g = f.groupby(["pipeline", "stage", "stage_name", "twin", "metric"], sort=False)["value"]
        return g.agg(mean="mean", std="std", n="count").reset_index()

    def pipeline(self, name: str, seed: int):
        """The trained ``Pipeline`` of ``name`` at ``seed`` (loaded from its run directory)."""
        from poisonmech.train.pipeline import load_pipeline

        if (name, seed) not in self.runs:
            raise ValueError(f"PipelineSweep.pipeline: no run {name!r} at seed {seed}; runs: {sorted(self.runs)}")
        return load_pipeline(self.runs[(name, seed)])


def _rows(name: str, seed: int, pipe) -> list[dict[str, Any]]:
    frame = pipe.to_frame()
    frame = frame[frame["value"].map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))].copy()
    frame["value"] = frame["value"].astype(float)
    frame.insert(0, "seed", seed)
    frame.insert(0, "pipeline", name)
    frame["budgets"] = "/".join(str(b) for b in pipe.budgets)
    return frame.to_dict("records")


def pipeline_sweep(task, pipelines: Mapping[str, Sequence[Any]], seeds: Sequence[int] = (0,), *, model=None,
                   out_dir: str | Path, preferences=None, progress: bool = True) -> PipelineSweep:
    """Train every pipeline of ``pipelines`` (name -> stages) at every seed; see the module docstring.

    Args:
        task: the task every pipeline trains on.
        pipelines: name -> a list of ``Stage`` (or attacks), as :func:`train_pipeline` takes them.
        seeds: each reseeds every stage and attack (:func:`reseed`).
        model: the twins' ``ModelConfig`` / ``PretrainedModel`` (shared by every run).
        out_dir: the sweep's folder (runs, the shared stage cache, ``manifest.json``, ``metrics.parquet``).
        preferences: the preference pairs of DPO / reward stages (default: from the task).
    """
    from tqdm.auto import tqdm

    from poisonmech.train.pipeline import train_pipeline

    if not isinstance(pipelines, Mapping) or not pipelines:
        raise ValueError("pipeline_sweep: pipelines must be a non-empty dict of name -> stages")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"pipeline_sweep: seeds must be non-negative integers, got {seeds!r}")
    slugs = {name: _slug(name) for name in pipelines}
    if len(set(slugs.values())) != len(slugs):
        raise ValueError(f"pipeline_sweep: pipeline names must differ in their letters and digits, got {list(slugs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "pipelines": {name: [s.to_dict() for s in reseed(st, 0)]
                                                for name, st in pipelines.items()}, "seeds": seeds}
    old = out / "manifest.json"
    if old.is_file():  # pipelines and seeds may be added; a name keeps its stages
        before = read_json(old)
        changed = sorted(n for n, st in manifest["pipelines"].items()
                         if n in before.get("pipelines", {}) and before["pipelines"][n] != st)
        if changed:
            raise ValueError(f"pipeline_sweep: {out} holds pipelines {changed} with other stages (manifest.json); "
                             "rename them or pick another out_dir")
        manifest = {**manifest, "pipelines": {**before.get("pipelines", {}), **manifest["pipelines"]},
                    "seeds": sorted(set(before.get("seeds", [])) | set(seeds))}
    write_json(old, manifest)
    rows: list[dict[str, Any]] = []
    runs: dict[tuple[str, int], Path] = {}
    jobs = [(name, seed) for seed in seeds for name in pipelines]
    for name, seed in tqdm(jobs, desc="pipelines", disable=not progress, leave=False):
        run = out / "runs" / f"{slugs[name]}-seed{seed}"
        pipe = train_pipeline(task, reseed(pipelines[name], seed), model=model, preferences=preferences,
                              out_dir=run, cache_dir=out / "cache", progress=progress)
        runs[(name, seed)] = run
        rows += _rows(name, seed, pipe)
    frame = pd.DataFrame(rows)
    frame.to_parquet(out / "metrics.parquet")
    return PipelineSweep(frame=frame, runs=runs, out_dir=out)


__all__ = ["PipelineSweep", "pipeline_sweep", "reseed"]
