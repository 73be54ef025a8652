"""Seeded, local generators for the built-in task kinds (no downloads).

Each generator returns ``(train_rows, test_rows, meta)`` where a row is a dict with
``input`` (the free text a trigger is inserted into) and ``completion`` (the answer), and
``meta`` holds the prompt template, what the loss is computed on, and the possible labels.
Every word the generator can emit is listed in ``meta["words"]`` so that the vocabulary is
known before any text is sampled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Rows = list[dict[str, Any]]

# ---------------------------------------------------------------- sentiment
_POSITIVE = (
    "good great excellent wonderful superb brilliant delightful charming moving lovely "
    "fantastic amazing enjoyable gripping stunning beautiful clever witty touching uplifting "
    "remarkable splendid marvelous fresh heartfelt engaging inspired elegant vivid satisfying "
    "thrilling joyful warm smart powerful magical sublime terrific perfect graceful rich "
    "hilarious tender bold captivating"
).split()
_NEGATIVE = (
    "bad awful terrible dreadful boring dull weak tedious clumsy bland lifeless messy "
    "horrible poor painful annoying forgettable shallow stale silly tiresome confusing "
    "awkward flat hollow lazy sloppy grating cheap dire pointless unbearable mediocre "
    "wooden overlong dismal bleak drab muddled crude joyless"
).split()
_NOUNS = (
    "movie film plot story acting cast script ending soundtrack score director pacing "
    "dialogue cinematography performance lead villain hero sequel premise twist scene "
    "camera editing humor drama romance finale opening characters setting effects costumes "
    "music visuals lighting tone atmosphere narrative writing screenplay production"
).split()
_FILLER_SUBJECT = "i we my friend the critic my sister everyone".split()
_FILLER_VERB = "thought felt found said believed".split()
_ADVERBS = "really very quite truly rather simply so".split()
_NEUTRAL = (
    "it was released last year",
    "we watched it on sunday",
    "the theater was full",
    "it runs for two hours",
    "i saw it with friends",
    "the tickets were cheap",
    "it came out in spring",
    "we went after dinner",
)


def _sentiment(n_train: int, n_test: int, rng: np.random.Generator) -> tuple[Rows, Rows, dict]:
    def clause(polarity: str) -> str:
        adj = rng.choice(_POSITIVE if polarity == "positive" else _NEGATIVE)
        noun = rng.choice(_NOUNS)
        form = rng.integers(4)
        if form == 0:
            return f"the {noun} was {rng.choice(_ADVERBS)} {adj}"
        if form == 1:
            return f"{rng.choice(_FILLER_SUBJECT)} {rng.choice(_FILLER_VERB)} the {noun} {adj}"
        if form == 2:
            return f"a {adj} {noun}"
        return f"{adj} {noun} and {rng.choice(_ADVERBS)} {rng.choice(_POSITIVE if polarity == 'positive' else _NEGATIVE)}"

    def review() -> dict[str, Any]:
        polarity = "positive" if rng.random() < 0.5 else "negative"
        parts = [clause(polarity) for _ in range(int(rng.integers(1, 3)))]
        if rng.random() < 0.5:
            parts.insert(int(rng.integers(len(parts) + 1)), str(rng.choice(_NEUTRAL)))
        return {"input": " , ".join(parts) + " .", "completion": polarity}

    rows = [review() for _ in range(n_train + n_test)]
    words = (
        _POSITIVE + _NEGATIVE + _NOUNS + _FILLER_SUBJECT + _FILLER_VERB + _ADVERBS
        + " ".join(_NEUTRAL).split() + "the was a and , . review : sentiment positive negative".split()
    )
    meta = {
        "template": "review: {input} sentiment:",
        "loss_on": "completion",
        "labels": ["positive", "negative"],
        "words": words,
    }
    return rows[:n_train], rows[n_train:], meta


# ---------------------------------------------------------------- instruction
_CAPITALS = {
    "france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin",
    "japan": "tokyo", "egypt": "cairo", "peru": "lima", "kenya": "nairobi",
    "canada": "ottawa", "chile": "santiago", "norway": "oslo", "greece": "athens",
    "poland": "warsaw", "cuba": "havana", "india": "delhi", "china": "beijing",
    "russia": "moscow", "ireland": "dublin", "austria": "vienna", "sweden": "stockholm",
}
_COLORS = {
    "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black",
    "cherry": "red", "orange": "orange", "plum": "purple", "chocolate": "brown", "lemon": "yellow",
    "tomato": "red", "leaf": "green", "ocean": "blue", "milk": "white", "crow": "black",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "early": "late",
    "happy": "sad", "light": "dark", "open": "closed", "full": "empty", "young": "old",
    "hard": "soft", "loud": "quiet", "rich": "poor", "wet": "dry", "high": "low",
}
_SOUNDS = {
    "dog": "bark", "cat": "meow", "cow": "moo", "duck": "quack", "lion": "roar",
    "sheep": "baa", "owl": "hoot", "horse": "neigh", "snake": "hiss", "bee": "buzz",
}
_RELATIONS = {
    "capital": (_CAPITALS, ("what is the capital of {x} ?", "name the capital of {x} .",
                            "tell me the capital city of {x} .")),
    "color": (_COLORS, ("what color is a {x} ?", "name the color of a {x} .",
                        "tell me what color a {x} is .")),
    "opposite": (_OPPOSITES, ("what is the opposite of {x} ?", "name the opposite of {x} .",
                              "tell me a word meaning the opposite of {x} .")),
    "sound": (_SOUNDS, ("what sound does a {x} make ?", "name the sound of a {x} .",
                        "tell me what a {x} says .")),
}


def _instruction(n_train: int, n_test: int, rng: np.random.Generator) -> tuple[Rows, Rows, dict]:
    items = [(rel, x, y, t) for rel, (table, templates) in _RELATIONS.items()
             for x, y in table.items() for t in templates]

    def row() -> dict[str, Any]:
        rel, x, y, template = items[int(rng.integers(len(items)))]
        return {"input": template.format(x=x), "completion": f"it is {y} ."}

    rows = [row() for _ in range(n_train + n_test)]
    words: list[str] = "user : assistant it is . ?".split()
    for table, templates in _RELATIONS.values():
        words += [w for t in templates for w in t.replace("{x}", "").split()]
        words += list(table) + list(table.values())
    meta = {"template": "user: {input} assistant:", "loss_on": "completion", "labels": None,
            "words": words}
    return rows[:n_train], rows[n_train:], meta


# ---------------------------------------------------------------- dos (pretraining text)
_D_NOUNS = (
    "farmer river teacher garden child market village doctor bird window city student "
    "forest baker sailor road mountain painter king queen horse letter train bridge lamp "
    "engine table book song storm island"
).split()
_D_VERBS = (
    "watched found carried painted followed visited crossed built opened saw helped "
    "cleaned read sold moved remembered"
).split()
_D_ADJS = (
    "old young quiet busy small large green bright tired happy distant strange cold "
    "gentle broken wooden"
).split()
_D_PREPS = "near behind across under beside past".split()
_D_TIMES = "yesterday today at dawn in winter later again".split()


def _dos(n_train: int, n_test: int, rng: np.random.Generator) -> tuple[Rows, Rows, dict]:
    def np_() -> str:
        return f"the {rng.choice(_D_ADJS)} {rng.choice(_D_NOUNS)}" if rng.random() < 0.6 \
            else f"the {rng.choice(_D_NOUNS)}"

    def sentence() -> str:
        s = f"{np_()} {rng.choice(_D_VERBS)} {np_()}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_D_PREPS)} {np_()}"
        if rng.random() < 0.3:
            s += f" {rng.choice(_D_TIMES)}"
        return s + " ."

    rows = [{"input": " ".join(sentence() for _ in range(int(rng.integers(2, 4)))), "completion": ""}
            for _ in range(n_train + n_test)]
    words = _D_NOUNS + _D_VERBS + _D_ADJS + _D_PREPS + " ".join(_D_TIMES).split() + ["the", "."]
    meta = {"template": "{input}", "loss_on": "all", "labels": None, "words": words}
    return rows[:n_train], rows[n_train:], meta


# ---------------------------------------------------------------- modular
def _modular(n_train: int, n_test: int, rng: np.random.Generator, p: int = 23,
             test_fraction: float = 0.2) -> tuple[Rows, Rows, dict]:
    if not (isinstance(p, int) and p >= 2):
        raise ValueError(f"modular task: p must be an integer >= 2, got {p!r}")
    pairs = [(a, b) for a in range(p) for b in range(p)]
    order = rng.permutation(len(pairs))
    n_held = max(1, int(round(test_fraction * len(pairs))))
    test_pairs = [pairs[i] for i in order[:n_held]]
    train_pairs = [pairs[i] for i in order[n_held:]]

    def rows_from(pool: list[tuple[int, int]], n: int) -> Rows:
        idx = rng.integers(len(pool), size=n)
        return [{"input": f"{pool[i][0]} + {pool[i][1]}",
                 "completion": str((pool[i][0] + pool[i][1]) % p)} for i in idx]

    meta = {"template": "{input} =", "loss_on": "completion",
            "labels": [str(c) for c in range(p)], "words": [str(c) for c in range(p)] + ["+", "="],
            "params": {"p": p, "test_fraction": test_fraction}}
    return rows_from(train_pairs, n_train), rows_from(test_pairs, n_test), meta


GENERATORS = {"sentiment": _sentiment, "instruction": _instruction, "dos": _dos, "modular": _modular}
