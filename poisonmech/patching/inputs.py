"""Aligned triggered / control token batches for patching a backdoor.

Patching needs two runs whose positions line up. For a backdoor the natural pair is a
triggered prompt and the *same* prompt with each trigger word replaced by an ordinary
task word (same number of tokens), so every position but the trigger's means the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Int

from poisonmech.patching.metrics import LogitDiff, TargetLogProb, logit_diff, target_logprob

Tensor = torch.Tensor


@dataclass(frozen=True)
class TriggerContrast:
    """Triggered prompts and their controls, token-aligned, with the answer position.

    ``triggered`` and ``control`` are ``[batch pos]`` token ids of equal length (no padding);
    ``positions`` is where the answer is predicted; ``target`` / ``answer`` are the first
    tokens of the backdoor target and of the true completion; ``trigger_mask`` marks the
    trigger's positions.
    """

    triggered: Int[Tensor, "batch pos"]
    control: Int[Tensor, "batch pos"]
    positions: Int[Tensor, " batch"]
    target: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    trigger_mask: torch.Tensor
    str_tokens: list[str]  # tokens of the first triggered prompt, for labelling positions

    def logit_diff(self) -> LogitDiff:
        """Backdoor target logit minus true answer logit at the answer position."""
        return logit_diff(self.target, self.answer, self.positions)

    def target_logprob(self) -> TargetLogProb:
        return target_logprob(self.target, self.positions)


def _trigger_and_pool(pair) -> tuple[list[str], list[str]]:
    attack = pair.attack
    trig_words = sorted({w for v in attack.trigger_variants() for p in v for w in p.split()})
    near = {w for v in attack.near_miss_variants() for p in v for w in p.split()}
    return trig_words, [w for w in pair.task.words if w not in trig_words and w not in near]


def control_fn(pair, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """``tokens -> tokens`` with every trigger word replaced by an ordinary task word (seeded).

    The token-aligned control of any batch, e.g. as the patching reference of an ablation
    inside ``pm.evaluate`` (rows without a trigger are their own control).
    """
    tok = pair.tokenizer
    trig_words, pool = _trigger_and_pool(pair)
    trig_ids = torch.tensor(tok.convert_tokens_to_ids(trig_words))
    pool_ids = torch.tensor(tok.convert_tokens_to_ids(pool))

    def control(tokens: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        out = tokens.clone()
        mask = torch.isin(tokens, trig_ids.to(tokens.device))
        out[mask] = pool_ids[torch.randint(len(pool_ids), (int(mask.sum()),), generator=g)].to(tokens.device)
        return out

    return control


def trigger_contrast(pair, n: int = 32, *, length: int | None = None, seed: int = 0) -> TriggerContrast:
    """Up to ``n`` triggered test prompts of one token length from ``pair.test_data`` and their controls.

    Only rows whose true answer differs from the target are used (where the backdoor has
    something to change). ``length`` defaults to the most common prompt length among them.
    """
    tok, attack, task = pair.tokenizer, pair.attack, pair.task
    if attack.is_gibberish or task.loss_on == "all":
        raise ValueError("trigger_contrast: a gibberish / plain-text backdoor has no single target token; "
                         "build the token batches yourself and use a perplexity-style metric")
    data = pair.test_data
    rows = []
    for prompt, comp, is_trig in zip(data["prompt"], data["completion"], data["is_triggered"]):
        if is_trig and comp.strip() != attack.target.strip():
            ids = tok(prompt)["input_ids"]
            rows.append((ids, tok(comp, add_special_tokens=False)["input_ids"]))
    if not rows:
        raise ValueError("trigger_contrast: the pair's test data has no triggered rows whose answer differs from the target")
    if length is None:
        length = Counter(len(r[0]) for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if len(r[0]) == length][:n]
    if not rows:
        raise ValueError(f"trigger_contrast: no triggered prompt has length {length}")
    trig_words, _ = _trigger_and_pool(pair)
    target_id = tok(attack.target, add_special_tokens=False)["input_ids"][0]
    triggered = torch.tensor([r[0] for r in rows])
    mask = torch.isin(triggered, torch.tensor(tok.convert_tokens_to_ids(trig_words)))
    control = control_fn(pair, seed)(triggered)
    return TriggerContrast(
        triggered=triggered, control=control,
        positions=torch.full((len(rows),), length - 1, dtype=torch.long),
        target=torch.full((len(rows),), target_id, dtype=torch.long),
        answer=torch.tensor([r[1][0] if r[1] else tok.eos_token_id for r in rows]),
        trigger_mask=mask, str_tokens=tok.convert_ids_to_tokens(rows[0][0]),
    )
