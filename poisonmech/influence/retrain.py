"""Retraining counterfactuals: ``train_on_subset`` (a run's model retrained on some of its rows)
and ``retrain_without``, the counterfactual check of an attribution.

``retrain_without`` retrains the backdoored twin without the given training rows — same
initial weights, same ``TrainConfig`` (seed, schedule, batch size), the remaining rows in
the order the seed gives — and reports its attack success rate beside the same retraining
without as many *random* rows. If an attribution found the poison, removing its top rows
should drop the ASR far more than removing random ones.

Both need a run (a Pair from ``pm.train_pair``, or its run directory): its task, attack,
``ModelConfig`` and ``TrainConfig`` say how the model was trained. A bare model, a pipeline
stage (which starts from the previous stage's weights) and a before/after view are refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from poisonmech.config import Config, check_number, takes_config
from poisonmech.encoding import encode
from poisonmech.influence.preference import is_preference_data
from poisonmech.metrics import evaluate
from poisonmech.results import Result
from poisonmech.storage import read_json, write_json
from poisonmech.subject import TWIN_ROLES, Subject, resolve

#: what a subject must carry for its training to be repeated
RUN_PARTS = ("task", "attack", "model_config", "train_config")


def retraining_subject(subject: Any, twin: str | None, where: str) -> tuple[Subject, str]:
    """``(subject, role)`` of a run whose training ``where`` can repeat; a clear error otherwise."""
    s = resolve(subject, where=where)
    missing = [p for p in RUN_PARTS if getattr(s, p) is None]
    if missing:
        raise ValueError(f"{where} retrains the model, which needs a run: its {', '.join(RUN_PARTS)}; this subject "
                         f"({s.kind}) lacks {', '.join(missing)}. Pass a Pair from pm.train_pair (or its run "
                         "directory)")
    if s.kind in ("stage", "between"):
        raise ValueError(f"{where}: pipeline stages are not supported (a stage after the first starts from the "
                         "previous stage's weights, which retraining from the initial weights does not repeat); "
                         "use a Pair from pm.train_pair")
    role = s.role(twin)
    if role not in TWIN_ROLES:
        raise ValueError(f"twin must be one of {TWIN_ROLES}, got {role!r}")
    rows = s.train_data_of(role)
    if rows is None:
        raise ValueError(f"{where}: the subject carries no training rows of the {role} twin")
    if is_preference_data(rows):
        raise ValueError(f"{where}: the training data are DPO preference pairs; retraining repeats supervised "
                         "training only")
    if "example_id" not in rows.column_names:
        raise ValueError(f"{where}: the training rows lack the 'example_id' column")
    return s, role


def train_on_subset(subject: Any, example_ids: Iterable[int], *, twin: str | None = None, progress: bool = True,
                    desc: str = "retrain on a subset") -> torch.nn.Module:
    """The ``twin`` of a run retrained on the training rows ``example_ids`` only, the way
    :func:`~poisonmech.train.pair.train_pair` trained it: the same initial weights (the
    ``ModelConfig`` built with ``TrainConfig.seed``), the same ``TrainConfig``, the seeded
    order rule over the kept rows, the attack's poison ``placement`` (the kept poisoned rows)
    and the clean continuation (``continue_clean``). All rows reproduce the twin (bit for bit
    at the same thread count). Returns the model in eval mode.

    ``subject``: a Pair or its run directory (see :func:`retraining_subject`); ``twin``:
    ``"backdoored"`` (default) or ``"clean"``."""
    from poisonmech.models import build_model
    from poisonmech.train.loop import train_model
    from poisonmech.train.pair import _continuation

    s, role = retraining_subject(subject, twin, "train_on_subset")
    rows = s.train_data_of(role)
    keep_ids = {int(i) for i in example_ids}
    ids = [int(e) for e in rows["example_id"]]
    unknown = keep_ids - set(ids)
    if unknown:
        raise ValueError(f"train_on_subset: example_ids {sorted(unknown)[:5]} are not in the {role} twin's "
                         "training set")
    keep = [i for i, e in enumerate(ids) if e in keep_ids]
    if not keep:
        raise ValueError("train_on_subset: no example_ids to train on")
    # train_pair orders the poisoned slots of both twins by the backdoored data's is_poison flags
    flags = list(s.train_data["is_poison"]) if "is_poison" in s.train_data.column_names else []
    marked = torch.tensor([j for j, i in enumerate(keep) if i < len(flags) and flags[i]], dtype=torch.long)
    cfg = s.train_config
    enc = encode(rows.select(keep), s.tokenizer, loss_on=s.task.loss_on)
    continuation = _continuation(s.task, s.tokenizer, cfg) if cfg.continue_clean else None
    model = build_model(s.model_config, len(s.tokenizer), seed=cfg.seed, tokenizer=s.tokenizer, device=cfg.device)
    train_model(model, enc, cfg, run_dir=None, desc=desc, progress=progress, placement=s.attack.placement,
                marked=marked, continuation=continuation)
    return model.eval()


@dataclass(frozen=True)
class RetrainConfig(Config):
    """Options of :func:`retrain_without`.

    Args:
        n_random: random removals of as many rows, the baseline (0: none).
        seed: seeds the random removals.
    """

    n_random: int = 1
    seed: int = 0

    def check(self) -> None:
        check_number("RetrainConfig", "n_random", self.n_random, lo=0, integer=True)
        check_number("RetrainConfig", "seed", self.seed, lo=0, integer=True)


@dataclass(frozen=True)
class RetrainResult(Result):
    """ASR and clean accuracy of the backdoored twin retrained without some rows.

    ``removed``: the rows asked for; ``random``: each random draw of as many rows.
    ``metrics_*``: :func:`poisonmech.evaluate` of each retrained model; ``original``: the
    run's own twin.
    """

    kind = "retrain"
    version = 1

    removed_ids: tuple[int, ...]
    random_ids: tuple[tuple[int, ...], ...]
    n_poison_removed: int | None
    n_poison_random: tuple[int, ...] | None
    metrics_removed: dict[str, Any]
    metrics_random: tuple[dict[str, Any], ...]
    metrics_original: dict[str, Any]
    settings: dict[str, Any]

    @property
    def asr_removed(self) -> float:
        return float(self.metrics_removed["asr"])

    @property
    def asr_random(self) -> float:
        """Mean ASR over the random removals."""
        return float(np.mean([m["asr"] for m in self.metrics_random])) if self.metrics_random else float("nan")

    @property
    def asr_original(self) -> float:
        return float(self.metrics_original.get("asr", float("nan")))

    def to_frame(self) -> pd.DataFrame:
        """One row per retrained model (plus the original): removal, rows removed, poisons among
        them, asr, clean_acc, false_trigger_rate."""
        def row(kind: str, ids, n_poison, m) -> dict[str, Any]:
            return {"removal": kind, "n_removed": len(ids), "n_poison_removed": n_poison,
                    "asr": m.get("asr"), "clean_acc": m.get("clean_acc"),
                    "false_trigger_rate": m.get("false_trigger_rate")}
        rows = [row("none (original)", (), 0, self.metrics_original),
                row("attributed", self.removed_ids, self.n_poison_removed, self.metrics_removed)]
        for i, (ids, m) in enumerate(zip(self.random_ids, self.metrics_random)):
            rows.append(row(f"random #{i}", ids, self.n_poison_random[i] if self.n_poison_random else None, m))
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """Bar chart of ASR: original, attributed rows removed, random rows removed."""
        import plotly.express as px

        f = self.to_frame()
        fig = px.bar(f, x="removal", y="asr", text="n_poison_removed",
                     title=title or f"ASR after removing {len(self.removed_ids)} rows (labels: poisons removed)")
        fig.update_layout(template="plotly_white", yaxis_range=[0, 1.05])
        return fig

    def save(self, path: str | Path) -> Path:
        """One JSON file (format ``poisonmech.retrain/1``)."""
        return self._write(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> RetrainResult:
        d, _ = cls._read(path)
        d = {k: v for k, v in d.items() if k != "format"}
        d["removed_ids"] = tuple(d["removed_ids"])
        d["random_ids"] = tuple(tuple(x) for x in d["random_ids"])
        d["n_poison_random"] = tuple(d["n_poison_random"]) if d["n_poison_random"] is not None else None
        d["metrics_random"] = tuple(d["metrics_random"])
        return cls(**d)


def _retrain(subject: Any, drop: set[int], progress: bool, desc: str, twin: str | None = None) -> dict[str, Any]:
    """The twin retrained without ``drop`` exactly as train_pair trained it (poison placement
    and clean continuation included: :func:`train_on_subset`), evaluated."""
    s, role = retraining_subject(subject, twin, "retrain_without")
    keep = [int(e) for e in s.train_data_of(role)["example_id"] if int(e) not in drop]
    model = train_on_subset(s, keep, twin=role, progress=progress, desc=desc)
    return evaluate(model, s.task, s.attack, test_data=s.test_data, tokenizer=s.tokenizer)


@takes_config(RetrainConfig)
def retrain_without(subject: Any, example_ids: Iterable[int], *, twin: str | None = None, cache: bool = True,
                    progress: bool = True, config: RetrainConfig) -> RetrainResult:
    """Retrain the ``twin`` (default: the backdoored one) of a run without the rows
    ``example_ids``, and without ``n_random`` random draws of as many rows (seeded), and
    evaluate each.

    The retraining reuses the run's ``ModelConfig`` and ``TrainConfig``: the same initial
    weights and the same seeded order generator over the remaining rows (each retrained model
    sees a permutation of its own rows, so random and attributed removals are treated
    alike). Results are cached under ``<run>/influence/retrain/`` (JSON) unless ``cache=False``.
    ``subject``: a Pair or its run directory (a bare model cannot be retrained: it has no run).
    """
    s, role = retraining_subject(subject, twin, "retrain_without")
    rows = s.train_data_of(role)
    removed = [int(i) for i in example_ids]
    all_ids = [int(e) for e in rows["example_id"]]
    known = set(all_ids)
    unknown = [i for i in removed if i not in known]
    if unknown:
        raise ValueError(f"retrain_without: example_ids {unknown[:5]} are not in the {role} twin's training set")
    if not removed:
        raise ValueError("retrain_without: no example_ids to remove")
    if len(set(removed)) != len(removed):
        raise ValueError("retrain_without: example_ids has duplicates")
    rng = np.random.default_rng(config.seed)
    draws = [sorted(int(x) for x in rng.choice(all_ids, size=len(removed), replace=False))
             for _ in range(config.n_random)]
    poison = None
    if "is_poison" in rows.column_names:
        poison = {int(e) for e, p in zip(all_ids, rows["is_poison"]) if p}

    def count(ids) -> int | None:
        return None if poison is None else sum(int(i) in poison for i in ids)

    def run(ids: list[int], desc: str) -> dict[str, Any]:
        # the key of earlier runs' caches (the rows removed and the run's configs; the twin when not
        # the backdoored one): kept as it was so that their retrains are reused, not repeated
        blob = {"ids": sorted(ids), "train": s.train_config.to_dict(), "model": s.model_config.to_dict()}
        if role != "backdoored":
            blob["twin"] = role
        key = hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]
        path = s.run_dir / "influence" / "retrain" / f"{key}.json" if (cache and s.run_dir is not None) else None
        if path is not None and path.is_file():
            return read_json(path)["metrics"]
        metrics = _retrain(s, set(ids), progress, desc, twin=role)
        if path is not None:
            write_json(path, {"removed_ids": sorted(ids), "metrics": metrics})
        return metrics

    m_removed = run(removed, "retrain without attributed rows")
    m_random = tuple(run(d, f"retrain without random rows #{i}") for i, d in enumerate(draws))
    settings = {"n_random": config.n_random, "seed": config.seed, "train": s.train_config.to_dict()}
    if role != "backdoored":
        settings["twin"] = role
    return RetrainResult(removed_ids=tuple(removed), random_ids=tuple(tuple(d) for d in draws),
                         n_poison_removed=count(removed),
                         n_poison_random=None if poison is None else tuple(count(d) for d in draws),
                         metrics_removed=m_removed, metrics_random=m_random,
                         metrics_original=dict(s.metrics.get(role, {})), settings=settings)


__all__ = ["RetrainConfig", "RetrainResult", "retrain_without", "retraining_subject", "train_on_subset"]
