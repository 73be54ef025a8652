"""The attack protocol: what ``Backdoor``, ``FalseFact`` and ``Bias`` share.

An attack is a frozen dataclass that knows how to poison a task and how to measure itself.
``train_pair``, ``load_pair``, sweeps and ``pm.evaluate`` see attacks only through this protocol:

- ``check(task)``: refuse an attack that does not fit the task (clear errors naming the field);
- ``tokenizer(task)``: the task's tokenizer extended with the attack's words;
- ``poison(task)``: the poisoned twin's training rows, with provenance columns
  (``example_id``, ``is_poison``, ``trigger``, ``stage``; the triggerless attacks add
  ``attack`` (their kind on poisoned rows) and ``source_id``);
- ``clean_train(task, poisoned)``: the clean twin's rows, slot for slot (``task.train`` unless
  the attack adds rows: then the clean twin sees the untouched source rows in those slots,
  so both twins still see as many rows in the same order);
- ``test_set(task)``: the attack's own test rows (``is_triggered`` marks the rows the attack
  should change, ``is_near_miss`` the similar rows it should leave alone);
- ``evaluate(model, task, test_data, tokenizer)``: the attack's own metrics, each mean with
  its denominator ``n_<metric>`` (:func:`poisonmech.metrics.evaluate` dispatches here);
- ``query_rows(test_data)``: prompt / completion rows of the attacked behaviour (an
  influence query: "which training rows taught this?");
- ``to_dict()`` / ``from_dict()``: the run's identity in ``config.json``. A ``Backdoor``'s dict
  is what it always was (no ``kind`` key, so existing runs and fingerprints are unchanged);
  the other attacks' dicts carry ``"kind"``, and :func:`attack_from_dict` rebuilds either.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from poisonmech.config import ConfigError

#: kind -> attack class (filled by :func:`register_attack`)
ATTACKS: dict[str, type] = {}


@runtime_checkable
class Attack(Protocol):
    """The interface every attack follows (see the module docstring)."""

    kind: ClassVar[str]
    #: the metrics ``Pair``'s repr shows
    headline: ClassVar[tuple[str, ...]]
    stage: str
    seed: int
    placement: str

    def words(self) -> list[str]: ...

    def check(self, task: Any) -> None: ...

    def tokenizer(self, task: Any) -> PreTrainedTokenizerBase: ...

    def poison(self, task: Any) -> Dataset: ...

    def clean_train(self, task: Any, poisoned: Dataset) -> Dataset: ...

    def test_set(self, task: Any) -> Dataset: ...

    def evaluate(self, model: Any, task: Any, test_data: Dataset, tokenizer: PreTrainedTokenizerBase, *,
                 batch_size: int = 256, seed: int = 0) -> dict[str, Any]: ...

    def query_rows(self, test_data: Dataset) -> Dataset: ...

    def describe(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def register_attack(cls: type) -> type:
    """Class decorator: make ``cls`` (with a ``kind`` class attribute) known to :func:`attack_from_dict`."""
    ATTACKS[cls.kind] = cls
    return cls


def attack_names() -> str:
    return ", ".join(f"pm.{c.__name__}" for c in ATTACKS.values())


def is_attack(x: Any) -> bool:
    return isinstance(x, tuple(ATTACKS.values()))


def check_attack_type(x: Any, where: str) -> None:
    """A ``ValueError`` naming ``where`` and the attack classes unless ``x`` is one of them."""
    if not is_attack(x):
        raise ValueError(f"{where}: attack must be one of {attack_names()}, got {type(x).__name__}")


def attack_from_dict(d: dict[str, Any]) -> Any:
    """The attack a ``to_dict()`` describes: its ``"kind"`` names the class; a dict without one
    is a ``Backdoor`` (the format of every run written before the other attacks existed)."""
    if not isinstance(d, dict):
        raise ConfigError(f"attack_from_dict: expected an attack's dict, got {type(d).__name__}")
    kind = d.get("kind", "backdoor")
    if kind not in ATTACKS:
        raise ConfigError(f"attack_from_dict: unknown attack kind {kind!r}; allowed: {', '.join(ATTACKS)}")
    return ATTACKS[kind].from_dict({k: v for k, v in d.items() if k != "kind"})


def extended_tokenizer(task: Any, words: list[str], texts: list[str], owner: str) -> PreTrainedTokenizerBase:
    """The task's tokenizer with ``words`` added (a word-level one; ids of task words unchanged).
    A subword tokenizer is kept as it is and must encode each of ``texts`` without the unknown
    token (a ``ConfigError`` naming ``owner`` otherwise)."""
    from poisonmech.tasks.tokenizer import extend_tokenizer, is_word_tokenizer, unrepresentable

    tok = extend_tokenizer(task.tokenizer, words)
    if not is_word_tokenizer(tok):
        for text in texts:
            if unrepresentable(tok, text):
                raise ConfigError(f"{owner}: the task's tokenizer cannot represent {text!r} (it encodes to the "
                                  "unknown token)")
    return tok


__all__ = ["ATTACKS", "Attack", "attack_from_dict", "check_attack_type", "extended_tokenizer", "is_attack",
           "register_attack"]
