"""Real English text from Debian packages, as ``datasets.Dataset`` rows of plain text.

Two corpora that CI installs with ``apt-get`` (nothing is downloaded at run time):

- ``wordnet-base``: the WordNet 3.0 database under ``/usr/share/wordnet``. Each synset line of
  ``data.noun`` / ``data.verb`` / ``data.adj`` / ``data.adv`` ends with ``| gloss`` where the
  gloss is one or more definitions followed by quoted example sentences:
  ``| without musical accompaniment; "they performed a cappella"``.
- ``fortunes``: the fortune-cookie files under ``/usr/share/games/fortunes`` (quotations,
  jokes, short stories), entries separated by lines holding only ``%``.

Every reader returns a Dataset with columns ``text`` and ``source`` (where the row came from,
e.g. ``"wordnet/noun/gloss"`` or ``"fortunes/literature"``), which ``pm.make_task`` takes as
plain-text rows (``loss_on="all"``). Rows are read in a fixed order (the files in order, each
file top to bottom), exact duplicates are dropped (the first is kept), then the rows are
shuffled with ``seed`` (``seed=None`` keeps the file order) and cut to ``max_rows``.

The parsers are written here because no installed library reads these files as text rows:
NLTK's WordNet reader wants its own download of the corpus, and nothing in Python reads fortune
files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset

from poisonmech.tasks.base import check_int, check_seed

WORDNET_PATH = "/usr/share/wordnet"
FORTUNES_PATH = "/usr/share/games/fortunes"
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
WORDNET_KINDS = ("both", "glosses", "examples")
#: fortune files left out by default: ``translate-me`` is Latin, French, ... with translations
FORTUNES_NOT_ENGLISH = ("translate-me",)
#: an entry whose non-space characters are less than this fraction letters is ASCII art or
#: a table, not prose (prose is about 0.8 letters; the art in ``ascii-art`` is below 0.4)
MIN_LETTER_FRACTION = 0.6

WordNetKind = Literal["both", "glosses", "examples"]

# An example sentence starts with a quote at the start of the gloss or after ";" or ":"
# (a few glosses write "definition: "example""); quotes elsewhere in a definition are kept
# as text ("(especially in the phrase "make strides")").
_EXAMPLE_START = re.compile(r'(?:^|[;:])\s*"')
_NEXT_EXAMPLE = re.compile(r';\s*(?=")')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+|(?<=[.!?]["\')\]])\s+')


def _norm(text: str) -> str:
    return " ".join(text.split())


def _check_path(path: str | Path, what: str, package: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {str(p)!r} is not a folder; install Debian's {package} package "
                                f"(apt-get install {package}) or pass the folder that holds it")
    return p


def _finish(texts: list[str], sources: list[str], max_rows: int | None, seed: int | None, where: str,
            name: str = "max_rows", exact: bool = False) -> Dataset:
    """Drop exact duplicates (keeping the first), shuffle with ``seed`` (None: keep the order),
    keep the first ``max_rows`` (``exact``: more than there are is an error)."""
    if max_rows is not None:
        max_rows = check_int(f"{where}: {name}", max_rows, 1)
    if seed is not None:
        seed = check_seed(f"{where}: seed", seed)
    seen: set[str] = set()
    keep = [i for i, t in enumerate(texts) if not (t in seen or seen.add(t))]
    if seed is not None:
        keep = [keep[i] for i in np.random.default_rng(seed).permutation(len(keep))]
    if exact and max_rows is not None and max_rows > len(keep):
        raise ValueError(f"{where}: {name}={max_rows} but the corpora hold {len(keep)} distinct rows")
    if max_rows is not None:
        keep = keep[:max_rows]
    return Dataset.from_dict({"text": [texts[i] for i in keep], "source": [sources[i] for i in keep]})


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """A WordNet gloss as ``(definition, examples)``, whitespace normalised.

    The definition is the text before the first quoted example; each example is the text of
    one quoted sentence, without its quotes and without an attribution after the closing
    quote (``"the evil that men do lives after them"- Shakespeare``). The database has a few
    malformed examples (a quote missing or doubled, ~20 of its ~117k synsets): an example whose
    piece holds another quote after its closing one is dropped, so no example contains ``"``.
    """
    m = _EXAMPLE_START.search(gloss)
    if m is None:
        return _norm(gloss).strip(" ;:,"), []
    definition = _norm(gloss[:m.start()]).strip(" ;:,")
    examples = []
    for piece in _NEXT_EXAMPLE.split(gloss[m.end() - 1:]):
        piece = piece.strip()
        if not piece.startswith('"'):
            continue
        body, _, rest = piece[1:].partition('"')
        if '"' in rest:  # malformed: quotes do not pair up
            continue
        body = _norm(body)
        if body:
            examples.append(body)
    return definition, examples


def wordnet_text(path: str | Path = WORDNET_PATH, *, parts: Sequence[str] = WORDNET_PARTS,
                 kind: WordNetKind = "both", max_rows: int | None = None, seed: int | None = 0) -> Dataset:
    """WordNet 3.0's definitions and example sentences as text rows.

    Args:
        path: the folder holding ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``
            (Debian's ``wordnet-base``).
        parts: which parts of speech, in this order (any of ``"noun"``, ``"verb"``, ``"adj"``,
            ``"adv"``).
        kind: ``"glosses"`` (one row per synset definition, e.g. "without musical
            accompaniment"), ``"examples"`` (one row per example sentence, e.g. "they performed
            a cappella") or ``"both"`` (each synset's definition then its examples).
        max_rows: keep at most this many rows (after the shuffle: a seeded sample); None: all.
        seed: the shuffle; ``None`` keeps the file order.

    Returns a Dataset with ``text`` and ``source`` (``"wordnet/<part>/gloss"`` or
    ``"wordnet/<part>/example"``), duplicates dropped. The licence header of each file (its
    lines start with two spaces) is skipped.
    """
    texts, sources = _wordnet_rows(path, parts, kind)
    return _finish(texts, sources, max_rows, seed, "wordnet_text")


def _wordnet_rows(path: str | Path, parts: Sequence[str], kind: str) -> tuple[list[str], list[str]]:
    """:func:`wordnet_text`'s rows in file order, duplicates kept: ``(texts, sources)``."""
    where = "wordnet_text"
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    bad = [p for p in parts if p not in WORDNET_PARTS]
    if bad or not parts:
        raise ValueError(f"{where}: parts must be a non-empty selection of {WORDNET_PARTS}, got {parts!r}")
    if kind not in WORDNET_KINDS:
        raise ValueError(f"{where}: kind must be one of {WORDNET_KINDS}, got {kind!r}")
    folder = _check_path(path, "WordNet data", "wordnet-base")
    texts: list[str] = []
    sources: list[str] = []
    for part in parts:
        file = folder / f"data.{part}"
        if not file.is_file():
            raise FileNotFoundError(f"{where}: {str(file)!r} is missing from the WordNet folder {str(folder)!r} "
                                    "(apt-get install wordnet-base)")
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  ") or "|" not in line:  # the licence header; no gloss
                    continue
                definition, examples = split_gloss(line.split("|", 1)[1])
                if kind != "examples" and definition:
                    texts.append(definition)
                    sources.append(f"wordnet/{part}/gloss")
                if kind != "glosses":
                    texts.extend(examples)
                    sources.extend([f"wordnet/{part}/example"] * len(examples))
    return texts, sources


def _typed(line: str) -> str:
    """A line as it prints: a backspace deletes the character before it (old fortunes
    underline or strike out by overtyping, ``____\\b\\b\\b\\bBODY``), other control
    characters (the terminal bell) are dropped."""
    if not _CONTROL.search(line):
        return line
    out: list[str] = []
    for c in line:
        if c == "\b":
            if out:
                out.pop()
        elif c == "\t" or not _CONTROL.match(c):
            out.append(c)
    return "".join(out)


def fortune_entries(text: str) -> list[str]:
    """The entries of one fortune file: the blocks between lines holding only ``%``, as they
    print (:func:`_typed`), whitespace normalised (an attribution line such as
    ``-- Mark Twain`` stays in its entry), empty ones dropped."""
    entries, block = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append(_norm(" ".join(block)))
            block = []
        else:
            block.append(_typed(line))
    entries.append(_norm(" ".join(block)))
    return [e for e in entries if e]


def is_prose(text: str, min_letters: float = MIN_LETTER_FRACTION) -> bool:
    """Whether at least ``min_letters`` of the non-space characters are letters (ASCII art,
    tables and code are not)."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= min_letters


def chunk_words(text: str, max_words: int) -> list[str]:
    """``text`` in pieces of at most ``max_words`` words, cut at sentence ends (after ``.``,
    ``!`` or ``?``) where possible: sentences are packed greedily; a sentence longer than
    ``max_words`` is cut every ``max_words`` words."""
    if len(text.split()) <= max_words:
        return [text]
    chunks: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        if current and len(current) + len(words) > max_words:
            chunks.append(" ".join(current))
            current = []
        while len(words) > max_words:
            chunks.append(" ".join(words[:max_words]))
            words = words[max_words:]
        current.extend(words)
    if current:
        chunks.append(" ".join(current))
    return chunks


def _fortune_files(folder: Path) -> list[Path]:
    """The fortune files of ``folder`` in name order: files, not the ``.dat`` indexes nor the
    ``.u8`` copies (links to the same text), not subfolders (so not the offensive ``off/``);
    two names of one file count once."""
    out, seen = [], set()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix not in (".dat", ".u8") and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def fortune_text(path: str | Path = FORTUNES_PATH, *, files: Sequence[str] | None = None, max_words: int | None = 60,
                 max_rows: int | None = None, seed: int | None = 0) -> Dataset:
    """The fortune-cookie files as text rows (Debian's ``fortunes``).

    Args:
        path: the folder of fortune files.
        files: which files by name (``["literature", "science"]``), in this order; None: every
            fortune file of the folder in name order except :data:`FORTUNES_NOT_ENGLISH`
            (never the ``.dat`` indexes, the ``.u8`` copies or the ``off/`` subfolder).
        max_words: a longer entry is cut into pieces of at most this many words at sentence
            ends (:func:`chunk_words`; one row per piece); None keeps entries whole (the
            longest stories run to several hundred words).
        max_rows: keep at most this many rows (after the shuffle: a seeded sample); None: all.
        seed: the shuffle; ``None`` keeps the file order.

    Whitespace is normalised (line breaks and indents become single spaces); empty entries,
    rows that are mostly not letters (ASCII art, code: :func:`is_prose`) and duplicates are
    dropped. ``source`` is ``"fortunes/<file>"``.
    """
    texts, sources = _fortune_rows(path, files, max_words)
    return _finish(texts, sources, max_rows, seed, "fortune_text")


def _fortune_rows(path: str | Path, files: Sequence[str] | None, max_words: int | None
                  ) -> tuple[list[str], list[str]]:
    """:func:`fortune_text`'s rows in file order, duplicates kept: ``(texts, sources)``."""
    where = "fortune_text"
    if max_words is not None:
        max_words = check_int(f"{where}: max_words", max_words, 1)
    folder = _check_path(path, "fortune files", "fortunes")
    available = {p.name: p for p in _fortune_files(folder)}
    if not available:
        raise FileNotFoundError(f"{where}: no fortune files in {str(folder)!r} (apt-get install fortunes)")
    if files is None:
        chosen = [p for name, p in available.items() if name not in FORTUNES_NOT_ENGLISH]
    else:
        if isinstance(files, str):
            files = (files,)
        unknown = [f for f in files if f not in available]
        if unknown or not files:
            raise ValueError(f"{where}: files must be a non-empty selection of the fortune files in "
                             f"{str(folder)!r}; unknown: {unknown}; available: {sorted(available)}")
        chosen = [available[f] for f in files]
    texts: list[str] = []
    sources: list[str] = []
    for file in chosen:
        # the Debian files are UTF-8; anything undecodable becomes U+FFFD rather than failing
        for entry in fortune_entries(file.read_text(encoding="utf-8", errors="replace")):
            pieces = [entry] if max_words is None else chunk_words(entry, max_words)
            pieces = [p for p in pieces if is_prose(p)]
            texts.extend(pieces)
            sources.extend([f"fortunes/{file.name}"] * len(pieces))
    return texts, sources


def english_text(n: int | None = None, seed: int | None = 0, *, wordnet_path: str | Path = WORDNET_PATH,
                 fortunes_path: str | Path = FORTUNES_PATH) -> Dataset:
    """Both corpora in one Dataset: WordNet's definitions and examples (:func:`wordnet_text`,
    ``kind="both"``), then the fortunes (:func:`fortune_text`, pieces of at most 60 words),
    duplicates across the two dropped, shuffled with ``seed`` (None: that fixed order).

    ``n``: the number of rows (a seeded sample); None: all of them (~180k short rows with both
    packages installed). More than there are is a ValueError naming how many there are.
    """
    w_texts, w_sources = _wordnet_rows(wordnet_path, WORDNET_PARTS, "both")
    f_texts, f_sources = _fortune_rows(fortunes_path, None, 60)
    texts, sources = w_texts + f_texts, w_sources + f_sources
    return _finish(texts, sources, n, seed, "english_text", name="n", exact=True)


__all__ = ["FORTUNES_NOT_ENGLISH", "FORTUNES_PATH", "MIN_LETTER_FRACTION", "WORDNET_KINDS", "WORDNET_PARTS",
           "WORDNET_PATH", "chunk_words", "english_text", "fortune_entries", "fortune_text", "is_prose", "split_gloss",
           "wordnet_text"]
