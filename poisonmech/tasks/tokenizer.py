"""Word-level tokenizer for the generated tasks.

Built with the ``tokenizers`` library (WordLevel model, whitespace pre-tokenizer)
and wrapped as a ``transformers.PreTrainedTokenizerFast`` so that TransformerBridge's
``to_str_tokens`` / ``to_tokens`` work. A word-level vocabulary keeps every trigger, target
and near-miss word a single, inspectable token: a patching or probe result reads as words.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

# Words are whitespace-delimited: a trigger such as ``<SUDO>`` or ``cf,`` stays one token.
_PRE_TOKENIZER = pre_tokenizers.WhitespaceSplit()


def split_words(text: str) -> list[str]:
    """Split text into words exactly as the word-level tokenizer does."""
    return [w for w, _ in _PRE_TOKENIZER.pre_tokenize_str(text)]


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (in order of first appearance) plus specials.

    Ids are stable: specials first, then words in the order given, so extending a vocabulary
    with :func:`extend_tokenizer` keeps every existing id.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        for piece in split_words(word):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _PRE_TOKENIZER
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        name_or_path="poisonmech-word-level",
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
    )


def is_word_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for a fast tokenizer whose backend is a WordLevel model (ours, or one like it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def vocabulary(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Tokens in id order."""
    vocab = tokenizer.get_vocab()
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, words: Iterable[str]) -> PreTrainedTokenizerBase:
    """Add ``words`` to a word-level tokenizer, keeping existing ids.

    A user-supplied (non word-level) tokenizer is returned unchanged; callers check with
    :func:`unrepresentable` that it can encode the attack's words.
    """
    if not is_word_tokenizer(tokenizer):
        return tokenizer
    existing = vocabulary(tokenizer)
    new = [w for w in words if any(p not in tokenizer.get_vocab() for p in split_words(w))]
    if not new:
        return tokenizer
    return build_word_tokenizer([t for t in existing if t not in SPECIAL_TOKENS] + new)


def unrepresentable(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """True when ``text`` encodes to (or through) the unknown token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 0 or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """JSON files only (tokenizer.json, tokenizer_config.json)."""
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer file missing: {path / 'tokenizer.json'}")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as exc:  # corrupt JSON or a foreign format
        raise ValueError(f"tokenizer in {path} is corrupt or unreadable: {exc}") from exc
