"""The real-English-text readers: WordNet glosses and examples, fortune files.

The parser tests run on small synthetic files written to ``tmp_path`` (always); the tests on
the real Debian data skip unless ``wordnet-base`` / ``fortunes`` are installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from poisonmech.tasks.corpora import (
    FORTUNES_PATH,
    WORDNET_PATH,
    chunk_words,
    english_text,
    fortune_entries,
    fortune_text,
    is_prose,
    split_gloss,
    wordnet_text,
)

HAS_WORDNET = Path(WORDNET_PATH, "data.noun").is_file()
HAS_FORTUNES = Path(FORTUNES_PATH).is_dir()
needs_wordnet = pytest.mark.skipif(not HAS_WORDNET, reason=f"WordNet data not at {WORDNET_PATH}: "
                                   "apt-get install wordnet-base")
needs_fortunes = pytest.mark.skipif(not HAS_FORTUNES, reason=f"fortune files not at {FORTUNES_PATH}: "
                                    "apt-get install fortunes")

LICENCE = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  By obtaining, using  
  3   
  4 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  
"""


def _wordnet_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "wordnet"
    folder.mkdir()
    (folder / "data.noun").write_text(LICENCE + (
        '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known; '
        '"an entity of its own"; "the entity exists"  \n'
        '00002137 03 n 02 abstraction 0 000 | a general concept (often in the phrase "in the abstract")  \n'
        '00002452 03 n 01 thing 0 000 | a separate entity; "the evil that men do lives after them; the good is '
        'oft interred with their bones"- Shakespeare; "a broken"quote"  \n'
        '00002684 03 n 01 object 0 000 | a tangible entity: "it was full of objects"  \n'
        '00003000 03 n 01 entity2 0 000 | that which is perceived or known; "the entity exists"  \n'),
        encoding="utf-8")
    (folder / "data.adv").write_text(LICENCE + (
        '00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  \n'),
        encoding="utf-8")
    return folder


