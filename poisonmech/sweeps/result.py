"""``Sweep``: the runs of a sweep directory as a tidy table, a figure and a result file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from poisonmech.results import Result
from poisonmech.storage import read_json
from poisonmech.sweeps.spec import DONE, FAILED, RunSpec, attack_label, run_state


@dataclass(frozen=True)
class RunRecord:
    name: str
    spec: RunSpec
    status: str  # "done" | "failed" | "pending"
    metrics: dict[str, dict[str, Any]]
    analyses: dict[str, dict[str, Any]]
    error: str | None
    n_poison: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec.to_dict(), "status": self.status, "metrics": self.metrics,
                "analyses": self.analyses, "error": self.error, "n_poison": self.n_poison}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        return cls(name=d["name"], spec=RunSpec.from_dict(d["spec"]), status=d["status"], metrics=d.get("metrics", {}),
                   analyses=d.get("analyses", {}), error=d.get("error"), n_poison=d.get("n_poison"))

    def __repr__(self) -> str:
        asr = (self.metrics.get("backdoored") or {}).get("asr")
        extra = f", backdoored asr={asr:.3f}" if isinstance(asr, float) else ""
        return f"RunRecord({self.name!r}, {self.status}, n_poison={self.n_poison}{extra})"


def _joined(value: Any) -> Any:
    return " + ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _config_columns(spec: RunSpec) -> dict[str, Any]:
    """The run's configuration as table columns. ``attack`` is the attack's kind (``"backdoor"``,
    ``"false_fact"``, ``"bias"``); ``trigger`` a backdoor's trigger(s), or the label of a
    triggerless attack (:func:`~poisonmech.sweeps.spec.attack_label`: a false fact's subject and
    relation, a bias's entity and polarity); ``target`` the backdoor's or false fact's target
    (several facts joined by ``" + "``) or a bias's polarity."""
    a, m, t = spec.attack, spec.model, spec.task
    kind = a.get("kind", "backdoor")
    trig = _joined(a["trigger"]) if kind == "backdoor" else attack_label(a)
    return {"task": t["kind"], "attack": kind, "n_train": t.get("n_train"), "trigger": trig,
            "target": _joined(a.get("target", a.get("polarity"))),
            "poison_count": a.get("poison_count"), "poison_rate": a.get("poison_rate"),
            "position": a.get("position"), "placement": a.get("placement", "spread"), "n_layers": m["n_layers"],
            "d_model": m["d_model"], "continue_clean": spec.train.get("continue_clean", 0),
            "seed": spec.train.get("seed", 0)}


@dataclass(frozen=True)
class Sweep(Result):
    """The runs of a sweep (``pm.sweep`` / :func:`load_sweep`): each run's spec, status, metrics
    and analysis summaries. ``to_frame()`` (tidy), ``metric_frame()`` (wide), ``plot()`` (a
    metric against poison count), ``save(path)`` / ``Sweep.load(path)`` (one JSON file, its
    format checked; ``load`` also reads a sweep directory), ``pair(name)`` (a run's twins)."""

    kind = "sweep_result"  # "poisonmech.sweep/1" is the sweep directory's manifest (sweep.json)
    version = 1

    out_dir: Path
    runs: tuple[RunRecord, ...]

    def __repr__(self) -> str:
        states = {}
        for r in self.runs:
            states[r.status] = states.get(r.status, 0) + 1
        return (f"Sweep({str(self.out_dir)!r}, {len(self.runs)} runs: "
                + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")")

    def to_frame(self) -> pd.DataFrame:
        """One row per run x twin x metric (analyses' scalar summaries as twin ``"analysis"``),
        with the config columns; failed and pending runs appear once with their status."""
        rows = []
        for r in self.runs:
            base = {"run": r.name, "status": r.status, **_config_columns(r.spec),
                    "n_poison": r.n_poison if r.n_poison is not None else r.spec.attack.get("poison_count")}
            if r.status != "done":
                rows.append({**base, "twin": None, "metric": "error" if r.error else None, "value": r.error})
                continue
            for twin, metrics in r.metrics.items():
                for k, v in metrics.items():
                    rows.append({**base, "twin": twin, "metric": k, "value": v})
            for summary in r.analyses.values():
                for k, v in summary.items():
                    rows.append({**base, "twin": "analysis", "metric": k, "value": v})
        return pd.DataFrame(rows)

    def metric_frame(self, metric: str = "asr") -> pd.DataFrame:
        """Wide per-run table of one metric: a column per twin (numeric values only)."""
        f = self.to_frame()
        f = f[(f["metric"] == metric) & f["twin"].isin(["clean", "backdoored"])]
        if f.empty:
            return f
        f = f.assign(value=pd.to_numeric(f["value"], errors="coerce"))
        wide = f.pivot(index="run", columns="twin", values="value").reset_index()
        wide.columns.name = None
        keys = ["run", "task", "n_train", "trigger", "poison_count", "poison_rate", "n_poison", "n_layers",
                "d_model", "seed"]
        return f[keys].drop_duplicates("run").merge(wide, on="run")

    def plot(self, metric: str = "asr", group: str | None = None, title: str | None = None):
        """``metric`` (a twin metric such as ``"asr"`` or ``"clean_acc"``) against poison count, one
        line per twin (and per value of the config column ``group``, e.g. ``"d_model"``), mean
        and 95% band over seeds: a plotly Figure."""
        from poisonmech.viz.figures import metric_vs_count, style

        frame = self.to_frame()
        if frame.empty or "metric" not in frame or not (frame["metric"] == metric).any():
            import plotly.graph_objects as go

            return style(go.Figure(), title or f"{metric}: no finished run of this sweep has it")
        return metric_vs_count(frame, metric, group=group, title=title)

    def save(self, path: str | Path) -> Path:
        """Write the sweep's records (specs, statuses, metrics, analysis summaries) as one JSON file."""
        return self._write(path, {"out_dir": str(self.out_dir), "runs": [r.to_dict() for r in self.runs]})

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        """A sweep saved by :meth:`save`, or a sweep directory (or its ``sweep.json``) as :func:`load_sweep` reads it.
        A file of another kind or of a newer version is a :class:`~poisonmech.results.ResultFormatError`."""
        path = Path(path)
        if path.is_dir():
            return load_sweep(path)
        if path.name == "sweep.json" and (path.parent / "runs").is_dir():
            return load_sweep(path.parent)
        meta, _ = cls._read(path)
        return cls(out_dir=Path(meta["out_dir"]), runs=tuple(RunRecord.from_dict(r) for r in meta["runs"]))

    def pair(self, name: str):
        from poisonmech.train.pair import load_pair

        return load_pair(self.out_dir / "runs" / name)

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "failed"]


def load_sweep(out_dir: str | Path) -> Sweep:
    """Read a sweep directory (its ``sweep.json`` manifest and every run's completion files)."""
    out = Path(out_dir)
    manifest = out / "sweep.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{out} holds no sweep (missing {manifest.name})")
    runs = []
    for name, spec_dict in sorted(read_json(manifest)["runs"].items()):
        spec, run_dir = RunSpec.from_dict(spec_dict), out / "runs" / name
        state = run_state(run_dir)
        rec: dict[str, Any] = {}
        if state == "done":
            rec = read_json(run_dir / DONE)
        elif state == "failed":
            rec = read_json(run_dir / FAILED)
        runs.append(RunRecord(name=name, spec=spec, status=state, metrics=rec.get("metrics", {}),
                              analyses=rec.get("analyses", {}), error=rec.get("error"), n_poison=rec.get("n_poison")))
    return Sweep(out_dir=out, runs=tuple(runs))
