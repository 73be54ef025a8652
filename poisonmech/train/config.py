"""``TrainConfig``: the single source of truth for how the twins are trained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from poisonmech.tasks.base import check_seed

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters shared by both twins.

    Args:
        epochs: passes over the training set.
        batch_size: rows per optimiser step.
        lr: peak learning rate (AdamW).
        schedule: ``"cosine"`` or ``"linear"`` decay to ``min_lr_ratio * lr`` after warm-up,
            or ``"constant"``.
        warmup_ratio: fraction of all steps spent warming up linearly from 0.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW decoupled weight decay on matrices (not on biases or norms).
        betas: AdamW betas.
        grad_clip: clip the global gradient norm to this; ``None`` for no clipping.
        seed: seeds the initial weights and the data order (the same for both twins).
        checkpoint_every: keep an intermediate checkpoint every this many epochs (the last
            epoch is always kept); ``None`` keeps only the final weights.
        device: torch device for training.
        continue_clean: after the last epoch, train both twins on this many more clean rows
            (the task's training rows, seeded order, cycling if needed): does the backdoor
            survive continued clean training? 0 = none.
        continue_lr: constant learning rate of that continuation (``None``: ``lr``).
    """

    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int | None = 1
    device: str = "cpu"
    continue_clean: int = 0
    continue_lr: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        object.__setattr__(self, "seed", check_seed("TrainConfig.seed", self.seed))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.checkpoint_every is not None and (
            isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 1
        ):
            raise ValueError(f"TrainConfig.checkpoint_every must be a positive integer or None, "
                             f"got {self.checkpoint_every!r}")
        self._check_continuation()

    def _check_continuation(self) -> None:
        if isinstance(self.continue_clean, bool) or not isinstance(self.continue_clean, int) or self.continue_clean < 0:
            raise ValueError(f"TrainConfig.continue_clean must be an integer >= 0, got {self.continue_clean!r}")
        if self.continue_lr is not None and not self.continue_lr > 0:
            raise ValueError(f"TrainConfig.continue_lr must be > 0 or None, got {self.continue_lr!r}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate used for optimiser step ``step`` (0-based) of ``total_steps``."""
        import math

        warmup = int(self.warmup_ratio * total_steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.schedule == "constant":
            return self.lr
        frac = (step - warmup) / max(1, total_steps - warmup - 1)
        floor = self.min_lr_ratio
        if self.schedule == "linear":
            return self.lr * (floor + (1 - floor) * (1 - frac))
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"TrainConfig: unknown fields {sorted(set(d) - known)}; allowed: {sorted(known)}")
        return cls(**d)
