"""``StageConfig``: a post-training stage's hyper-parameters = a ``TrainConfig`` plus the stage's own.

``DPOConfig``, ``RewardConfig`` and ``PPOConfig`` derive from it (``DPOConfig`` keeps its own
``to_dict`` key order, which existing run directories store). A
stage config takes the optimiser / schedule fields flat (``RewardConfig(lr=1e-3, epochs=2,
init="policy")``) or as ``train=TrainConfig(...)`` (keywords override ``train``'s fields), reads
them as attributes (``config.lr`` is ``config.train.lr``) and stores one flat dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from poisonmech.config import Config, ConfigError, _plain
from poisonmech.train.config import TrainConfig

#: the ``TrainConfig`` fields a post-training stage uses (it has no clean continuation)
SHARED_FIELDS = ("epochs", "batch_size", "lr", "schedule", "warmup_ratio", "min_lr_ratio", "weight_decay", "betas",
                 "grad_clip", "seed", "checkpoint_every", "device")


@dataclasses.dataclass(frozen=True, init=False)
class StageConfig(Config):
    """Base of the stage configs that compose a ``TrainConfig`` (subclasses declare their own
    fields as dataclass fields with defaults, list them in ``OWN`` and give ``TRAIN_DEFAULTS``)."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    OWN: ClassVar[tuple[str, ...]] = ()
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, train: TrainConfig | dict | None = None, **fields_: Any) -> None:
        cls = type(self)
        name = cls.__name__
        cls.check_fields(fields_, name)
        own = {k: fields_.pop(k) for k in cls.OWN if k in fields_}
        if isinstance(train, dict):
            TrainConfig.check_fields(train, f"{name}.train")
            train = cls._train(**train)
        if train is None:
            train = cls._train(**fields_)
        elif not isinstance(train, TrainConfig):
            raise ConfigError(f"{name}.train must be a TrainConfig (or its dict), got {type(train).__name__}")
        elif fields_:
            try:
                train = train.replace(**fields_)
            except ValueError as exc:
                raise ConfigError(str(exc).replace("TrainConfig.", f"{name}.")) from None
        object.__setattr__(self, "train", train)
        defaults = cls._own_defaults()
        for k in cls.OWN:
            object.__setattr__(self, k, own.get(k, defaults[k]))
        if train.continue_clean or train.continue_lr is not None:
            raise ConfigError(f"{name}.train: a {name.replace('Config', '')} stage has no clean continuation "
                              f"(continue_clean=0, continue_lr=None), got continue_clean={train.continue_clean!r}, "
                              f"continue_lr={train.continue_lr!r}")
        self.__post_init__()

    @classmethod
    def _train(cls, **fields_: Any) -> TrainConfig:
        try:
            return TrainConfig(**{**cls.TRAIN_DEFAULTS, **fields_})
        except ValueError as exc:  # re-badge the shared checks
            raise ConfigError(str(exc).replace("TrainConfig.", f"{cls.__name__}.")) from None

    @classmethod
    def _own_defaults(cls) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.name in cls.OWN:
                out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return out

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: the TrainConfig fields read as the stage config's own
        if name in SHARED_FIELDS:
            return getattr(object.__getattribute__(self, "train"), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return ("train", *cls.OWN, *SHARED_FIELDS)

    def train_config(self) -> TrainConfig:
        return self.train

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (own fields or the ``TrainConfig`` fields, flat)."""
        cls = type(self)
        cls.check_fields(changes, f"{cls.__name__}.replace")
        own = {k: getattr(self, k) for k in cls.OWN}
        own.update({k: changes.pop(k) for k in cls.OWN if k in changes})
        return cls(train=changes.pop("train", self.train), **own, **changes)

    def to_dict(self) -> dict[str, Any]:
        """One flat dict: the own fields, then the ``TrainConfig`` fields a stage uses."""
        train = self.train.to_dict()
        own = {k: getattr(self, k) for k in type(self).OWN}
        return {**{k: _plain(v) for k, v in own.items()}, **{k: train[k] for k in SHARED_FIELDS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict: expected a dict of fields, got {type(d).__name__}")
        cls.check_fields(d, f"{cls.__name__}.from_dict")
        kw = dict(d)
        if isinstance(kw.get("betas"), list):
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


__all__ = ["SHARED_FIELDS", "StageConfig"]
