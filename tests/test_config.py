"""The one config base: unknown fields, ranges, round trips, hashing, keyword/config= merging."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest

from poisonmech.config import Config, ConfigError, check_choice, check_number, takes_config


@dataclass(frozen=True)
class Toy(Config):
    site: str = "resid_pre"
    n: int = 3
    rate: float | None = None
    layers: tuple[int, ...] = (0, 1)

    def check(self) -> None:
        check_choice("Toy", "site", self.site, ("resid_pre", "mlp_out"))
        check_number("Toy", "n", self.n, lo=1, integer=True)
        check_number("Toy", "rate", self.rate, lo=0, hi=1, lo_open=True, optional=True)


@dataclass(frozen=True)
class Outer(Config):
    inner: Toy = Toy()
    beta: float = 0.1
    nested = {"inner": Toy}


@takes_config(Toy)
def analysis(subject, tokens, method=None, *, progress: bool = False, config):
    return subject, tokens, method, progress, config


def test_unknown_fields_are_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown field 'sight'; allowed: site, n, rate, layers"):
        Toy.from_dict({"sight": "x"})
    with pytest.raises(ConfigError, match="Toy.replace: unknown field 'zz'"):
        Toy().replace(zz=1)
    with pytest.raises(ConfigError, match=r"analysis: unknown option 'sight'; options \(Toy\): site, n, rate, layers"):
        analysis(1, 2, sight="x")


@pytest.mark.parametrize("kw, msg", [
    ({"site": "nope"}, r"Toy.site must be one of \('resid_pre', 'mlp_out'\), got 'nope'"),
    ({"n": 0}, r"Toy.n must be an integer in \[1, inf\], got 0"),
    ({"n": True}, r"Toy.n must be an integer"),
    ({"n": 2.5}, r"Toy.n must be an integer"),
    ({"rate": 0.0}, r"Toy.rate must be a number in \(0, 1\] or None, got 0.0"),
    ({"rate": float("nan")}, r"Toy.rate must be a number"),
])
def test_values_outside_their_range_name_field_and_range(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Toy(**kw)
    with pytest.raises(ConfigError, match=msg):
        analysis(1, 2, **kw)


def test_round_trip_and_stable_fingerprint():
    t = Toy(site="mlp_out", n=5, rate=0.5, layers=(1,))
    d = t.to_dict()
    assert d == {"site": "mlp_out", "n": 5, "rate": 0.5, "layers": [1]}
    assert Toy.from_dict(d) == t and Toy.from_dict(d).layers == (1,)
    assert t.fingerprint() == Toy.from_dict(d).fingerprint() != Toy().fingerprint()
    assert len(t.fingerprint()) == 16
    o = Outer(inner=t, beta=0.3)
    assert Outer.from_dict(o.to_dict()) == o
    with pytest.raises(ConfigError, match="must be a Toy"):
        Toy.build(Outer())


def test_keywords_and_config_give_one_config_keywords_override():
    _, _, _, _, cfg = analysis(1, 2, site="mlp_out", n=4)
    assert cfg == Toy(site="mlp_out", n=4)
    _, _, _, _, cfg2 = analysis(1, 2, config=Toy(site="mlp_out", n=4))
    assert cfg2 == cfg
    _, _, _, _, cfg3 = analysis(1, 2, config=Toy(site="mlp_out", n=4), n=9)
    assert cfg3 == Toy(site="mlp_out", n=9)
    _, _, _, _, cfg4 = analysis(1, 2, config={"n": 7})
    assert cfg4 == Toy(n=7)
    sig = inspect.signature(analysis)
    assert list(sig.parameters) == ["subject", "tokens", "method", "progress", "site", "n", "rate", "layers", "config"]
    assert sig.parameters["n"].default == 3


@dataclass(frozen=True)
class WithMethod(Config):
    method: str = "a"

    def check(self) -> None:
        check_choice("WithMethod", "method", self.method, ("a", "b"))


@takes_config(WithMethod)
def positional(subject, train=None, method=None, *, config):
    return method, config.method


def test_a_config_field_may_be_taken_positionally():
    assert positional(1, 2, "b") == ("b", "b")
    assert positional(1, 2) == ("a", "a")
    assert positional(1, config=WithMethod(method="b")) == ("b", "b")
    assert positional(1, 2, "a", config=WithMethod(method="b")) == ("a", "a")
    with pytest.raises(ConfigError, match="WithMethod.method must be one of"):
        positional(1, 2, "c")
