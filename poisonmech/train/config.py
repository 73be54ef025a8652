"""``TrainConfig``: the single source of truth for how the twins are trained."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from poisonmech.config import Config, ConfigError, check_choice, check_number
from poisonmech.tasks.base import check_seed

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig(Config):
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

    def check(self) -> None:
        owner = type(self).__name__
        for name in ("epochs", "batch_size"):
            check_number(owner, name, getattr(self, name), lo=1, integer=True)
        try:
            object.__setattr__(self, "seed", check_seed(f"{owner}.seed", self.seed))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        check_number(owner, "lr", self.lr, lo=0, lo_open=True)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_number(owner, "warmup_ratio", self.warmup_ratio, lo=0, hi=1, hi_open=True)
        check_number(owner, "min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        check_number(owner, "weight_decay", self.weight_decay, lo=0)
        try:
            betas = tuple(self.betas)
        except TypeError:
            betas = ()
        if len(betas) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
                                  for b in betas):
            raise ConfigError(f"{owner}.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        check_number(owner, "grad_clip", self.grad_clip, lo=0, lo_open=True, optional=True)
        check_number(owner, "checkpoint_every", self.checkpoint_every, lo=1, integer=True, optional=True)
        if not isinstance(self.device, str):
            raise ConfigError(f"{owner}.device must be a torch device name (a str such as 'cpu' or 'cuda'), "
                              f"got {self.device!r}")
        check_number(owner, "continue_clean", self.continue_clean, lo=0, integer=True)
        check_number(owner, "continue_lr", self.continue_lr, lo=0, lo_open=True, optional=True)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate used for optimiser step ``step`` (0-based) of ``total_steps``.

        Warm-up: ``lr * (step + 1) / warmup`` for the first ``warmup = int(warmup_ratio *
        total_steps)`` steps; then ``"cosine"`` / ``"linear"`` decay from ``lr`` at the first step
        after warm-up to exactly ``min_lr_ratio * lr`` at the last step, or ``"constant"``.

        Written by hand rather than with ``transformers``' schedulers, which give other numbers:
        ``get_cosine_with_min_lr_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` /
        ``get_constant_schedule_with_warmup`` warm up as ``step / warmup`` (their first step has
        learning rate 0; ours ``1 / warmup``), their decay runs over ``total - warmup`` steps
        (so the last step stays above the floor; ours divides by ``total - warmup - 1`` and ends
        on it), the linear one has no floor (``min_lr_ratio``), and they round in another order.
        Switching would change every trained weight and every cached run. After warm-up ours is
        transformers' cosine-with-min-lr / linear (floor 0) / constant schedule with
        ``num_training_steps = total - 1``, and during warm-up ours at ``step`` is theirs at
        ``step + 1``: ``tests/train/test_schedule.py`` pins both.
        """
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


__all__ = ["SCHEDULES", "TrainConfig"]
