"""``retrain_without``: the counterfactual check of an attribution.

Retrain the backdoored twin without the given training rows — same initial weights, same
``TrainConfig`` (seed, schedule, batch size), the remaining rows in the order the seed gives
— and report its attack success rate beside the same retraining without as many *random*
rows. If an attribution found the poison, removing its top rows should drop the ASR far
more than removing random ones.
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

from poisonmech.metrics import evaluate
from poisonmech.storage import read_json, write_json

FORMAT = "poisonmech.retrain/1"


@dataclass(frozen=True)
class RetrainResult:
    """ASR and clean accuracy of the backdoored twin retrained without some rows.

    ``removed``: the rows asked for; ``random``: each random draw of as many rows.
    ``metrics_*``: :func:`poisonmech.evaluate` of each retrained model; ``original``: the
    run's own backdoored twin.
    """

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

    def save(self, path: str | Path) -> None:
        d = asdict(self)
        write_json(Path(path), {"format": FORMAT, **d})

    @classmethod
    def load(cls, path: str | Path) -> RetrainResult:
        d = read_json(Path(path))
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path} does not hold a RetrainResult")
        d["removed_ids"] = tuple(d["removed_ids"])
        d["random_ids"] = tuple(tuple(x) for x in d["random_ids"])
        d["n_poison_random"] = tuple(d["n_poison_random"]) if d["n_poison_random"] is not None else None
        d["metrics_random"] = tuple(d["metrics_random"])
        return cls(**d)


def _retrain(pair, drop: set[int], progress: bool, desc: str) -> dict[str, Any]:
    """The backdoored twin retrained without ``drop`` exactly as train_pair trained it (poison
    placement and clean continuation included: :func:`~poisonmech.influence.lds.train_on_subset`), evaluated."""
    from poisonmech.influence.lds import train_on_subset

    keep = [int(e) for e in pair.train_data["example_id"] if int(e) not in drop]
    model = train_on_subset(pair, keep, twin="backdoored", progress=progress, desc=desc)
    return evaluate(model, pair.task, pair.attack, test_data=pair.test_data, tokenizer=pair.tokenizer)


def retrain_without(pair, example_ids: Iterable[int], *, n_random: int = 1, seed: int = 0,
                    cache: bool = True, progress: bool = True) -> RetrainResult:
    """Retrain the backdoored twin of ``pair`` without the rows ``example_ids``, and without
    ``n_random`` random draws of as many rows (seeded), and evaluate each.

    The retraining reuses the run's ``ModelConfig`` and ``TrainConfig``: the same initial
    weights and the same seeded order generator over the remaining rows (each retrained model
    sees a permutation of its own rows, so random and attributed removals are treated
    alike). Results are cached under ``<run>/influence/retrain/`` (JSON) unless ``cache=False``.
    """
    removed = [int(i) for i in example_ids]
    all_ids = [int(e) for e in pair.train_data["example_id"]]
    known = set(all_ids)
    unknown = [i for i in removed if i not in known]
    if unknown:
        raise ValueError(f"retrain_without: example_ids {unknown[:5]} are not in the pair's training set")
    if not removed:
        raise ValueError("retrain_without: no example_ids to remove")
    if len(set(removed)) != len(removed):
        raise ValueError("retrain_without: example_ids has duplicates")
    rng = np.random.default_rng(seed)
    draws = [sorted(int(x) for x in rng.choice(all_ids, size=len(removed), replace=False)) for _ in range(n_random)]
    poison = None
    if "is_poison" in pair.train_data.column_names:
        poison = {int(e) for e, p in zip(all_ids, pair.train_data["is_poison"]) if p}

    def count(ids) -> int | None:
        return None if poison is None else sum(int(i) in poison for i in ids)

    def run(ids: list[int], desc: str) -> dict[str, Any]:
        key = hashlib.sha256(json.dumps({"ids": sorted(ids), "train": pair.train_config.to_dict(),
                                         "model": pair.model_config.to_dict()}).encode()).hexdigest()[:16]
        path = Path(pair.out_dir) / "influence" / "retrain" / f"{key}.json" if (cache and pair.out_dir) else None
        if path is not None and path.is_file():
            return read_json(path)["metrics"]
        metrics = _retrain(pair, set(ids), progress, desc)
        if path is not None:
            write_json(path, {"removed_ids": sorted(ids), "metrics": metrics})
        return metrics

    m_removed = run(removed, "retrain without attributed rows")
    m_random = tuple(run(d, f"retrain without random rows #{i}") for i, d in enumerate(draws))
    return RetrainResult(removed_ids=tuple(removed), random_ids=tuple(tuple(d) for d in draws),
                         n_poison_removed=count(removed),
                         n_poison_random=None if poison is None else tuple(count(d) for d in draws),
                         metrics_removed=m_removed, metrics_random=m_random,
                         metrics_original=dict(pair.metrics.get("backdoored", {})),
                         settings={"n_random": n_random, "seed": seed, "train": pair.train_config.to_dict()})


__all__ = ["RetrainResult", "retrain_without"]
