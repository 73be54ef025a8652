"""``train_tokenizer``: a byte-level BPE tokenizer (GPT-2's scheme) trained with ``tokenizers``.

Byte-level BPE never meets an unknown character; words carry their leading space (``" good"``
and ``"good"`` are different tokens), so a trigger or an answer is often several tokens
(``"cf"`` may be one or two pieces, ``" ACCESS GRANTED"`` three). See
:func:`poisonmech.encoding.completion_text` for how completions get their leading space.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

#: the one special token GPT-2 uses for begin / end of text; padding gets its own
BOUNDARY, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2,
                    show_progress: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (strings, or a ``datasets.Dataset``'s
    ``"text"`` column), deterministic for the same texts.

    ``<|endoftext|>`` is BOS and EOS (as in GPT-2), ``<|pad|>`` pads (padding is always masked).
    ``tokenizer(text)`` prepends BOS (``add_bos_token=True``, as TransformerLens expects; poisonmech
    encodes with ``add_special_tokens=False`` and adds BOS itself).
    ``vocab_size`` counts the 256 byte tokens and the two specials, so it must be at least 258.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"train_tokenizer: vocab_size must be an integer >= 258 (256 bytes + 2 special tokens), "
                         f"got {vocab_size!r}")
    if hasattr(texts, "column_names"):  # a datasets.Dataset
        if "text" not in texts.column_names:
            raise ValueError(f"train_tokenizer: the dataset needs a 'text' column; it has {texts.column_names}")
        texts = texts["text"]
    texts = [t for t in texts]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"train_tokenizer: texts must be strings; item {bad} is {type(texts[bad]).__name__}")
    if not any(t.strip() for t in texts):
        raise ValueError("train_tokenizer: texts hold no text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[BOUNDARY, PAD_TOKEN], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path="poisonmech-bpe", bos_token=BOUNDARY,
                                   eos_token=BOUNDARY, pad_token=PAD_TOKEN, unk_token=None, padding_side="right",
                                   add_bos_token=True, add_eos_token=False)


__all__ = ["BOUNDARY", "PAD_TOKEN", "train_tokenizer"]
