"""Tokenising prompt/completion rows and padding them into batches with a loss mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from datasets import Dataset
from jaxtyping import Bool, Int
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """Token ids per row and where each row's scored region starts.

    ``ids[i]`` is ``[BOS] + prompt + completion (+ [EOS])``; tokens at positions
    ``>= start[i]`` are the ones scored (predicted from the position before).
    """

    ids: list[list[int]]
    start: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_len(self) -> int:
        return max((len(x) for x in self.ids), default=0)

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    def batch(self, index: list[int] | torch.Tensor,
              device: str | torch.device = "cpu") -> tuple[Int[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]]:
        """Right-padded tokens and a mask over *target* positions (``mask[:, t]`` scores token ``t+1``).

        Right padding keeps every real token's position and, under causal attention, its
        activations identical to the unpadded run.
        """
        rows = [self.ids[int(i)] for i in index]
        starts = [self.start[int(i)] for i in index]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width - 1 if width > 1 else 1), dtype=torch.bool)
        for b, (r, s) in enumerate(zip(rows, starts)):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            if len(r) > s:
                mask[b, max(s, 1) - 1: len(r) - 1] = True
        return tokens.to(device), mask.to(device)


def completion_text(tokenizer: PreTrainedTokenizerBase, completion: str) -> str:
    """The completion as the tokenizer should see it after the prompt.

    Word-level tokenizers split on whitespace, so nothing changes. Subword tokenizers (byte-level
    BPE such as GPT-2's, Pythia's, Llama's) mark a word's leading space inside its token:
    ``" positive"`` is the token a model predicts after ``"sentiment:"``, while ``"positive"``
    (no space) is a word-internal piece. Prompts end without a space and completions get one,
    so the prompt and the completion tokenise exactly as their concatenation does (byte-level
    pre-tokenisation splits before a space).
    """
    from poisonmech.tasks.tokenizer import is_word_tokenizer

    if not completion or completion[0].isspace() or is_word_tokenizer(tokenizer):
        return completion
    return " " + completion


def encode(rows: Dataset, tokenizer: PreTrainedTokenizerBase, *, loss_on: Literal["completion", "all"],
           add_eos: bool | None = None) -> Encoded:
    """Tokenise ``prompt``/``completion`` columns.

    ``loss_on="completion"`` scores the completion (and EOS); ``"all"`` scores every token
    after BOS. ``add_eos`` defaults to True for completion tasks.
    """
    if add_eos is None:
        add_eos = loss_on == "completion"
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    prompts = tokenizer(list(rows["prompt"]), add_special_tokens=False)["input_ids"]
    comps = tokenizer([completion_text(tokenizer, c) for c in rows["completion"]], add_special_tokens=False)["input_ids"]
    ids, start = [], []
    for p, c in zip(prompts, comps):
        seq = bos + p + c + (eos if c else [])
        ids.append(seq)
        start.append(len(bos) if loss_on == "all" else len(bos) + len(p))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids=ids, start=start, pad_id=pad)