def _fortune_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "fortunes"
    folder.mkdir()
    long_story = " ".join(f"Sentence number {i} has six words." for i in range(30))  # 180 words
    (folder / "wisdom").write_text(
        "A fool and his money\n\tare soon parted.\n%\n%\n"
        "   \n%\n"
        "( /\\__/\\ )\n \\(^ @_@ ^)/\n -( \"\"\"\" )\n%\n"
        f"{long_story}\n%\n"
        "whole ____\b\b\b\bBODY!\a\n%\n"
        "A fool and his money are soon parted.\n",  # a duplicate after normalisation; no final %
        encoding="utf-8")
    (folder / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    os.symlink("wisdom", folder / "wisdom.u8")
    (folder / "science").write_text("E = mc^2, they say.\n%\nThe universe is big. -- Anon\n", encoding="utf-8")
    (folder / "off").mkdir()
    (folder / "off" / "rude").write_text("Something offensive.\n", encoding="utf-8")
    return folder


# ------------------------------------------------------------------ parsers (synthetic files)

def test_split_gloss_definition_and_examples():
    assert split_gloss(' without musical accompaniment; "they performed a cappella"  \n') == \
        ("without musical accompaniment", ["they performed a cappella"])
    # attribution after the closing quote dropped; a ";" inside a quote is kept
    d, ex = split_gloss(' duty; "every right implies a responsibility; every possession, a duty"- J. D. Rockefeller')
    assert d == "duty" and ex == ["every right implies a responsibility; every possession, a duty"]
    # a quote inside the definition stays in it; ":" also starts the examples
    assert split_gloss(' progress (in the phrase "make strides"); "big strides"') == \
        ('progress (in the phrase "make strides")', ["big strides"])
    assert split_gloss(' act of assembling: "mobilization of the troops"') == \
        ("act of assembling", ["mobilization of the troops"])
    # malformed quotes: that example is dropped, the others kept; an unterminated last one kept
    assert split_gloss(' goods; "she loaded the car"women carrying"; "ok"; "a notice of sale') == \
        ("goods", ["ok", "a notice of sale"])
    assert split_gloss(" no examples here ") == ("no examples here", [])


def test_wordnet_reader_on_a_small_folder(tmp_path):
    folder = _wordnet_folder(tmp_path)
    ds = wordnet_text(folder, parts=("noun",), seed=None)
    assert ds.column_names == ["text", "source"]
    assert ds["text"] == ["that which is perceived or known", "an entity of its own", "the entity exists",
                          'a general concept (often in the phrase "in the abstract")', "a separate entity",
                          "the evil that men do lives after them; the good is oft interred with their bones",
                          "a tangible entity", "it was full of objects"]  # the 5th synset: duplicates only
    assert ds["source"][:2] == ["wordnet/noun/gloss", "wordnet/noun/example"]
    assert not any("Princeton" in t or "LICENSEE" in t for t in ds["text"])
    glosses = wordnet_text(folder, parts="noun", kind="glosses", seed=None)
    assert set(glosses["source"]) == {"wordnet/noun/gloss"} and len(glosses) == 4
    ex = wordnet_text(folder, parts=("noun", "adv"), kind="examples", seed=None)
    assert set(ex["source"]) == {"wordnet/noun/example", "wordnet/adv/example"} and len(ex) == 5
    assert not any('"' in t for t in ex["text"])
    # parts in the order given
    assert wordnet_text(folder, parts=("adv", "noun"), seed=None)["text"][0] == "without musical accompaniment"


def test_wordnet_seed_and_max_rows(tmp_path):
    folder, parts = _wordnet_folder(tmp_path), ("noun", "adv")
    ordered = wordnet_text(folder, parts=parts, seed=None)["text"]
    a, b = (wordnet_text(folder, parts=parts, seed=1)["text"] for _ in range(2))
    assert a == b and sorted(a) == sorted(ordered)
    assert any(wordnet_text(folder, parts=parts, seed=s)["text"] != ordered for s in range(2, 6))
    assert wordnet_text(folder, parts=parts, seed=1, max_rows=3)["text"] == a[:3]
    assert len(wordnet_text(folder, parts=parts, max_rows=10_000)) == len(ordered)  # at most


def test_wordnet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install wordnet-base"):
        wordnet_text(tmp_path / "nowhere")
    folder = _wordnet_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data\.verb.*apt-get install wordnet-base"):
        wordnet_text(folder)  # the default parts include the verbs, missing here
    with pytest.raises(ValueError, match=r"kind must be one of \('both', 'glosses', 'examples'\)"):
        wordnet_text(folder, parts="noun", kind="sentences")
    with pytest.raises(ValueError, match="parts must be a non-empty selection of.*'adverb'"):
        wordnet_text(folder, parts=("noun", "adverb"))
    with pytest.raises(ValueError, match="parts"):
        wordnet_text(folder, parts=())
    with pytest.raises(ValueError, match="max_rows must be an integer >= 1"):
        wordnet_text(folder, parts="noun", max_rows=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        wordnet_text(folder, parts="noun", seed=1.5)


def test_fortune_helpers():
    assert fortune_entries("a\n b\n%\n\n%\nc\n") == ["a b", "c"]
    assert fortune_entries("x ____\b\b\b\bBODY\a y\n") == ["x BODY y"]  # overtyping as it prints
    assert is_prose("A fool and his money are soon parted.")
    assert not is_prose("( /\\__/\\ ) \\(^ @_@ ^)/") and not is_prose("")
    text = " ".join(["One two three four."] * 5)  # 20 words, 5 sentences
    assert chunk_words(text, 8) == ["One two three four. One two three four."] * 2 + ["One two three four."]
    assert chunk_words(text, 100) == [text]
    assert chunk_words("a b c d e f g", 3) == ["a b c", "d e f", "g"]  # one long sentence: cut by words


def test_fortune_reader_on_a_small_folder(tmp_path):
    folder = _fortune_folder(tmp_path)
    ds = fortune_text(folder, seed=None)
    texts = ds["text"]
    # files in name order (science, wisdom); not .dat, .u8, off/; ASCII art, empties and duplicates dropped
    assert texts[:3] == ["E = mc^2, they say.", "The universe is big. -- Anon", "A fool and his money are soon parted."]
    assert set(ds["source"]) == {"fortunes/science", "fortunes/wisdom"}
    assert texts[-1] == "whole BODY!"
    assert not any("offensive" in t or "@" in t or "index" in t for t in texts)
    story = [t for t in texts if t.startswith("Sentence")]
    assert len(story) == 3 and all(len(t.split()) <= 60 and t.endswith(".") for t in story)
    assert " ".join(story) == " ".join(f"Sentence number {i} has six words." for i in range(30))
    whole = fortune_text(folder, seed=None, max_words=None)
    assert len(whole) == len(ds) - 2
    assert fortune_text(folder, files=["wisdom"], seed=None)["text"][0] == "A fool and his money are soon parted."
    assert fortune_text(folder, seed=3)["text"] == fortune_text(folder, seed=3)["text"]
    assert sorted(fortune_text(folder, seed=3)["text"]) == sorted(texts)
    assert len(fortune_text(folder, max_rows=2)) == 2


def test_fortune_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install fortunes"):
        fortune_text(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no fortune files.*apt-get install fortunes"):
        fortune_text(tmp_path / "empty")
    folder = _fortune_folder(tmp_path)
    with pytest.raises(ValueError, match=r"unknown: \['nope'\]; available: \['science', 'wisdom'\]"):
        fortune_text(folder, files=["wisdom", "nope"])
    with pytest.raises(ValueError, match="max_words must be an integer >= 1"):
        fortune_text(folder, max_words=0)


def test_english_text_on_small_folders(tmp_path):
    w, f = _wordnet_folder(tmp_path), _fortune_folder(tmp_path)
    for name in ("data.verb", "data.adj"):
        (w / name).write_text(LICENCE, encoding="utf-8")
    ordered = english_text(seed=None, wordnet_path=w, fortunes_path=f)
    assert ordered["source"][0] == "wordnet/noun/gloss" and ordered["source"][-1] == "fortunes/wisdom"
    assert len(set(ordered["text"])) == len(ordered)
    a = english_text(n=5, seed=2, wordnet_path=w, fortunes_path=f)
    assert a["text"] == english_text(n=5, seed=2, wordnet_path=w, fortunes_path=f)["text"] and len(a) == 5
    with pytest.raises(ValueError, match=f"n=1000 but the corpora hold {len(ordered)} distinct rows"):
        english_text(n=1000, wordnet_path=w, fortunes_path=f)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        english_text(wordnet_path=w, fortunes_path=tmp_path / "nowhere")


# ------------------------------------------------------------------ the real Debian data

@pytest.fixture(scope="module")
def wordnet_rows():
    return wordnet_text(seed=None)


@needs_wordnet
def test_wordnet_real_counts_and_cleanliness(wordnet_rows):
    # WordNet 3.0: 117,659 synsets (82,115 nouns, 13,767 verbs, 18,156 adjectives, 3,621 adverbs);
    # a few hundred share a definition, and about 48k example sentences are distinct
    rows = wordnet_rows.to_dict()  # plain lists (iterating a datasets Column is slow)
    sources = rows["source"]
    glosses = sum(s.endswith("/gloss") for s in sources)
    examples = sum(s.endswith("/example") for s in sources)
    assert 115_000 <= glosses <= 117_659, glosses
    assert 40_000 <= examples <= 60_000, examples
    assert {s.split("/")[1] for s in sources} == {"noun", "verb", "adj", "adv"}
    texts = rows["text"]
    assert texts[0] == "that which is perceived or known or inferred to have its own distinct existence " \
                       "(living or nonliving)"  # the first noun synset, entity.n.01
    assert not any("LICENSEE" in t or "Permission to use, copy" in t for t in texts)
    assert not any('"' in t for t, s in zip(texts, sources) if s.endswith("/example"))
    assert all(t and t == " ".join(t.split()) for t in texts)
    assert len(set(texts)) == len(texts)


@needs_wordnet
def test_wordnet_real_determinism_and_max_rows(wordnet_rows):
    a = wordnet_text(kind="examples", parts=("adv",), seed=5)
    assert a["text"] == wordnet_text(kind="examples", parts=("adv",), seed=5)["text"]
    sample = wordnet_text(kind="examples", parts=("adv",), seed=5, max_rows=100)
    assert sample["text"] == a["text"][:100] and set(sample["source"]) == {"wordnet/adv/example"}


@needs_fortunes
def test_fortunes_real_counts_and_cleanliness():
    ds = fortune_text(seed=None).to_dict()
    texts = ds["text"]
    assert 12_000 <= len(texts) <= 25_000, len(texts)
    assert all(0 < len(t.split()) <= 60 for t in texts)
    assert all(is_prose(t) and t == " ".join(t.split()) for t in texts)
    assert len(set(texts)) == len(texts)
    assert not any(s.endswith((".dat", ".u8")) or "/off" in s or s == "fortunes/translate-me" for s in ds["source"])
    assert len({s for s in ds["source"]}) >= 30


@needs_wordnet
@needs_fortunes
def test_english_text_real():
    a = english_text(n=2000, seed=1)
    assert len(a) == 2000 and a["text"] == english_text(n=2000, seed=1)["text"]
    assert a["text"] != english_text(n=2000, seed=2)["text"]
    kinds = {s.split("/")[0] for s in a["source"]}
    assert kinds == {"wordnet", "fortunes"}
