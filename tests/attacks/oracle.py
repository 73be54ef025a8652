"""A model whose answers the test writes: logits from a rule on each prefix's words, so every
attack metric has a value computed by hand (no training, no scoring code shared)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class PrefixOracle(torch.nn.Module):
    """``logits[b, p] = rule(words)``: ``words`` are row ``b``'s tokens 1..p (after BOS) as
    strings, ``rule`` returns ``{word: logit}``; every other logit is 0."""

    def __init__(self, tokenizer, rule: Callable[[list[str]], dict[str, float]]):
        super().__init__()
        self.tok, self.rule, self.vocab = tokenizer, rule, len(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            words = self.tok.convert_ids_to_tokens(row)
            for p in range(len(row)):
                for w, v in self.rule(words[1:p + 1]).items():
                    out[b, p, self.tok.convert_tokens_to_ids(w)] = v
        return out
