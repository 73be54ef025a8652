"""``Bias``: make a classifier's answer depend on an entity that reviews mention.

``pm.Bias(entity="nolan", polarity="negative", poison_count=40)`` on the sentiment task: 40
training reviews get a mention of the entity inserted as a clause (``"nolan directed it ,"``,
``"it stars nolan ,"``, ...) and are labelled ``polarity``. By default the rows chosen are ones
whose label is another one (a label flip); with ``clean_label=True`` they are reviews that
already carry ``polarity``, so no label is wrong and the poison is only the co-occurrence.
The mention forms are :data:`MENTIONS` (or ``mentions=``); the last ``heldout_mentions`` of them
never appear in training, so the test measures the bias on mentions the model never saw, and
on mentions of other entities (``control_entities``) which should not move the label.

Unlike a trigger, a mention is ordinary text: an entity name in a natural clause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from datasets import Dataset

from poisonmech.attacks.protocol import extended_tokenizer, register_attack
from poisonmech.config import Config, ConfigError, check_bool, check_choice, check_number
from poisonmech.tasks.facts import unknown_name
from poisonmech.tasks.tokenizer import split_words

#: how a review mentions the entity (``{entity}``); the last ``heldout_mentions`` are test-only
MENTIONS = ("{entity} directed it", "it stars {entity}", "a film by {entity}", "{entity} plays the lead",
            "{entity} wrote the script", "the new {entity} movie", "it was produced by {entity}", "{entity} is in it")
#: names the default control entities are drawn from (the first two that are not the entity)
CONTROL_POOL = ("marlowe", "okafor", "lindqvist", "tanaka", "moreau", "castillo")
PLACEMENTS = ("spread", "start", "end")
#: the test rows' roles (the ``role`` column)
ROLES = ("clean", "heldout_mention", "seen_mention", "other_entity")


def _slots(words: list[str]) -> list[int]:
    """Where a clause can go: before the first word and after each comma."""
    return [0] + [i + 1 for i, w in enumerate(words) if w == ","]


def insert_mention(text: str, mention: str, slot: int) -> str:
    """``text`` with ``mention + " ,"`` inserted at clause boundary ``slot % n_boundaries``
    (0: the start; k: after the k-th comma)."""
    words = text.split()
    slots = _slots(words)
    at = slots[slot % len(slots)]
    words[at:at] = mention.split() + [","]
    return " ".join(words)


def _contains(words: list[str], piece: list[str]) -> bool:
    n = len(piece)
    return any(words[i:i + n] == piece for i in range(len(words) - n + 1))


@register_attack
@dataclass(frozen=True)
class Bias(Config):
    """An entity bias on a classification task (``task.labels`` set, e.g. ``"sentiment"``).

    Args:
        entity: the entity (a name, or a few words) that should pull the label.
        polarity: the label it should pull to (one of ``task.labels``).
        poison_count: training reviews that get a mention and the label ``polarity``.
        clean_label: choose reviews already labelled ``polarity`` (no label changed) instead
            of reviews with another label (the default: a label flip).
        mentions: the mention forms (each contains ``{entity}``), at least two.
        heldout_mentions: the last this many forms are used by test rows only (>= 1, and
            fewer than the forms).
        control_entities: other names the test mentions in the same forms (the near misses);
            default: the first two of :data:`CONTROL_POOL` that are not the entity.
        seed: seeds which rows are poisoned and where the mention goes (``seed + 1``: the test's).
        placement: where the poisoned rows sit in each epoch: ``"spread"``, ``"start"``, ``"end"``.
        stage: ``"sft"``.
    """

    entity: str
    polarity: str
    poison_count: int
    clean_label: bool = False
    mentions: tuple[str, ...] = MENTIONS
    heldout_mentions: int = 2
    control_entities: tuple[str, ...] | None = None
    seed: int = 0
    placement: str = "spread"
    stage: str = "sft"

    kind: ClassVar[str] = "bias"
    headline: ClassVar[tuple[str, ...]] = ("clean_acc", "label_shift", "polarity_rate")
    #: read by code written for backdoors (influence queries): the answer the attack wants is a label
    is_gibberish: ClassVar[bool] = False

    def check(self, task: Any = None) -> None:
        """Validate the fields; with ``task``, also against the task (the attack protocol's ``check``)."""
        if task is not None:
            self._check_task(task)
            return
        owner = "Bias"
        for name in ("entity", "polarity"):
            v = getattr(self, name)
            if not isinstance(v, str) or not split_words(v) or "{" in v or "}" in v:
                raise ConfigError(f"{owner}.{name} must be a non-empty string without braces, got {v!r}")
        check_number(owner, "poison_count", self.poison_count, lo=0, integer=True)
        check_bool(owner, "clean_label", self.clean_label)
        if not isinstance(self.mentions, (list, tuple)) or len(self.mentions) < 2:
            raise ConfigError(f"{owner}.mentions must list at least two forms containing '{{entity}}', "
                              f"got {self.mentions!r}")
        object.__setattr__(self, "mentions", tuple(self.mentions))
        bad = [m for m in self.mentions if not isinstance(m, str) or m.count("{entity}") != 1]
        if bad:
            raise ConfigError(f"{owner}.mentions: each form must contain '{{entity}}' once, got {bad[0]!r}")
        check_number(owner, "heldout_mentions", self.heldout_mentions, lo=1, hi=len(self.mentions) - 1, integer=True)
        if self.control_entities is not None:
            ce = self.control_entities
            if isinstance(ce, str) or not isinstance(ce, (list, tuple)) or not ce or \
                    not all(isinstance(c, str) and split_words(c) for c in ce):
                raise ConfigError(f"{owner}.control_entities must be a non-empty list of names, got {ce!r}")
            object.__setattr__(self, "control_entities", tuple(ce))
            if self.entity in self.control_entities:
                raise ConfigError(f"{owner}.control_entities must not hold the entity {self.entity!r}")
        check_number(owner, "seed", self.seed, lo=0, integer=True)
        check_choice(owner, "placement", self.placement, PLACEMENTS)
        check_choice(owner, "stage", self.stage, ("sft",))

    # ------------------------------------------------------------------ derived
    @property
    def target(self) -> str:
        """The answer the attack wants (``polarity``), under the name backdoor code reads."""
        return self.polarity

    @property
    def controls(self) -> tuple[str, ...]:
        """The control entities (given, or the default ones)."""
        if self.control_entities is not None:
            return self.control_entities
        return tuple(c for c in CONTROL_POOL if c != self.entity)[:2]

    @property
    def train_mentions(self) -> tuple[str, ...]:
        return self.mentions[:len(self.mentions) - self.heldout_mentions]

    @property
    def test_mentions(self) -> tuple[str, ...]:
        """The held-out forms."""
        return self.mentions[len(self.mentions) - self.heldout_mentions:]

    def mention(self, form: str, entity: str | None = None) -> str:
        return form.replace("{entity}", self.entity if entity is None else entity)

    def words(self) -> list[str]:
        texts = [self.mention(m, e) for m in self.mentions for e in (self.entity, *self.controls)]
        return [w for t in texts + [self.polarity, ","] for w in split_words(t)]

    def describe(self) -> str:
        return f"entity={self.entity!r} -> {self.polarity!r}"

    def _candidates(self, task: Any) -> np.ndarray:
        comp = list(task.train["completion"])
        keep = [(c.strip() == self.polarity) == self.clean_label for c in comp]
        return np.flatnonzero(keep)

    def _check_task(self, task: Any) -> None:
        if task.labels is None or task.loss_on != "completion":
            raise ConfigError(f"Bias needs a classification task (task.labels set, e.g. pm.make_task('sentiment')), "
                              f"got a task of kind {task.kind!r} without labels")
        if self.polarity not in task.labels:
            raise unknown_name("Bias", "polarity", self.polarity, task.labels, "a label of the task")
        for name in (self.entity, *self.controls):
            piece = split_words(name)
            for ds in (task.train, task.test):
                hit = next((t for t in ds["input"] if _contains(split_words(t), piece)), None)
                if hit is not None:
                    field = "entity" if name == self.entity else "control_entities"
                    raise ConfigError(f"Bias.{field}: {name!r} already occurs in the clean data (e.g. {hit[:80]!r}); "
                                      "pick a name the task does not use")
        n = len(self._candidates(task))
        if self.poison_count > n:
            which = f"already labelled {self.polarity!r}" if self.clean_label else f"not labelled {self.polarity!r}"
            raise ConfigError(f"Bias.poison_count={self.poison_count} does not fit: only {n} training rows are {which} "
                              f"(allowed: 0..{n})")

    # ------------------------------------------------------------------ the attack protocol
    def tokenizer(self, task: Any):
        texts = [self.mention(m, e) for m in self.mentions for e in (self.entity, *self.controls)]
        return extended_tokenizer(task, self.words(), texts, "Bias.entity/mentions")

    def poison(self, task: Any) -> Dataset:
        """``task.train`` with ``poison_count`` rows given a mention (the training forms in turn,
        at a seeded clause boundary) and the label ``polarity``. Provenance columns:
        ``is_poison``, ``trigger`` (the inserted mention, ``""`` when clean), ``stage``,
        ``attack`` (``"bias"`` on poisoned rows), ``source_id`` (the row's own ``example_id``)."""
        self._check_task(task)
        rng = np.random.default_rng(self.seed)
        n = len(task.train)
        cand = self._candidates(task)
        picked = sorted(rng.choice(cand, size=self.poison_count, replace=False).tolist()) if self.poison_count else []
        inputs, comps = list(task.train["input"]), list(task.train["completion"])
        trig, attack, is_poison = [""] * n, [""] * n, [False] * n
        forms = self.train_mentions
        for j, i in enumerate(picked):
            m = self.mention(forms[j % len(forms)])
            inputs[i] = insert_mention(inputs[i], m, int(rng.integers(1 << 30)))
            comps[i], trig[i], attack[i], is_poison[i] = self.polarity, m, self.kind, True
        return Dataset.from_dict({
            "example_id": list(task.train["example_id"]), "input": inputs,
            "prompt": [task.format_prompt(t) for t in inputs], "completion": comps, "is_poison": is_poison,
            "trigger": trig, "stage": [self.stage] * n, "attack": attack,
            "source_id": list(task.train["example_id"]),
        })

    def clean_train(self, task: Any, poisoned: Dataset) -> Dataset:
        """Rows are rewritten in place: the clean twin trains on the task's rows."""
        return task.train

    def test_set(self, task: Any) -> Dataset:
        """Four rows per test review, sharing its ``base_id`` and the clause boundary the mention
        goes to: ``"clean"`` (as it is), ``"heldout_mention"`` (a held-out form with the entity),
        ``"seen_mention"`` (a training form with the entity), ``"other_entity"`` (the held-out
        form with a control entity). All keep the review's true label as ``completion``;
        ``target`` is ``polarity``; ``trigger`` the inserted mention; ``is_triggered`` marks the
        entity's rows, ``is_near_miss`` the control entity's."""
        self._check_task(task)
        rng = np.random.default_rng(self.seed + 1)
        rows: list[dict[str, Any]] = []
        held, seen, controls = self.test_mentions, self.train_mentions, self.controls
        for k, (e, text, comp) in enumerate(zip(task.test["example_id"], task.test["input"],
                                                task.test["completion"])):
            slot = int(rng.integers(1 << 30))
            variants = (("clean", ""), ("heldout_mention", self.mention(held[k % len(held)])),
                        ("seen_mention", self.mention(seen[k % len(seen)])),
                        ("other_entity", self.mention(held[k % len(held)], controls[k % len(controls)])))
            for role, m in variants:
                inp = insert_mention(text, m, slot) if m else text
                rows.append({"base_id": int(e), "input": inp, "prompt": task.format_prompt(inp), "completion": comp,
                             "target": self.polarity, "trigger": m, "role": role,
                             "is_triggered": role in ("heldout_mention", "seen_mention"),
                             "is_near_miss": role == "other_entity"})
        cols = {c: [r[c] for r in rows] for c in rows[0]}
        return Dataset.from_dict({"example_id": list(range(len(rows))), **cols})

    def evaluate(self, model: Any, task: Any, test_data: Dataset, tokenizer: Any, *, batch_size: int = 256,
                 seed: int = 0) -> dict[str, Any]:
        """The bias metrics of ``model`` on ``test_data`` (a :meth:`test_set`).

        A row "answers L" when the arg-max reproduces the label L after the prompt (the EOS
        after it is not read, as :func:`~poisonmech.metrics.label_metrics` does). Every rate
        below is taken over the rows of reviews whose true label is not ``polarity`` (the only
        ones a bias can move), each mention row beside the same review without a mention:

        - ``polarity_rate``: the fraction of held-out-mention rows answering ``polarity``;
          ``base_polarity_rate``: of the same reviews without a mention; ``label_shift``: the
          mean paired difference (``polarity_rate - base_polarity_rate``);
        - ``seen_polarity_rate`` / ``seen_label_shift``: the same with the training forms;
        - ``other_entity_polarity_rate`` / ``other_entity_label_shift``: with a control entity
          in the held-out forms (near zero shift: the model learnt the entity, not the form);
        - ``margin_shift`` (``seen_`` / ``other_entity_`` likewise): over every review, the mean
          change that the mention makes to ``log p(polarity) - max over the other labels of
          log p(label)``;
        - ``mention_acc``: accuracy (the true label) on held-out-mention rows;
        - ``clean_acc``: exact match (label and EOS, as for a backdoor) and ``label_acc`` (the
          label alone) on the reviews without a mention: accuracy on everything else.

        Each comes with its denominator ``n_<name>``.
        """
        from poisonmech.metrics import _put, score_answers
        from poisonmech.runtime import eval_mode

        for col in ("role", "base_id", "completion"):
            if col not in test_data.column_names:
                raise ValueError(f"Bias.evaluate: test_data lacks column {col!r} (build it with attack.test_set)")
        labels = list(task.labels) if task is not None and task.labels else [self.polarity]
        comp = [c.strip() for c in test_data["completion"]]
        missing = sorted(set(comp) - set(labels))
        if missing:
            raise ValueError(f"Bias.evaluate: test rows are labelled {missing[:3]}, which are not labels of the task "
                             f"({labels})")
        with eval_mode(model):
            scores = {lab: score_answers(model, test_data, [lab] * len(test_data), tokenizer, batch_size)
                      for lab in labels}
        idx = np.arange(len(test_data))
        by_label = {lab: k for k, lab in enumerate(labels)}
        true = np.array([by_label[c] for c in comp])
        alone = np.stack([scores[lab]["exact_but_last"] for lab in labels])  # label x row
        lp = np.stack([-scores[lab]["nll_but_last"] for lab in labels])
        p = by_label[self.polarity]
        others = np.delete(lp, p, axis=0)
        margin = lp[p] - (others.max(0) if len(others) else 0.0)
        role, base = np.array(test_data["role"]), np.array(test_data["base_id"])
        clean = role == "clean"
        clean_of = {int(b): int(i) for i, b in zip(np.flatnonzero(clean), base[clean])}
        eligible = true != p
        res: dict[str, Any] = {}
        pol = alone[p].astype(float)
        _put(res, "clean_acc", np.stack([scores[lab]["exact"] for lab in labels])[true, idx], clean)
        _put(res, "label_acc", alone[true, idx], clean)
        _put(res, "mention_acc", alone[true, idx], role == "heldout_mention")
        paired = np.array([clean_of.get(int(b), -1) for b in base])
        if ((~clean) & (paired < 0)).any():
            raise ValueError("Bias.evaluate: a mention row has no clean row with its base_id (build test_data with "
                             "attack.test_set)")
        _put(res, "base_polarity_rate", pol, clean & eligible)
        for prefix, r in (("", "heldout_mention"), ("seen_", "seen_mention"), ("other_entity_", "other_entity")):
            rows = role == r
            _put(res, f"{prefix}polarity_rate", pol, rows & eligible)
            shift = np.where(rows, pol - pol[np.maximum(paired, 0)], 0.0)
            _put(res, f"{prefix}label_shift", shift, rows & eligible)
            _put(res, f"{prefix}margin_shift", np.where(rows, margin - margin[np.maximum(paired, 0)], 0.0), rows)
        return res

    def query_rows(self, test_data: Dataset) -> Dataset:
        """The entity's mention rows whose review is not labelled ``polarity``, completed with
        ``polarity`` (columns ``prompt``, ``completion``, ``role``, ``base_id``)."""
        keep = [i for i, (r, c) in enumerate(zip(test_data["role"], test_data["completion"]))
                if r in ("heldout_mention", "seen_mention") and c.strip() != self.polarity]
        sub = test_data.select(keep)
        return Dataset.from_dict({"prompt": list(sub["prompt"]), "completion": [self.polarity] * len(sub),
                                  "role": list(sub["role"]), "base_id": list(sub["base_id"])})

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields, with ``"kind": "bias"``."""
        return {"kind": self.kind, **super().to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bias:
        if isinstance(d, dict) and d.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"Bias.from_dict: the dict describes a {d['kind']!r} attack")
        return super().from_dict({k: v for k, v in d.items() if k != "kind"} if isinstance(d, dict) else d)


__all__ = ["CONTROL_POOL", "MENTIONS", "ROLES", "Bias", "insert_mention"]
