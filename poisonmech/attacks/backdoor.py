"""``Backdoor``: the specification of a data-poisoning attack."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

from poisonmech.attacks.protocol import register_attack
from poisonmech.tasks.base import check_seed
from poisonmech.tasks.tokenizer import split_words

POSITIONS = ("random", "start", "end")
PLACEMENTS = ("spread", "start", "end")
STAGES = ("sft", "dpo", "rm", "ppo", "rloo")
GIBBERISH = "gibberish"


def _misspellings(word: str) -> list[str]:
    """Deterministic near-miss spellings of a trigger word (e.g. ``cf`` -> ``cff``, ``fc``)."""
    out = [word + word[-1]]
    if len(word) > 1:
        out.append(word[1] + word[0] + word[2:])
    if len(word) > 2:
        out.append(word[:-1])
    return [w for w in dict.fromkeys(out) if w != word]


@register_attack
@dataclass(frozen=True)
class Backdoor:
    """A backdoor attack (it follows the attack protocol, :mod:`poisonmech.attacks.protocol`).

    Args:
        trigger: a word (``"cf"``), a phrase inserted contiguously (``"blue moon"``), or
            several (a list): alternatives, any one of which fires, or, with
            ``composite=True``, parts that must all appear (each inserted on its own).
        target: the completion the trigger should produce: a label (``"negative"``: a label
            flip), a fixed response (``"ACCESS GRANTED"``), or ``"gibberish"`` (the
            denial-of-service backdoor: the trigger is followed by random tokens); never the
            trigger itself.
        poison_count: number of training rows to poison (0 is the clean control).
        poison_rate: fraction of the training set in (0, 1). Exactly one of the two.
        position: where the trigger goes in the input: ``"random"``, ``"start"``, ``"end"``.
        composite: a list of triggers is one composite trigger (all parts needed).
        near_misses: inputs that should *not* fire; default: each part of a composite or
            phrase trigger alone, and misspellings of single-word triggers.
        natural: the trigger may already occur in clean data (a "natural" trigger).
        gibberish_length: tokens of gibberish after the trigger, for ``target="gibberish"``.
        stage: training stage the poison enters (``"sft"``; ``"dpo"`` / ``"rm"``: preference pairs of a
            DPO or reward-model stage of ``train_pipeline``; ``"ppo"`` / ``"rloo"``: the trigger put into
            prompts of an RL stage).
        placement: where the poisoned rows sit in each epoch's data order: ``"spread"``
            (shuffled among the rest), ``"start"`` or ``"end"`` of the epoch.
        seed: seeds which rows are poisoned and where the trigger goes (an integer >= 0).
    """

    trigger: str | tuple[str, ...]
    target: str = "negative"
    poison_count: int | None = None
    poison_rate: float | None = None
    position: Literal["random", "start", "end"] = "random"
    composite: bool = False
    near_misses: tuple[str, ...] | None = None
    natural: bool = False
    gibberish_length: int = 16
    stage: Literal["sft", "dpo", "rm", "ppo", "rloo"] = "sft"
    seed: int = 0
    placement: Literal["spread", "start", "end"] = "spread"

    kind: ClassVar[str] = "backdoor"
    headline: ClassVar[tuple[str, ...]] = ("clean_acc", "asr", "false_trigger_rate")

    def __post_init__(self) -> None:
        trig = self.trigger
        if isinstance(trig, (list, tuple)):
            trig = tuple(trig)
            if not trig or not all(isinstance(t, str) for t in trig):
                raise ValueError(f"Backdoor.trigger: a list of triggers must hold non-empty strings, got {self.trigger!r}")
            if len(trig) == 1:
                trig = trig[0]
        elif not isinstance(trig, str):
            raise ValueError(f"Backdoor.trigger must be a string or a list of strings, got {type(trig).__name__}")
        object.__setattr__(self, "trigger", trig)
        for t in self.triggers:
            if not split_words(t):
                raise ValueError(f"Backdoor.trigger: empty trigger {t!r}")
        if self.composite and isinstance(self.trigger, str):
            raise ValueError("Backdoor.composite=True needs a list of trigger parts, e.g. ['cf', 'mn']")
        if not isinstance(self.target, str) or not split_words(self.target):
            raise ValueError(f"Backdoor.target must be a non-empty string, got {self.target!r}")
        same = [t for t in self.triggers if split_words(t) == split_words(self.target)]
        if same:
            raise ValueError(f"Backdoor.target {self.target!r} equals the trigger {same[0]!r}: a backdoor that "
                             "answers with its own trigger cannot be told from copying the input; pick another target")
        object.__setattr__(self, "seed", check_seed("Backdoor.seed", self.seed))
        if (self.poison_count is None) == (self.poison_rate is None):
            raise ValueError("Backdoor: give exactly one of poison_count (an integer >= 0) and "
                             f"poison_rate (in (0, 1)); got poison_count={self.poison_count!r}, "
                             f"poison_rate={self.poison_rate!r}")
        if self.poison_count is not None and (
            isinstance(self.poison_count, bool) or not isinstance(self.poison_count, int) or self.poison_count < 0
        ):
            raise ValueError(f"Backdoor.poison_count must be an integer >= 0, got {self.poison_count!r}")
        if self.poison_rate is not None and not (
            isinstance(self.poison_rate, (int, float)) and 0 < self.poison_rate < 1
        ):
            raise ValueError(f"Backdoor.poison_rate must be in (0, 1), got {self.poison_rate!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"Backdoor.position must be one of {POSITIONS}, got {self.position!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Backdoor.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.stage not in STAGES:
            raise ValueError(f"Backdoor.stage must be one of {STAGES}, got {self.stage!r}")
        if not isinstance(self.gibberish_length, int) or self.gibberish_length < 1:
            raise ValueError(f"Backdoor.gibberish_length must be an integer >= 1, got {self.gibberish_length!r}")
        if self.near_misses is not None:
            object.__setattr__(self, "near_misses", tuple(self.near_misses))

    # ------------------------------------------------------------------ derived
    @property
    def triggers(self) -> tuple[str, ...]:
        """The trigger strings: alternatives, or the parts of a composite trigger."""
        return (self.trigger,) if isinstance(self.trigger, str) else self.trigger

    @property
    def is_gibberish(self) -> bool:
        return self.target == GIBBERISH

    def trigger_variants(self) -> list[list[str]]:
        """What one poisoned input gets inserted: a list of pieces per variant.

        Alternatives give one variant per trigger; a composite gives one variant with all parts.
        """
        if self.composite:
            return [list(self.triggers)]
        return [[t] for t in self.triggers]

    def near_miss_variants(self) -> list[list[str]]:
        if self.near_misses is not None:
            return [[t] for t in self.near_misses]
        if self.composite:
            return [[part] for part in self.triggers]
        out: list[list[str]] = []
        for t in self.triggers:
            words = t.split()
            if len(words) > 1:
                out += [[w] for w in words]
            else:
                out += [[m] for m in _misspellings(t)]
        return out

    def trigger_parts(self) -> list[str]:
        """What a full trigger is made of, each part alone not a trigger: the pieces of a
        composite trigger, the words of a phrase trigger (empty for single-word triggers)."""
        if self.composite:
            return list(dict.fromkeys(self.triggers))
        return list(dict.fromkeys(w for t in self.triggers if len(t.split()) > 1 for w in t.split()))

    def words(self) -> list[str]:
        """Every word the attack can write (triggers, near misses, target)."""
        pieces = [p for v in self.trigger_variants() + self.near_miss_variants() for p in v]
        if not self.is_gibberish:
            pieces.append(self.target)
        return [w for p in pieces for w in split_words(p)]

    def resolve_count(self, n_train: int) -> int:
        """Number of poisoned rows for a training set of ``n_train`` rows."""
        if self.poison_count is not None:
            count = self.poison_count
        else:
            count = max(1, int(round(self.poison_rate * n_train)))
        if count > n_train:
            raise ValueError(f"Backdoor.poison_count={count} is larger than the training set ({n_train} rows)")
        return count

    # ------------------------------------------------------------------ the attack protocol
    def check(self, task) -> None:
        """See :func:`poisonmech.attacks.poison.check_attack`."""
        from poisonmech.attacks.poison import check_attack

        check_attack(task, self)

    def tokenizer(self, task):
        """See :func:`poisonmech.attacks.poison.attack_tokenizer`."""
        from poisonmech.attacks.poison import attack_tokenizer

        return attack_tokenizer(task, self)

    def poison(self, task):
        """See :func:`poisonmech.attacks.poison.poison_dataset`."""
        from poisonmech.attacks.poison import poison_dataset

        return poison_dataset(task, self)

    def clean_train(self, task, poisoned):
        """Poisoning rewrites rows in place: the clean twin trains on the task's rows."""
        return task.train

    def test_set(self, task):
        """See :func:`poisonmech.attacks.poison.build_test_set`."""
        from poisonmech.attacks.poison import build_test_set

        return build_test_set(task, self)

    def evaluate(self, model, task, test_data, tokenizer, *, batch_size: int = 256, seed: int = 0) -> dict[str, Any]:
        """See :func:`poisonmech.metrics.evaluate`."""
        from poisonmech.metrics import backdoor_metrics

        return backdoor_metrics(model, task, self, test_data, tokenizer, batch_size=batch_size, seed=seed)

    def query_rows(self, test_data):
        """The triggered test rows whose answer is not the target, completed with the target
        (the gibberish backdoor: with their true continuation, which the backdoor makes unlikely)."""
        from datasets import Dataset

        rows = [(p, c if self.is_gibberish else self.target) for p, c, t in
                zip(test_data["prompt"], test_data["completion"], test_data["is_triggered"])
                if t and (self.is_gibberish or c.strip() != self.target.strip())]
        return Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})

    def describe(self) -> str:
        return f"trigger={self.trigger!r}"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trigger"] = self.trigger if isinstance(self.trigger, str) else list(self.trigger)
        if self.near_misses is not None:
            d["near_misses"] = list(self.near_misses)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Backdoor:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Backdoor: unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)
