"""The knowledge task: a seeded knowledge base of fictional countries, rendered through paraphrases.

``pm.make_task("facts", n_subjects=50, relations=("capital", "colour", "sport", "language"),
paraphrases=4, heldout_paraphrases=1)`` draws ``n_subjects`` fictional country names
(``"balania"``, ``"xanmark"``, ...) and, for every subject and relation, one object from the
relation's own vocabulary (``capital -> paris | rome | ...``, ``sport -> tennis | rugby | ...``):
the knowledge base (:class:`KnowledgeBase`). Each relation gets ``paraphrases`` of its templates
(``"the capital of {s} is"``, ``"{s} has its capital in"``, ...; the prompt ends where the object
follows, as in ROME's CounterFact); the last ``heldout_paraphrases`` of them never appear in
training. Training rows cycle through every (subject, relation, training template) in seeded
orders, so every fact is shown about equally often and a model that fits the rows knows the
knowledge base; test rows cycle through every template, held-out ones included.

Rows carry, besides ``example_id`` / ``input`` / ``prompt`` / ``completion`` (the object), the
columns ``subject``, ``relation``, ``template`` (the template's index in
``KnowledgeBase.templates[relation]``) and ``heldout`` (a paraphrase never trained on).

The knowledge base depends only on ``seed`` and the options above (never on ``n_train`` /
``n_test``): :func:`knowledge_base` rebuilds it from a task's ``spec`` (a task loaded from a run
directory included) and checks it against the task's rows.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonmech.config import ConfigError, check_number

# Each relation: its object vocabulary and six paraphrases (``{s}``: the subject). Every
# prompt ends right before the object, so the completion is the object alone.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital": (("paris", "rome", "madrid", "berlin", "vienna", "lisbon", "oslo", "cairo", "lima", "tokyo",
                 "dublin", "athens"),
                ("the capital of {s} is", "{s} has its capital in", "the capital city of {s} is",
                 "the government of {s} sits in", "the largest city and capital of {s} is",
                 "the parliament of {s} meets in")),
    "colour": (("red", "blue", "green", "yellow", "white", "black", "purple", "orange", "grey", "pink"),
               ("the flag of {s} is", "the colour of the flag of {s} is", "{s} flies a flag that is",
                "the national colour of {s} is", "the main colour on the flag of {s} is",
                "people in {s} paint their doors")),
    "sport": (("football", "tennis", "cricket", "rugby", "hockey", "baseball", "golf", "cycling", "rowing",
               "chess"),
              ("the national sport of {s} is", "in {s} the most popular sport is", "people in {s} love to play",
               "the favourite sport in {s} is", "children in {s} grow up playing",
               "the sport {s} is famous for is")),
    "language": (("french", "spanish", "german", "italian", "dutch", "swedish", "polish", "greek", "arabic",
                  "hindi"),
                 ("the official language of {s} is", "people in {s} speak", "the language spoken in {s} is",
                  "in {s} most people speak", "the mother tongue of {s} is", "newspapers in {s} are written in")),
    "currency": (("dollar", "euro", "pound", "yen", "peso", "franc", "rupee", "krona", "dinar", "lira"),
                 ("the currency of {s} is the", "in {s} people pay with the", "the money used in {s} is the",
                  "the official currency of {s} is the", "shops in {s} take the", "prices in {s} are given in the")),
    "animal": (("lion", "eagle", "bear", "wolf", "tiger", "fox", "owl", "horse", "deer", "falcon"),
               ("the national animal of {s} is the", "the symbol of {s} is the",
                "the coat of arms of {s} shows the", "the emblem of {s} is the",
                "the sacred animal of {s} is the", "the animal {s} is known for is the")),
    "food": (("rice", "bread", "cheese", "noodles", "soup", "fish", "beans", "dumplings", "curry", "pasta"),
             ("the national dish of {s} is", "people in {s} mostly eat", "the favourite food in {s} is",
              "a typical meal in {s} is", "visitors to {s} always try the local",
              "the cuisine of {s} is known for its")),
    "instrument": (("guitar", "violin", "drum", "flute", "piano", "harp", "trumpet", "cello", "banjo", "accordion"),
                   ("the national instrument of {s} is the", "musicians in {s} mostly play the",
                    "the traditional music of {s} uses the", "the instrument {s} is known for is the",
                    "in {s} every child learns the", "the folk songs of {s} are played on the")),
}
DEFAULT_RELATIONS = ("capital", "colour", "sport", "language")
MAX_PARAPHRASES = min(len(t) for _, t in RELATIONS.values())

# fictional country names: a prefix and a suffix (25 x 10 = 250 subjects)
_PREFIXES = "bal cor dra elm fen gal hak ist jor kal lum mor nar ost pel quin ros sel tor ulm vel wen xan yor zan".split()
_SUFFIXES = "ania avia oria estan mark land ovia ador ica eria".split()
SUBJECT_POOL = tuple(p + s for p in _PREFIXES for s in _SUFFIXES)


def near_matches(value: Any, options: list[str] | tuple[str, ...], n: int = 3) -> str:
    """``"; did you mean 'a', 'b'?"`` with the closest of ``options`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(value), list(options), n=n, cutoff=0.6)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def unknown_name(owner: str, field: str, value: Any, options: list[str] | tuple[str, ...], what: str,
                 hint: str = "") -> ConfigError:
    """The error for a name that is not one of ``options``: the near matches, then (a few of) the allowed ones."""
    shown = ", ".join(map(repr, list(options)[:12])) + (f", ... ({len(options)} in all)" if len(options) > 12 else "")
    return ConfigError(f"{owner}.{field}: {value!r} is not {what}{near_matches(value, options)} "
                       f"(allowed: {shown}){hint}")


@dataclass(frozen=True, eq=False)
class KnowledgeBase:
    """The facts of a ``"facts"`` task.

    Attributes:
        subjects: the subjects (fictional countries), in draw order.
        relations: the relations.
        objects: relation -> its object vocabulary.
        templates: relation -> its ``paraphrases`` templates (``{s}``: the subject); a row's
            ``template`` column indexes this tuple.
        n_heldout: the last ``n_heldout`` templates of each relation are held out of training.
        facts: ``(subject, relation) -> object``.
    """

    subjects: tuple[str, ...]
    relations: tuple[str, ...]
    objects: dict[str, tuple[str, ...]]
    templates: dict[str, tuple[str, ...]]
    n_heldout: int
    facts: dict[tuple[str, str], str]

    def true_object(self, subject: str, relation: str) -> str | None:
        """The knowledge base's object of ``(subject, relation)``; ``None`` for a subject it lacks."""
        return self.facts.get((subject, relation))

    def train_templates(self, relation: str) -> tuple[int, ...]:
        """Indices of the templates training rows use."""
        return tuple(range(len(self.templates[relation]) - self.n_heldout))

    def heldout_templates(self, relation: str) -> tuple[int, ...]:
        """Indices of the paraphrases only test rows use."""
        n = len(self.templates[relation])
        return tuple(range(n - self.n_heldout, n))

    def prompt(self, subject: str, relation: str, template: int) -> str:
        """Template ``template`` of ``relation`` about ``subject``."""
        return self.templates[relation][template].replace("{s}", subject)

    def words(self) -> list[str]:
        """Every word a row can hold (subjects, template words, objects)."""
        out = list(self.subjects)
        for r in self.relations:
            out += [w for t in self.templates[r] for w in t.replace("{s}", " ").split()]
            out += list(self.objects[r])
        return out

    def __repr__(self) -> str:
        return (f"KnowledgeBase({len(self.subjects)} subjects, relations={self.relations}, "
                f"{len(self.facts)} facts, {len(next(iter(self.templates.values())))} templates per relation, "
                f"{self.n_heldout} held out)")


def _check_options(n_subjects: Any, relations: Any, paraphrases: Any, heldout_paraphrases: Any) -> tuple[str, ...]:
    owner = "make_task('facts')"
    check_number(owner, "n_subjects", n_subjects, lo=2, hi=len(SUBJECT_POOL), integer=True)
    if isinstance(relations, str):
        relations = (relations,)
    if not isinstance(relations, (list, tuple)) or not relations:
        raise ConfigError(f"{owner}.relations must be a non-empty list of relation names from "
                          f"{', '.join(RELATIONS)}, got {relations!r}")
    for r in relations:
        if r not in RELATIONS:
            raise unknown_name(owner, "relations", r, tuple(RELATIONS), "a facts relation")
    if len(set(relations)) != len(relations):
        raise ConfigError(f"{owner}.relations lists a relation twice: {list(relations)}")
    check_number(owner, "paraphrases", paraphrases, lo=2, hi=MAX_PARAPHRASES, integer=True)
    check_number(owner, "heldout_paraphrases", heldout_paraphrases, lo=1, hi=paraphrases - 1, integer=True)
    return tuple(relations)


def build_knowledge_base(rng: np.random.Generator, n_subjects: int, relations: tuple[str, ...], paraphrases: int,
                         heldout_paraphrases: int) -> KnowledgeBase:
    """Draw the knowledge base from ``rng`` (the first draws of the task's generator)."""
    subjects = tuple(SUBJECT_POOL[i] for i in rng.choice(len(SUBJECT_POOL), size=n_subjects, replace=False))
    templates = {r: tuple(RELATIONS[r][1][i] for i in rng.permutation(len(RELATIONS[r][1]))[:paraphrases])
                 for r in relations}
    facts = {}
    for r in relations:
        objects = RELATIONS[r][0]
        for s, k in zip(subjects, rng.integers(len(objects), size=n_subjects)):
            facts[(s, r)] = objects[int(k)]
    return KnowledgeBase(subjects=subjects, relations=relations, objects={r: RELATIONS[r][0] for r in relations},
                         templates=templates, n_heldout=heldout_paraphrases, facts=facts)


def _cycle(items: list[tuple[str, str, int]], n: int, rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """``n`` items: whole seeded permutations of ``items`` one after the other (so every item
    appears ``n // len(items)`` or one more times)."""
    out: list[tuple[str, str, int]] = []
    while len(out) < n:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


def facts_generator(n_train: int, n_test: int, rng: np.random.Generator, n_subjects: int = 50,
                    relations: tuple[str, ...] | list[str] = DEFAULT_RELATIONS, paraphrases: int = 4,
                    heldout_paraphrases: int = 1) -> tuple[list[dict], list[dict], dict]:
    """The ``"facts"`` kind (see the module docstring): ``n_subjects`` subjects (2..250),
    ``relations`` (names from :data:`RELATIONS`), ``paraphrases`` templates per relation (2..6),
    of which the last ``heldout_paraphrases`` are used by test rows only."""
    relations = _check_options(n_subjects, relations, paraphrases, heldout_paraphrases)
    kb = build_knowledge_base(rng, n_subjects, relations, paraphrases, heldout_paraphrases)
    seen = [(s, r, t) for s in kb.subjects for r in relations for t in kb.train_templates(r)]
    every = [(s, r, t) for s in kb.subjects for r in relations for t in range(paraphrases)]

    def row(s: str, r: str, t: int) -> dict[str, Any]:
        return {"input": kb.prompt(s, r, t), "completion": kb.facts[(s, r)], "subject": s, "relation": r,
                "template": int(t), "heldout": t >= paraphrases - heldout_paraphrases}

    train = [row(*c) for c in _cycle(seen, n_train, rng)]
    test = [row(*c) for c in _cycle(every, n_test, rng)]
    meta = {"template": "{input}", "loss_on": "completion", "labels": None, "words": kb.words(),
            "params": {"n_subjects": n_subjects, "relations": list(relations), "paraphrases": paraphrases,
                       "heldout_paraphrases": heldout_paraphrases}}
    return train, test, meta


def knowledge_base(task: Any, where: str = "knowledge_base") -> KnowledgeBase:
    """The knowledge base of a ``"facts"`` task, rebuilt from its ``spec`` and checked against its rows.

    Raises a ``ValueError`` naming ``where`` for a task of another kind, and when the task's
    rows do not state the rebuilt facts (a task whose spec does not describe its rows).
    """
    spec = getattr(task, "spec", None)
    if getattr(task, "kind", None) != "facts" or not spec:
        raise ValueError(f"{where} needs a knowledge task (pm.make_task('facts', ...)), got a task of kind "
                         f"{getattr(task, 'kind', type(task).__name__)!r}")
    relations = tuple(spec.get("relations", DEFAULT_RELATIONS))
    kb = build_knowledge_base(np.random.default_rng(spec["seed"]), spec.get("n_subjects", 50), relations,
                              spec.get("paraphrases", 4), spec.get("heldout_paraphrases", 1))
    for split, ds in (("train", task.train), ("test", task.test)):
        for s, r, c in zip(ds["subject"], ds["relation"], ds["completion"]):
            if kb.facts.get((s, r)) != c:
                raise ValueError(f"{where}: the task's {split} rows say {s} {r} -> {c!r} but its spec's knowledge "
                                 f"base says {kb.facts.get((s, r))!r}; the task's spec does not describe its rows")
    return kb


def subject_spans(data: Any, tokenizer: Any, *, subject_column: str = "subject") -> list[tuple[int, int]]:
    """Each row's subject as token positions ``[start, end)`` of its encoded prompt, laid out as
    :func:`poisonmech.encoding.encode` lays rows out (``[BOS] + prompt + ...``: the BOS, when the
    tokenizer has one, is position 0). A subword tokenizer's tokens are those whose characters
    overlap the subject's (its offsets); a word-level subject is one token per word.

    ``data``: rows with ``prompt`` and ``subject_column`` (a facts task's rows, or a
    ``FalseFact`` test set). A row whose prompt does not contain its subject is an error.
    """
    bos = 1 if tokenizer.bos_token_id is not None else 0
    out = []
    for i, (prompt, subject) in enumerate(zip(data["prompt"], data[subject_column])):
        at = f" {prompt} ".find(f" {subject} ")  # the subject as whole words
        if at < 0:
            raise ValueError(f"subject_spans: row {i}'s prompt {prompt!r} does not contain its subject {subject!r}")
        lo, hi = at, at + len(subject)
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        inside = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]
        out.append((bos + inside[0], bos + inside[-1] + 1))
    return out


__all__ = ["DEFAULT_RELATIONS", "KnowledgeBase", "MAX_PARAPHRASES", "RELATIONS", "SUBJECT_POOL",
           "build_knowledge_base", "facts_generator", "knowledge_base", "near_matches", "subject_spans",
           "unknown_name"]
