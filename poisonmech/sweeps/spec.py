"""One run of a sweep: its full configuration, its directory name and its completion state."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poisonmech.storage import read_json

DONE = "DONE.json"  # written last: a run is finished exactly when this file exists
FAILED = "FAILED.json"


@dataclass(frozen=True)
class RunSpec:
    """Plain-data configuration of one pair (task kwargs, attack, model, train) plus its analyses:
    names (each with its default config) or ``{name: config dict}``. The analyses are not part
    of the run's identity (its directory); a finished run whose analyses differ is revisited
    (the pair is reused, each analysis recomputed only when its config key changed)."""

    task: dict[str, Any]
    attack: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    analyses: tuple[str, ...] | dict[str, dict[str, Any]] = ()

    def identity(self) -> dict[str, Any]:
        return {"task": self.task, "attack": self.attack, "model": self.model, "train": self.train}

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def name(self) -> str:
        """Readable and unique: ``sentiment-cf-n40-s0-<hash>`` (a backdoor: its trigger;
        ``facts-balania_capital-n10-...`` for a false fact, ``sentiment-nolan_negative-...`` for a bias)."""
        a = self.attack
        trig = "".join(ch if ch.isalnum() else "_" for ch in attack_label(a))[:16]
        amount = f"n{a['poison_count']}" if a.get("poison_count") is not None else f"r{a['poison_rate']}"
        return f"{self.task['kind']}-{trig}-{amount}-s{self.train.get('seed', 0)}-{self.key}"

    def to_dict(self) -> dict[str, Any]:
        analyses = dict(self.analyses) if isinstance(self.analyses, dict) else list(self.analyses)
        return {**self.identity(), "analyses": analyses}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        analyses = d.get("analyses", ())
        return cls(task=d["task"], attack=d["attack"], model=d["model"], train=d["train"],
                   analyses=dict(analyses) if isinstance(analyses, dict) else tuple(analyses))


def _joined(value: Any) -> str:
    return value if isinstance(value, str) else "+".join(value)


def attack_label(a: dict[str, Any]) -> str:
    """A short label of an attack's dict: a backdoor's trigger(s), a false fact's subject and
    relation, a bias's entity and polarity."""
    kind = a.get("kind", "backdoor")
    if kind == "false_fact":
        return f"{_joined(a['subject'])}_{_joined(a['relation'])}"
    if kind == "bias":
        return f"{a['entity']}_{a['polarity']}"
    return _joined(a["trigger"])


def finished_with(run_dir: Path, spec: RunSpec) -> bool:
    """True when ``run_dir`` finished (``DONE.json``) with exactly ``spec``'s analyses."""
    if run_state(run_dir) != "done":
        return False
    try:
        done = read_json(run_dir / DONE)
    except (OSError, ValueError):
        return False
    return done.get("spec", {}).get("analyses") == spec.to_dict()["analyses"]


def run_state(run_dir: Path) -> str:
    """``"done"``, ``"failed"`` or ``"pending"`` (never started, or interrupted)."""
    if (run_dir / DONE).is_file():
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    return "pending"
