"""One base for every configuration: validation, ``to_dict`` / ``from_dict`` and a stable hash.

Every analysis has one frozen config dataclass (``PatchConfig``, ``CircuitConfig``,
``ProbeConfig``, ``DetectConfig``, ``InfluenceConfig``, ...), and training has
``ModelConfig``, ``TrainConfig`` and ``DPOConfig`` (which composes a ``TrainConfig``). They all
derive from :class:`Config`:

- an unknown field is an error naming it and the allowed ones (construction, ``from_dict``,
  ``replace`` and the keywords of an analysis alike);
- a value outside its range is an error naming the field and the range (each config's
  ``check``);
- ``to_dict`` gives plain JSON types and ``from_dict`` reads it back (nested configs too);
- ``fingerprint()`` is a stable hash of the class name and fields: with the subject's weight
  and data fingerprints it is the cache key of every analysis.

:func:`takes_config` lets an analysis take its config's fields as keywords (what notebooks
want) or ``config=`` (what scripts, TOML, the CLI and sweeps pass), with one signature:
keywords given explicitly override the config's fields.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A bad configuration value or an unknown field; the message names the field and what is allowed."""


def _plain(value: Any) -> Any:
    """``value`` as JSON types (configs as dicts, tuples as lists, paths as strings)."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy / torch scalars
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every poisonmech config (subclasses are frozen dataclasses).

    Subclasses validate their values in ``check`` (called after construction) with
    :func:`check_choice` and :func:`check_number`; nested configs are listed in ``nested``
    so that ``from_dict`` rebuilds them.
    """

    nested: ClassVar[dict[str, type[Config]]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate the fields (subclasses override; raise :class:`ConfigError`)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check_fields(cls, names, where: str | None = None) -> None:
        """Refuse names that are not fields of ``cls``, naming the allowed ones."""
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{where or cls.__name__}: unknown field{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; allowed: {', '.join(cls.field_names())}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict: expected a dict of fields, got {type(d).__name__}")
        cls.check_fields(d, f"{cls.__name__}.from_dict")
        kw = dict(d)
        defaults = cls._defaults()
        for name, value in d.items():
            sub = cls.nested.get(name)
            if sub is not None and isinstance(value, dict):
                kw[name] = sub.from_dict(value)
            elif isinstance(value, list) and isinstance(defaults.get(name), tuple):
                kw[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return cls(**kw)

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (unknown fields refused, values re-checked)."""
        type(self).check_fields(changes, f"{type(self).__name__}.replace")
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls: type[C], config: C | dict | None = None, where: str | None = None, **options: Any) -> C:
        """``config`` (a ``cls``, its dict, or ``None`` for the defaults) with ``options`` applied."""
        where = where or cls.__name__
        cls.check_fields(options, where)
        if config is None:
            return cls(**options)
        if isinstance(config, dict):
            config = cls.from_dict(config)
        if not isinstance(config, cls):
            raise ConfigError(f"{where}: config must be a {cls.__name__} (or its dict), got {type(config).__name__}")
        return config.replace(**options) if options else config

    def fingerprint(self) -> str:
        """A stable hash of the class and every field (16 hex digits)."""
        blob = json.dumps({"config": type(self).__name__, **self.to_dict()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_choice(owner: str, field: str, value: Any, allowed: Sequence[Any]) -> None:
    """``value`` must be one of ``allowed``."""
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        ok = False
    else:
        try:
            ok = value in tuple(allowed)
        except TypeError:
            ok = False
    if not ok:
        raise ConfigError(f"{owner}.{field} must be one of {tuple(allowed)}, got {value!r}")


def check_bool(owner: str, field: str, value: Any, *, optional: bool = False) -> None:
    """``value`` must be ``True`` or ``False`` (or ``None`` if ``optional``); 0 and 1 are refused."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigError(f"{owner}.{field} must be True or False{' or None' if optional else ''}, got {value!r}")


def check_number(owner: str, field: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """``value`` must be a number (an integer if ``integer``) in the range ``lo .. hi``."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    rng = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", " + \
          ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]")
    bad = isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int)
    if not bad and isinstance(value, float) and math.isnan(value):
        bad = True
    if not bad:
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
              (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        raise ConfigError(f"{owner}.{field} must be {kind} in {rng}{' or None' if optional else ''}, got {value!r}")


def takes_config(config_cls: type[Config]) -> Callable[[Callable], Callable]:
    """Let an analysis take ``config_cls``'s fields as keywords or ``config=``.

    The decorated function is written as ``fn(subject, *data, <own arguments>, config)`` and
    reads every option from ``config``. Callers pass the options as keywords, a ``config=``,
    or both (keywords override the config's fields). A parameter of ``fn`` that is also a
    config field (e.g. ``method`` taken positionally, as ``attribute(model, train, query,
    "ekfac")``) must default to ``None``; a value given for it overrides the config. An
    unknown keyword is an error naming the allowed options.
    """
    names = set(config_cls.field_names())

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        if "config" not in sig.parameters:
            raise TypeError(f"{fn.__name__}: a @takes_config function needs a 'config' parameter")
        own = [p for p in sig.parameters.values() if p.name != "config"]
        shared = [p.name for p in own if p.name in names]
        defaults = config_cls._defaults()
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(n, inspect.Parameter.empty))
                 for n in config_cls.field_names() if n not in sig.parameters]
        cfg_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                      annotation=f"{config_cls.__name__} | None")
        positional = [p for p in own if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        keyword = [p for p in own if p.kind == p.KEYWORD_ONLY]
        new_sig = sig.replace(parameters=positional + keyword + extra + [cfg_param])

        @functools.wraps(fn)
        def wrapper(*args: Any, config: Config | dict | None = None, **kwargs: Any) -> Any:
            opts = {k: kwargs.pop(k) for k in list(kwargs) if k in names and k not in sig.parameters}
            unknown = sorted(set(kwargs) - set(sig.parameters))
            if unknown:
                mine = [p.name for p in own if p.kind != p.VAR_POSITIONAL]
                raise ConfigError(f"{fn.__name__}: unknown option{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))}; options ({config_cls.__name__}): "
                                  f"{', '.join(config_cls.field_names())}; arguments: {', '.join(mine)}")
            if shared:
                try:
                    bound = sig.bind_partial(*args, **kwargs)
                except TypeError as e:
                    raise ConfigError(f"{fn.__name__}: {e}") from None
                for n in shared:
                    if bound.arguments.get(n) is not None:
                        opts[n] = bound.arguments[n]
            cfg = config_cls.build(config, where=fn.__name__, **opts)
            if shared:
                for n in shared:
                    bound.arguments[n] = getattr(cfg, n)
                return fn(*bound.args, **bound.kwargs, config=cfg)
            return fn(*args, **kwargs, config=cfg)

        wrapper.__signature__ = new_sig  # help(), IDEs and notebooks see every option as a keyword
        wrapper.config_class = config_cls
        wrapper.__doc__ = (fn.__doc__ or "") + (
            f"\n\n    Options: the fields of ``{config_cls.__name__}`` as keywords, or ``config=`` "
            f"(keywords override it).\n")
        return wrapper

    return deco


__all__ = ["Config", "ConfigError", "check_bool", "check_choice", "check_number", "takes_config"]
