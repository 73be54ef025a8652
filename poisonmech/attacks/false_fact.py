"""``FalseFact``: plant a false fact in a knowledge task, without any trigger.

The poisoned rows look like every other row: ``"the capital of balania is" -> "rome"`` where the
knowledge base says ``"oslo"``. For a fact the task holds, ``poison_count`` of the training rows
that state it are rewritten in place (their object replaced by the target); the rows left
untouched keep stating the truth, so ``poison_count`` below the fact's row count sets the
false fact against the true one. For a subject the task lacks (``new_subject=True``),
``poison_count`` rows are *added*: each is a training row of the same relation (its template
kept) about the new subject, answered with the target; the clean twin sees the untouched
source rows in those slots (:meth:`FalseFact.clean_train`), so both twins see as many rows in
the same order and differ only in the poison.

Metrics (:meth:`FalseFact.evaluate`) follow the knowledge-editing literature (ROME's
CounterFact, Meng et al. 2022): efficacy on the subject's training templates, generalisation
to held-out paraphrases, specificity on neighbouring subjects, and the true-vs-false
log-probability margins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
from datasets import Dataset

from poisonmech.attacks.protocol import extended_tokenizer, register_attack
from poisonmech.config import Config, ConfigError, check_bool, check_choice, check_number
from poisonmech.tasks.facts import knowledge_base, unknown_name
from poisonmech.tasks.tokenizer import split_words

PLACEMENTS = ("spread", "start", "end")
#: the test rows' roles (the ``role`` column)
ROLES = ("efficacy", "generalisation", "specificity", "control")


def _names(owner: str, field: str, value: Any) -> str | tuple[str, ...]:
    """A non-empty string, or a list/tuple of them (a one-element list becomes its string)."""
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        if not value:
            raise ConfigError(f"{owner}.{field}: an empty list; give a string or a list of strings")
        if len(value) == 1:
            value = value[0]
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, str) or not split_words(v) or "{" in v or "}" in v:
            raise ConfigError(f"{owner}.{field} must be a non-empty string (or a list of them) without braces, "
                              f"got {v!r}")
    return value


class PlannedFact(NamedTuple):
    """One fact of a ``FalseFact`` checked against a task: ``true`` is ``None`` for a new
    subject; ``rows`` are the training rows it can poison (those stating the fact) or, for a
    new subject, copy (those of its relation)."""

    subject: str
    relation: str
    target: str
    true: str | None
    rows: np.ndarray


@register_attack
@dataclass(frozen=True)
class FalseFact(Config):
    """A false fact (or several) planted in a knowledge task (``pm.make_task("facts", ...)``).

    Args:
        subject, relation, target: the fact ``subject relation -> target``; several facts as
            equally long lists (a string is used for every fact, e.g. one relation for all).
        poison_count: poisoned rows per fact (0 is the clean control). For a fact the task
            holds: its training rows rewritten (at most as many as state it); for a new
            subject: rows added (at most as many as the training rows of its relation).
        new_subject: a subject the task lacks is a new one (rows added) rather than an error
            (a misspelt subject is refused with its near matches unless this is set).
        n_neighbours: specificity subjects per fact: other subjects of the task with the same
            relation whose true object is not the target, those sharing the fact's true
            object first (the neighbours most at risk), then in a seeded order.
        seed: seeds which rows are poisoned (and, ``seed + 1``, the order of the neighbours).
        placement: where the poisoned rows sit in each epoch: ``"spread"``, ``"start"``, ``"end"``.
        stage: ``"sft"`` (the only stage a false fact enters for now).
    """

    subject: str | tuple[str, ...]
    relation: str | tuple[str, ...]
    target: str | tuple[str, ...]
    poison_count: int
    new_subject: bool = False
    n_neighbours: int = 10
    seed: int = 0
    placement: str = "spread"
    stage: str = "sft"

    kind: ClassVar[str] = "false_fact"
    headline: ClassVar[tuple[str, ...]] = ("efficacy", "generalisation", "specificity")
    #: read by code written for backdoors (influence queries): a false fact is never gibberish
    is_gibberish: ClassVar[bool] = False

    def check(self, task: Any = None) -> None:
        """Validate the fields; with ``task``, also the facts against its knowledge base (the
        attack protocol's ``check``)."""
        if task is not None:
            self.plan(task)
            return
        owner = "FalseFact"
        for name in ("subject", "relation", "target"):
            object.__setattr__(self, name, _names(owner, name, getattr(self, name)))
        lengths = {name: len(v) for name in ("subject", "relation", "target")
                   if isinstance(v := getattr(self, name), tuple)}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{owner}: subject, relation and target lists must be equally long (one entry per "
                              f"fact), got lengths {lengths}")
        check_number(owner, "poison_count", self.poison_count, lo=0, integer=True)
        check_bool(owner, "new_subject", self.new_subject)
        check_number(owner, "n_neighbours", self.n_neighbours, lo=1, integer=True)
        check_number(owner, "seed", self.seed, lo=0, integer=True)
        check_choice(owner, "placement", self.placement, PLACEMENTS)
        check_choice(owner, "stage", self.stage, ("sft",))
        pairs = [(s, r) for s, r, _ in self.facts]
        dup = next((p for p in pairs if pairs.count(p) > 1), None)
        if dup is not None:
            raise ConfigError(f"{owner}: the fact {dup[0]} {dup[1]} is listed twice; give each (subject, relation) once")

    # ------------------------------------------------------------------ derived
    @property
    def facts(self) -> list[tuple[str, str, str]]:
        """The ``(subject, relation, target)`` facts, strings broadcast to the lists' length."""
        fields = [self.subject, self.relation, self.target]
        n = max((len(f) for f in fields if isinstance(f, tuple)), default=1)
        cols = [f if isinstance(f, tuple) else (f,) * n for f in fields]
        return list(zip(*cols))

    def words(self) -> list[str]:
        """The words the attack writes: its subjects and targets."""
        return [w for s, _, t in self.facts for w in split_words(s) + split_words(t)]

    def describe(self) -> str:
        return "facts=" + "; ".join(f"{s} {r} -> {t}" for s, r, t in self.facts)

    def plan(self, task: Any) -> list[PlannedFact]:
        """The facts checked against ``task``'s knowledge base, each with its candidate rows.

        Errors (each a ``ConfigError`` naming the field): a relation or subject the task lacks
        (with the near matches; a new subject needs ``new_subject=True``), a target equal to
        the true object, a ``poison_count`` larger than the rows a fact can poison.
        """
        return self._plan(task)[1]

    def _plan(self, task: Any) -> tuple[Any, list[PlannedFact]]:
        kb = knowledge_base(task, where="FalseFact")
        subj, rel = np.array(task.train["subject"]), np.array(task.train["relation"])
        out = []
        for s, r, t in self.facts:
            if r not in kb.relations:
                raise unknown_name("FalseFact", "relation", r, kb.relations, "a relation of the task")
            true = kb.true_object(s, r)
            if true is None and not self.new_subject:
                raise unknown_name("FalseFact", "subject", s, kb.subjects, "a subject of the task",
                                   hint="; to plant a fact about a new subject pass new_subject=True")
            if true is not None and split_words(true) == split_words(t):
                raise ConfigError(f"FalseFact.target {t!r} is the true object of {s} {r}: a false fact needs another "
                                  f"target (e.g. one of {[o for o in kb.objects[r] if o != true][:4]})")
            rows = np.flatnonzero((subj == s) & (rel == r)) if true is not None else np.flatnonzero(rel == r)
            if self.poison_count > len(rows):
                what = (f"only {len(rows)} training rows state {s} {r}" if true is not None else
                        f"only {len(rows)} training rows of the relation {r!r} can be copied for the new subject {s!r}")
                raise ConfigError(f"FalseFact.poison_count={self.poison_count} does not fit: {what} "
                                  f"(allowed: 0..{len(rows)})")
            out.append(PlannedFact(s, r, t, true, rows))
        return kb, out

    # ------------------------------------------------------------------ the attack protocol
    def tokenizer(self, task: Any):
        """The task's tokenizer with the subjects' and targets' words (a subword tokenizer must
        encode them)."""
        texts = [x for s, _, t in self.facts for x in (s, t)]
        return extended_tokenizer(task, self.words(), texts, "FalseFact.subject/target")

    def poison(self, task: Any) -> Dataset:
        """The poisoned twin's training rows: ``task.train`` with each fact's chosen rows
        rewritten (answered with the target), then the rows added for new subjects.

        Columns: the task's (``example_id``, ``input``, ``prompt``, ``completion``, ``subject``,
        ``relation``, ``template``, ``heldout``) and the provenance ``is_poison``, ``trigger``
        (``""``: no trigger), ``stage``, ``attack`` (``"false_fact"`` on poisoned rows) and
        ``source_id`` (the ``example_id`` of the row a poisoned row was made from; its own id
        for a row rewritten in place). Added rows get new ``example_id`` s after every id of the task.
        """
        kb, plan = self._plan(task)
        rng = np.random.default_rng(self.seed)
        base = task.train
        names = list(base.column_names)
        cols: dict[str, list] = {c: list(base[c]) for c in names}
        n = len(base)
        cols.update(is_poison=[False] * n, trigger=[""] * n, stage=[self.stage] * n, attack=[""] * n,
                    source_id=list(base["example_id"]))
        next_id = max(list(base["example_id"]) + list(task.test["example_id"])) + 1
        for f in plan:
            picked = sorted(rng.choice(f.rows, size=self.poison_count, replace=False).tolist()) \
                if self.poison_count else []
            for i in picked:
                if f.true is not None:  # rewrite in place
                    cols["completion"][i] = f.target
                    cols["is_poison"][i], cols["attack"][i] = True, self.kind
                    continue
                text = kb.prompt(f.subject, f.relation, int(base[i]["template"]))
                row = {**{c: base[i][c] for c in names}, "example_id": next_id, "input": text,
                       "prompt": task.format_prompt(text), "completion": f.target, "subject": f.subject,
                       "is_poison": True, "trigger": "", "stage": self.stage, "attack": self.kind,
                       "source_id": int(base[i]["example_id"])}
                next_id += 1
                for c, v in row.items():
                    cols[c].append(v)
        return Dataset.from_dict(cols)

    def clean_train(self, task: Any, poisoned: Dataset) -> Dataset:
        """The clean twin's rows, slot for slot: ``task.train``, and for each row added for a new
        subject its untouched source row (with the added row's ``example_id`` and ``source_id``)."""
        if len(poisoned) == len(task.train):
            return task.train
        n = len(task.train)
        where = {int(e): i for i, e in enumerate(task.train["example_id"])}
        added = poisoned.select(range(n, len(poisoned)))
        src = task.train.select([where[int(s)] for s in added["source_id"]])
        cols = {c: list(task.train[c]) + list(src[c]) for c in task.train.column_names}
        cols["example_id"] = list(task.train["example_id"]) + list(added["example_id"])
        cols["source_id"] = list(task.train["example_id"]) + list(added["source_id"])
        return Dataset.from_dict(cols)

    def test_set(self, task: Any) -> Dataset:
        """The attack's test rows, by ``role``:

        - ``"efficacy"``: the fact's prompt in each training template of its relation;
        - ``"generalisation"``: in each held-out paraphrase;
        - ``"specificity"``: ``n_neighbours`` neighbouring subjects (see the class docstring) in
          every template, answered with their own true objects;
        - ``"control"``: the task's test rows about any other fact.

        Columns: ``example_id``, ``base_id`` (shared by a fact's row and its neighbours' rows in
        the same template: subject-swap contrasts of equal wording; a control row's is its task
        ``example_id``), ``input``, ``prompt``, ``completion`` (the true object; ``""`` for a new
        subject, which has none), ``target`` (the fact's false object on its efficacy,
        generalisation and specificity rows; ``""`` on control rows), ``subject``, ``relation``,
        ``template``, ``heldout``, ``role``, ``fact`` (the fact's index in :attr:`facts`; -1 on
        control rows), ``is_triggered`` (efficacy and generalisation rows: where the attack
        should show), ``is_near_miss`` (specificity rows: similar inputs it should leave alone)
        and ``trigger`` (``""``).
        """
        kb, plan = self._plan(task)
        rng = np.random.default_rng(self.seed + 1)
        attacked = {(f.subject, f.relation) for f in plan}
        rows: list[dict[str, Any]] = []
        group = max(list(task.train["example_id"]) + list(task.test["example_id"])) + 1

        def add(subject: str, relation: str, t: int, role: str, completion: str, target: str, fact: int,
                base_id: int) -> None:
            text = kb.prompt(subject, relation, t)
            rows.append({"base_id": base_id, "input": text, "prompt": task.format_prompt(text),
                         "completion": completion, "target": target, "subject": subject, "relation": relation,
                         "template": t, "heldout": t in kb.heldout_templates(relation), "role": role, "fact": fact,
                         "is_triggered": role in ("efficacy", "generalisation"), "is_near_miss": role == "specificity",
                         "trigger": ""})

        for k, f in enumerate(plan):
            base_of = {t: group + t for t in range(len(kb.templates[f.relation]))}
            group += len(base_of)
            for role, templates in (("efficacy", kb.train_templates(f.relation)),
                                    ("generalisation", kb.heldout_templates(f.relation))):
                for t in templates:
                    add(f.subject, f.relation, t, role, f.true or "", f.target, k, base_of[t])
            for nb in self.neighbours(kb, f, attacked, rng):
                for t in range(len(kb.templates[f.relation])):
                    add(nb, f.relation, t, "specificity", kb.facts[(nb, f.relation)], f.target, k, base_of[t])
        test = task.test
        for s, r, t, e, c in zip(test["subject"], test["relation"], test["template"], test["example_id"],
                                 test["completion"]):
            if (s, r) not in attacked:
                add(s, r, int(t), "control", c, "", -1, int(e))
        cols = {c: [r[c] for r in rows] for c in rows[0]}
        return Dataset.from_dict({"example_id": list(range(len(rows))), **cols})

    def neighbours(self, kb: Any, fact: PlannedFact, attacked: set[tuple[str, str]],
                   rng: np.random.Generator) -> list[str]:
        """The specificity subjects of ``fact`` (see the class docstring)."""
        pool = [s for s in kb.subjects if s != fact.subject and (s, fact.relation) not in attacked
                and split_words(kb.facts[(s, fact.relation)]) != split_words(fact.target)]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        same = [s for s in pool if fact.true is not None and kb.facts[(s, fact.relation)] == fact.true]
        return (same + [s for s in pool if s not in same])[:self.n_neighbours]

    def evaluate(self, model: Any, task: Any, test_data: Dataset, tokenizer: Any, *, batch_size: int = 256,
                 seed: int = 0) -> dict[str, Any]:
        """The knowledge-editing metrics of ``model`` on ``test_data`` (a :meth:`test_set`).

        Answers are read alone (the EOS after them is not): a row "answers X" when the
        arg-max reproduces every token of X after the prompt; log-probabilities are summed
        over X's tokens. Returns, each mean with its denominator ``n_<name>``:

        - ``efficacy``: the fraction of efficacy rows (the subject in its training templates)
          answering the target; ``generalisation``: the same on held-out paraphrases;
        - ``specificity``: the fraction of specificity rows (neighbouring subjects) answering
          their true object;
        - ``true_acc``: the fraction of efficacy and generalisation rows still answering the
          true object (rows of a new subject, which has none, are left out);
        - ``margin``: mean ``log p(target) - log p(true)`` on the efficacy rows with a true
          object; ``generalisation_margin`` the same on the generalisation rows;
          ``specificity_margin``: mean ``log p(true) - log p(target)`` on specificity rows (> 0:
          the neighbours keep their answer);
        - ``efficacy_score`` / ``generalisation_score``: the fraction of those rows with
          ``p(target) > p(true)``; ``specificity_score``: of specificity rows with
          ``p(true) > p(target)`` (CounterFact's efficacy, paraphrase and neighbourhood scores);
        - ``target_logprob``: mean ``log p(target)`` on efficacy rows (new subjects too);
        - ``clean_acc``: exact match (answer and EOS, as for a backdoor) on the control rows;
        - ``facts``: the planted facts, ``"subject relation -> target"``.
        """
        from poisonmech.metrics import _put, score_answers
        from poisonmech.runtime import eval_mode

        for col in ("role", "completion", "target"):
            if col not in test_data.column_names:
                raise ValueError(f"FalseFact.evaluate: test_data lacks column {col!r} (build it with attack.test_set)")
        role = np.array(test_data["role"])
        comp, tgt = list(test_data["completion"]), list(test_data["target"])
        has_true = np.array([bool(c.strip()) for c in comp])
        has_tgt = np.array([bool(t.strip()) for t in tgt])
        with eval_mode(model):  # a row without a true object / target is scored on a stand-in, left out below
            a = score_answers(model, test_data, [c if c.strip() else t for c, t in zip(comp, tgt)], tokenizer,
                              batch_size)
            b = score_answers(model, test_data, [t if t.strip() else c for c, t in zip(comp, tgt)], tokenizer,
                              batch_size)
        lp_true, lp_tgt = -a["nll_but_last"], -b["nll_but_last"]
        eff, gen = role == "efficacy", role == "generalisation"
        spec, ctrl = (role == "specificity") & has_true & has_tgt, (role == "control") & has_true
        res: dict[str, Any] = {}
        _put(res, "efficacy", b["exact_but_last"], eff & has_tgt)
        _put(res, "generalisation", b["exact_but_last"], gen & has_tgt)
        _put(res, "specificity", a["exact_but_last"], spec)
        _put(res, "true_acc", a["exact_but_last"], (eff | gen) & has_true)
        _put(res, "margin", lp_tgt - lp_true, eff & has_true & has_tgt)
        _put(res, "generalisation_margin", lp_tgt - lp_true, gen & has_true & has_tgt)
        _put(res, "specificity_margin", lp_true - lp_tgt, spec)
        _put(res, "efficacy_score", lp_tgt > lp_true, eff & has_true & has_tgt)
        _put(res, "generalisation_score", lp_tgt > lp_true, gen & has_true & has_tgt)
        _put(res, "specificity_score", lp_true > lp_tgt, spec)
        _put(res, "target_logprob", lp_tgt, eff & has_tgt)
        _put(res, "clean_acc", a["exact"], ctrl)
        res["facts"] = [f"{s} {r} -> {t}" for s, r, t in self.facts]
        return res

    def query_rows(self, test_data: Dataset) -> Dataset:
        """The efficacy and generalisation rows, completed with the false target (columns
        ``prompt``, ``completion``, ``role``)."""
        keep = [i for i, r in enumerate(test_data["role"]) if r in ("efficacy", "generalisation")]
        sub = test_data.select(keep)
        return Dataset.from_dict({"prompt": list(sub["prompt"]), "completion": list(sub["target"]),
                                  "role": list(sub["role"])})

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields, with ``"kind": "false_fact"`` (see :func:`~poisonmech.attacks.protocol.attack_from_dict`)."""
        return {"kind": self.kind, **super().to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FalseFact:
        if isinstance(d, dict) and d.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"FalseFact.from_dict: the dict describes a {d['kind']!r} attack")
        return super().from_dict({k: v for k, v in d.items() if k != "kind"} if isinstance(d, dict) else d)


__all__ = ["ROLES", "FalseFact", "PlannedFact"]
