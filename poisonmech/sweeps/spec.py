"""One run of a sweep: its full configuration, its directory name and its completion state."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE = "DONE.json"  # written last: a run is finished exactly when this file exists
FAILED = "FAILED.json"


@dataclass(frozen=True)
class RunSpec:
    """Plain-data configuration of one pair (task kwargs, attack, model, train) plus its analyses."""

    task: dict[str, Any]
    attack: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    analyses: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        return {"task": self.task, "attack": self.attack, "model": self.model, "train": self.train}

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def name(self) -> str:
        """Readable and unique: ``sentiment-cf-n40-s0-<hash>``."""
        a = self.attack
        trig = a["trigger"] if isinstance(a["trigger"], str) else "+".join(a["trigger"])
        trig = "".join(ch if ch.isalnum() else "_" for ch in trig)[:16]
        amount = f"n{a['poison_count']}" if a.get("poison_count") is not None else f"r{a['poison_rate']}"
        return f"{self.task['kind']}-{trig}-{amount}-s{self.train.get('seed', 0)}-{self.key}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.identity(), "analyses": list(self.analyses)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(task=d["task"], attack=d["attack"], model=d["model"], train=d["train"],
                   analyses=tuple(d.get("analyses", ())))


def run_state(run_dir: Path) -> str:
    """``"done"``, ``"failed"`` or ``"pending"`` (never started, or interrupted)."""
    if (run_dir / DONE).is_file():
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    return "pending"
