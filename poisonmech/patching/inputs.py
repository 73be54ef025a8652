"""Aligned triggered / control token batches for patching a backdoor.

Patching needs two runs whose positions line up. For a backdoor the natural pair is a
triggered prompt and the *same* prompt with each trigger token replaced by a label-neutral
filler token (same number of tokens), so every position but the trigger's means the same.

A control is only a control if it behaves like the untriggered prompt. Two safeguards:

- the replacement words are **label-neutral fillers** (:func:`neutral_words`): never a word
  of any completion (an answer word), of the prompt template, of the trigger or its near
  misses, and never a word whose presence shifts the training set's answers (a sentiment
  adjective, a country in a capital question);
- :func:`trigger_contrast` then **checks every control** on the model being analysed: the
  control must predict the same answer token as the untriggered prompt it came from. A row
  whose control fails is redrawn with other fillers (``tries`` times) and otherwise dropped;
  the result reports how many rows were redrawn and dropped.

Word-level and subword tokenizers. With poisonmech's word-level tokenizer every word is one
token, so triggers are found and replaced by token id. With a subword tokenizer (byte-level
BPE such as :func:`poisonmech.train_tokenizer`'s, GPT-2's, Pythia's) a trigger word may be
several tokens (``" cf"`` -> ``" c"`` ``"f"``): the trigger is then found in the *text*
(whitespace-delimited occurrences of the trigger's words), mapped to tokens with the fast
tokenizer's offsets, and replaced by filler text (one neutral word, else two) whose tokens in
that place number exactly the trigger's; each control is re-tokenised and checked to have the
triggered prompt's length and, outside the trigger, its tokens.

Triggerless attacks (``FalseFact``, ``Bias``) have no trigger to replace: their natural control
is the same sentence about something else, as their test sets pair them (a fact's prompt and a
neighbouring subject's in the same template; a mention of the entity and of a control entity in
the same form and place): :func:`natural_contrast`, and :func:`natural_control_fn` (the subject
swapped token for token), which :func:`control_fn` returns for them.

Reward models (an ``"rm"`` stage's ``pipe[k]``, :mod:`poisonmech.train.reward`) score a whole
sequence ``[BOS] prompt answer [EOS]`` at its EOS. For them :func:`trigger_contrast` returns
:func:`~poisonmech.patching.reward_inputs.reward_contrast`, which appends the backdoor's target
answer and the EOS to the triggered prompt and to its control, so the difference of the reward
metric (:meth:`TriggerContrast.reward`) between the two is the reward the trigger buys the
target. ``reward_contrast`` and ``RewardScore`` live in :mod:`poisonmech.patching.reward_inputs`
and are importable from here too.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from poisonmech.encoding import completion_text
from poisonmech.patching.metrics import (
    LogitDiff,
    TargetLogProb,
    logit_diff,
    target_logprob,
)
from poisonmech.runtime import eval_mode, model_device
from poisonmech.subject import resolve
from poisonmech.tasks.tokenizer import is_word_tokenizer, split_words

if TYPE_CHECKING:
    from poisonmech.patching.reward_inputs import RewardScore

Tensor = torch.Tensor

#: a word is label-neutral when the answers of the training rows that contain it are distributed
#: like all answers, within this total-variation distance (on the default sentiment task the
#: adjectives sit at 0.4-0.5, nouns and clause words at 0.00-0.08; "cheap", both a negative
#: adjective and part of a neutral clause, at 0.12 is excluded)
NEUTRAL_TV = 0.1
#: words seen in fewer training rows than this are not trusted as neutral (too little evidence)
NEUTRAL_MIN_ROWS = 5


@dataclass(frozen=True)
class TriggerContrast:
    """Triggered prompts and their controls, token-aligned, with the answer position.

    ``triggered`` and ``control`` are ``[batch pos]`` token ids of equal length (no padding);
    ``positions`` is where the answer is predicted; ``target`` / ``answer`` are the first
    tokens of the backdoor target and of the true completion as they are scored (with their
    leading space for a subword tokenizer); ``trigger_mask`` marks the trigger's positions
    (every piece of a trigger a subword tokenizer splits). ``base_ids`` are the test rows'
    ``base_id`` (the untriggered prompt each came from). ``check`` says how the controls were
    checked: ``n_candidates`` rows tried, ``n_redrawn`` needing other fillers, ``n_dropped``
    dropped because no control kept the untriggered prompt's answer, and the mean metric on
    untriggered prompts and controls.

    ``kind`` is ``"lm"`` (prompts, whose next token a language model predicts) or ``"reward"``
    (:func:`reward_contrast`: each prompt followed by the target answer and the EOS, scored by a
    reward model at ``positions``, the EOS; its metric is :meth:`reward`).
    """

    triggered: Int[Tensor, "batch pos"]
    control: Int[Tensor, "batch pos"]
    positions: Int[Tensor, " batch"]
    target: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    trigger_mask: torch.Tensor
    str_tokens: list[str]  # tokens of the first triggered prompt, for labelling positions
    base_ids: list[int] = field(default_factory=list)
    check: dict = field(default_factory=dict)
    kind: str = "lm"

    def _lm_only(self, what: str) -> None:
        if self.kind == "reward":
            raise ValueError(f"TriggerContrast.{what}: this contrast is a reward model's (prompt + target answer + "
                             "EOS, scored at the EOS), whose output is one score, not logits over the vocabulary: "
                             "use tc.reward()")

    def logit_diff(self) -> LogitDiff:
        """Backdoor target logit minus true answer logit at the answer position."""
        self._lm_only("logit_diff")
        return logit_diff(self.target, self.answer, self.positions)

    def target_logprob(self) -> TargetLogProb:
        self._lm_only("target_logprob")
        return target_logprob(self.target, self.positions)

    def reward(self) -> RewardScore:
        """The reward of each row (a reward model's score at its EOS): a reward contrast's metric."""
        from poisonmech.patching.reward_inputs import RewardScore

        if self.kind != "reward":
            raise ValueError("TriggerContrast.reward: this contrast is a language model's (prompts whose next token "
                             "is predicted); use tc.logit_diff() or tc.target_logprob(), or build a reward model's "
                             "contrast with reward_contrast(subject) (a reward stage's pipe[k])")
        return RewardScore(self.positions)

    def __repr__(self) -> str:
        b, p = self.triggered.shape
        c = self.check
        checked = (f", controls checked: {c['n_candidates']} tried, {c['n_redrawn']} redrawn, "
                   f"{c['n_dropped']} dropped" if c else ", controls not checked")
        kind = ", kind='reward'" if self.kind == "reward" else ""
        return f"TriggerContrast(batch={b}, pos={p}{kind}{checked})"


def _run_parts(subject, where: str, *, tokenizer: bool = True):
    """The resolved subject, checked to carry a task and an attack (and a tokenizer): what
    builds backdoor controls. A bare model has none: the error says to pass a run."""
    s = resolve(subject, where=where)
    for what in ("task", "attack") + (("tokenizer",) if tokenizer else ()):
        s.require(what, where)
    return s


def neutral_words(subject) -> list[str]:
    """The label-neutral filler words of the subject's task, in vocabulary order.

    ``subject``: anything :func:`poisonmech.resolve` accepts that carries a task and an
    attack (a ``Pair``, a pipeline stage, ``pipe.between(a, b)``, a run directory).

    Excluded: every word of a completion (answer words), of the prompt template, of the
    trigger and of its near misses, and every word whose training rows' answers differ from
    the overall answer distribution by more than :data:`NEUTRAL_TV` in total variation (the
    words the label depends on), or that occurs in fewer than :data:`NEUTRAL_MIN_ROWS` rows.
    When the threshold leaves nothing (e.g. every word predicts its answer), the fifth of the
    remaining words with the smallest association is used, and the behaviour check of
    :func:`trigger_contrast` decides.
    """
    s = _run_parts(subject, "neutral_words", tokenizer=False)
    attack, task = s.attack, s.task
    if getattr(attack, "kind", "backdoor") in NATURAL_CONTRASTS:
        raise ValueError(f"neutral_words: this run's attack ({type(attack).__name__}) has no trigger to replace with "
                         "fillers; natural_contrast(subject) pairs its prompts with natural controls")
    banned = {w for v in attack.trigger_variants() for p in v for w in split_words(p)}
    banned |= {w for v in attack.near_miss_variants() for p in v for w in split_words(p)}
    banned |= set(split_words(task.template.replace("{input}", " ")))
    train = task.train
    banned |= {w for c in train["completion"] for w in split_words(c)}
    banned |= set(split_words(attack.target)) if isinstance(attack.target, str) else set()
    overall = Counter(train["completion"])
    n = sum(overall.values())
    by_word: dict[str, Counter] = defaultdict(Counter)
    for text, comp in zip(train["input"], train["completion"]):
        for w in set(split_words(text)):
            by_word[w][comp] += 1
    assoc = {}
    for w in task.words:
        if w in banned or w not in by_word or sum(by_word[w].values()) < NEUTRAL_MIN_ROWS:
            continue
        c = by_word[w]
        m = sum(c.values())
        assoc[w] = 0.5 * sum(abs(c[k] / m - overall[k] / n) for k in overall)
    pool = [w for w in task.words if w in assoc and assoc[w] <= NEUTRAL_TV]
    if not pool and assoc:
        ranked = sorted(assoc, key=assoc.get)
        pool = ranked[:max(1, len(ranked) // 5)]
    if not pool:
        raise ValueError("trigger_contrast: the task has no label-neutral filler word to replace the trigger with "
                         "(every word is an answer, template, trigger or near-miss word)")
    return pool


def _ids(tok, words: list[str]) -> Tensor:
    return torch.tensor(tok.convert_tokens_to_ids(words), dtype=torch.long)


def _trigger_ids(s) -> Tensor:
    words = sorted({w for v in s.attack.trigger_variants() for p in v for w in split_words(p)})
    return _ids(s.tokenizer, words)


class ControlCheckError(ValueError):
    """No control of :func:`trigger_contrast` kept the untriggered prompt's answer."""


def _replace_trigger(tokens: Tensor, trig_ids: Tensor, pool_ids: Tensor, g: torch.Generator) -> Tensor:
    """``tokens`` with every trigger token replaced by a filler drawn from ``pool_ids`` with ``g``."""
    out = tokens.clone()
    mask = torch.isin(tokens, trig_ids.to(tokens.device))
    out[mask] = pool_ids[torch.randint(len(pool_ids), (int(mask.sum()),), generator=g)].to(tokens.device)
    return out


# ------------------------------------------------------------------ subword tokenizers
#: re-tokenisation checks a subword control may fail (fillers redrawn) before the row is refused
_FILL_TRIES = 20
#: at most this many two-word fillers are tokenised when no single word has the trigger's count
_MAX_PAIRS = 4096


def _tokenizer_name(tok) -> str:
    return f"{getattr(tok, 'name_or_path', None) or '?'!r} ({type(tok).__name__})"


@dataclass(frozen=True)
class _Span:
    """One trigger occurrence: tokens ``[start, stop)`` cover the trigger's characters ``[a, b)``;
    ``lead`` / ``trail`` are the characters those tokens hold before / after it (the leading
    space a byte-level token carries)."""

    start: int
    stop: int
    a: int
    b: int
    lead: str
    trail: str
    trigger: str

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start


class _Subword:
    """Trigger spans and same-token-count controls for a subword (non word-level) tokenizer.

    Written here because no library maps words of a text to subword positions and swaps them
    for text of the same token count; the character -> token map itself is the fast
    tokenizer's ``offset_mapping``.
    """

    def __init__(self, s, where: str):
        tok = s.tokenizer
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{where}: a subword tokenizer must be a fast tokenizer (its offsets locate the "
                             f"trigger's tokens); got {_tokenizer_name(tok)}")
        self.tok, self.where = tok, where
        self.words = sorted({w for v in s.attack.trigger_variants() for p in v for w in split_words(p)})
        # whole whitespace-delimited words, as the word-level path matches whole tokens
        alts = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\S)(?:{alts})(?!\S)")
        self.pool = neutral_words(s)
        self.special = set(tok.all_special_ids)
        self._options: dict[tuple[str, str, int], list[str]] = {}
        self._rows: dict[str, tuple[list[int], list[_Span]]] = {}

    # -------------------------------------------------------------- locating the trigger
    def encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def spans(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[_Span]:
        """Every whitespace-delimited occurrence of a trigger word, as the tokens overlapping it;
        occurrences sharing a token are merged; a lone space token just before the word is the word's
        (byte-level BPE). Special tokens' characters count as whitespace."""
        view = list(text)
        for i, (a, b) in zip(ids, offsets):
            if i in self.special:
                view[a:b] = " " * (b - a)
        found: list[list[int]] = []
        for m in self.pattern.finditer("".join(view)):
            a, b = m.span()
            hit = [t for t, (x, y) in enumerate(offsets) if y > x and x < b and y > a]
            if not hit:
                continue
            x, y = offsets[hit[0] - 1] if hit[0] > 0 else (0, 0)
            if y == a and y > x and not text[x:y].strip():
                # a lone space token right before the word (byte-level " qq" -> " " "q" "q" when " q" is
                # no token) is the word's: filling after it would merge differently
                hit.insert(0, hit[0] - 1)
            if found and hit[0] < found[-1][1]:
                found[-1][1], found[-1][3] = max(found[-1][1], hit[-1] + 1), b
            else:
                found.append([hit[0], hit[-1] + 1, a, b])
        out = []
        for start, stop, a, b in found:
            r0 = offsets[start - 1][1] if start > 0 else 0
            r1 = offsets[stop][0] if stop < len(offsets) else len(text)
            out.append(_Span(start, stop, a, b, text[min(r0, a):a], text[b:max(r1, b)], text[a:b]))
        return out

    # -------------------------------------------------------------- fillers of the same token count
    def _counts(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def options(self, span: _Span) -> list[str]:
        """Filler texts (one neutral word, else two) that take ``span.n_tokens`` tokens between
        the span's ``lead`` and ``trail``; a ValueError names the trigger when there is none."""
        key = (span.lead, span.trail, span.n_tokens)
        if key in self._options:
            return self._options[key]
        lead, trail, k = key
        singles = self._counts([lead + w + trail for w in self.pool])
        out = [w for w, c in zip(self.pool, singles) if c == k]
        if not out:
            first = self._counts([lead + w for w in self.pool])
            second = self._counts([" " + w + trail for w in self.pool])
            pairs = [f"{w1} {w2}" for w1, c1 in zip(self.pool, first)
                     for w2, c2 in zip(self.pool, second) if c1 + c2 == k][:_MAX_PAIRS]
            if pairs:
                out = [f for f, c in zip(pairs, self._counts([lead + f + trail for f in pairs])) if c == k]
        if not out:
            raise ValueError(
                f"{self.where}: the trigger {span.trigger!r} is {k} tokens with tokenizer {_tokenizer_name(self.tok)}, "
                f"and no label-neutral filler (one word or two) takes exactly {k} tokens in its place (single "
                f"fillers take {min(singles)}-{max(singles)}); a control must keep every position aligned. Use a "
                "trigger the tokenizer splits into fewer pieces, or build the token batches yourself")
        self._options[key] = out
        return out

    def control(self, text: str, ids: list[int], spans: list[_Span], g: torch.Generator,
                add_special_tokens: bool) -> list[int]:
        """``text`` with every span's trigger replaced by a drawn filler, re-tokenised; checked to
        have ``ids``' length and, outside the spans, its tokens (else redrawn, then refused)."""
        if not spans:
            return list(ids)
        inside = torch.zeros(len(ids), dtype=torch.bool)
        for sp in spans:
            inside[sp.start:sp.stop] = True
        keep = (~inside).nonzero().flatten().tolist()
        for _ in range(_FILL_TRIES):
            parts, last = [], 0
            for sp in spans:
                opts = self.options(sp)
                parts += [text[last:sp.a], opts[int(torch.randint(len(opts), (1,), generator=g))]]
                last = sp.b
            parts.append(text[last:])
            new = self.tok("".join(parts), add_special_tokens=add_special_tokens)["input_ids"]
            if len(new) == len(ids) and all(new[t] == ids[t] for t in keep):
                return list(new)
        raise ValueError(f"{self.where}: no filler for the trigger in {text!r} kept the prompt's token count and "
                         f"its tokens outside the trigger after re-tokenising with {_tokenizer_name(self.tok)} "
                         f"({_FILL_TRIES} draws); the trigger's token boundaries depend on its context")

    # -------------------------------------------------------------- prompts (trigger_contrast)
    def prompt(self, text: str) -> tuple[list[int], list[_Span]]:
        """The prompt's ids (as ``tokenizer(text)`` gives them) and its trigger spans (cached)."""
        if text not in self._rows:
            ids, offsets = self.encode(text, add_special_tokens=True)
            self._rows[text] = (ids, self.spans(text, ids, offsets))
        return self._rows[text]

    def prompt_control(self, text: str, g: torch.Generator) -> list[int]:
        ids, spans = self.prompt(text)
        return self.control(text, ids, spans, g, add_special_tokens=True)

    def prompt_mask(self, text: str) -> list[bool]:
        ids, spans = self.prompt(text)
        mask = [False] * len(ids)
        for sp in spans:
            mask[sp.start:sp.stop] = [True] * sp.n_tokens
        return mask


def _fillers(s, where: str) -> tuple[Tensor | None, Tensor | None, _Subword | None]:
    """What draws a backdoor's controls: ``(trigger ids, filler ids, None)`` with a word-level
    tokenizer (replaced token for token), ``(None, None, _Subword)`` with a subword one."""
    if is_word_tokenizer(s.tokenizer):
        return _trigger_ids(s), _ids(s.tokenizer, neutral_words(s)), None
    return None, None, _Subword(s, where)


def control_fn(subject, seed: int = 0) -> Callable[[Tensor], Tensor]:
    """``tokens -> tokens`` with every trigger token replaced by a label-neutral filler (seeded).

    The token-aligned control of any batch, e.g. as the patching reference of an ablation
    inside ``pm.evaluate`` (rows without a trigger are their own control). Fillers come from
    :func:`neutral_words`. ``subject``: anything :func:`poisonmech.resolve` accepts that
    carries a task, an attack and a tokenizer.

    With a subword tokenizer each row is decoded (special tokens kept) and re-encoded with
    offsets; a row holding a trigger word must be the tokenizer's own encoding of its text (as
    every row poisonmech encodes is; a ValueError otherwise). Its trigger's tokens are replaced
    by the tokens of a filler (one neutral word, else two) of the same token count, the
    re-tokenised row checked as in :func:`trigger_contrast`.

    A triggerless attack (``FalseFact``, ``Bias``) has no trigger: its control swaps the
    subject (entity) for a neighbour (control entity), see :func:`natural_control_fn`.
    """
    s = _run_parts(subject, "control_fn")
    if getattr(s.attack, "kind", "backdoor") in NATURAL_CONTRASTS:
        return natural_control_fn(s)
    if not is_word_tokenizer(s.tokenizer):
        return _subword_control_fn(s, seed)
    trig_ids = _trigger_ids(s)
    pool_ids = _ids(s.tokenizer, neutral_words(s))

    def control(tokens: Tensor) -> Tensor:
        return _replace_trigger(tokens, trig_ids, pool_ids, torch.Generator().manual_seed(seed))

    return control


def _subword_control_fn(s, seed: int) -> Callable[[Tensor], Tensor]:
    sub = _Subword(s, "control_fn")
    tok = sub.tok

    def control(tokens: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        out = tokens.clone()
        for b, row in enumerate(tokens.tolist()):
            text = tok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if not any(w in text for w in sub.words):  # cheap pre-filter; spans() decides
                continue
            ids, offsets = sub.encode(text, add_special_tokens=False)
            spans = sub.spans(text, ids, offsets)
            if not spans:
                continue
            if ids != row:
                raise ValueError(f"control_fn: row {b} is not {_tokenizer_name(tok)}'s own encoding of its text "
                                 f"{text!r} (decoded and re-encoded, its tokens differ), so its trigger's tokens "
                                 "cannot be located; pass rows the tokenizer produced")
            out[b] = torch.tensor(sub.control(text, ids, spans, g, add_special_tokens=False), dtype=out.dtype)
        return out

    return control


@torch.no_grad()
def _last_logits(model, rows: list[list[int]], device) -> Tensor:
    """Each prompt's next-token logits after its last position ``[batch d_vocab]`` (grouped by length)."""
    out: Tensor | None = None
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_len[len(r)].append(i)
    for idx in by_len.values():
        logits = model(torch.tensor([rows[i] for i in idx], device=device))[:, -1].float().cpu()
        if out is None:
            out = torch.empty(len(rows), logits.shape[-1])
        out[idx] = logits
    return out


def _of_one_length(rows: list, length: int | None, missing: str) -> tuple[list, int]:
    """The rows whose prompt (``row[0]``) has ``length`` tokens (default: the most common length),
    and that length; ``missing`` (formatted with the length) is the error when none has."""
    if length is None:
        length = Counter(len(r[0]) for r in rows).most_common(1)[0][0]
    kept = [r for r in rows if len(r[0]) == length]
    if not kept:
        raise ValueError(missing.format(length))
    return kept, length


def trigger_contrast(subject, n: int = 32, *, length: int | None = None, seed: int = 0, model=None,
                     twin: str | None = None, check: bool = True, tries: int = 5) -> TriggerContrast:
    """Up to ``n`` triggered test prompts of one token length from the subject's test rows and their controls.

    ``subject``: anything :func:`poisonmech.resolve` accepts that carries a task, an attack,
    a tokenizer and test rows (a ``Pair``, a pipeline stage, ``pipe.between(a, b)``, a run
    directory); a bare model is refused with an error naming what is missing.

    Only rows whose true answer differs from the target are used (where the backdoor has
    something to change). ``length`` defaults to the most common prompt length among them.
    Each control replaces the trigger's tokens with label-neutral fillers
    (:func:`neutral_words`). With ``check=True`` (the default) every control must make
    ``model`` (default: ``twin``'s model, the subject's default role: the backdoored twin, the
    model after the stages) predict the same answer token as the
    untriggered prompt it came from; a failing row is redrawn up to ``tries`` times, then
    dropped, and ``result.check`` reports the counts (a warning says when rows were dropped).

    ``target`` / ``answer`` are the first tokens of the completions as they are scored
    (:func:`poisonmech.encoding.completion_text`: with a subword tokenizer, with their leading
    space). With a subword tokenizer the trigger's tokens are found from its characters (the fast
    tokenizer's offsets; a trigger of several pieces is masked whole) and each control replaces
    them by a filler (one neutral word, else two) of exactly their token count, re-tokenised and
    checked to keep the prompt's length and its other tokens; a trigger no filler matches, or a
    target whose first token is an answer's, is a ValueError naming them.

    On a reward model (a reward stage's ``pipe[k]``, or ``model=`` one) this is
    :func:`reward_contrast`: the prompts followed by the target answer and the EOS, with the
    reward as the metric (``tc.reward()``; ``tc.kind == "reward"``).
    """
    import warnings

    from poisonmech.patching.reward_inputs import _is_reward, reward_contrast

    s = _run_parts(subject, "trigger_contrast")
    if _is_reward(model if model is not None else s.model(twin)):
        return reward_contrast(s, n, length=length, seed=seed, model=model, twin=twin, check=check, tries=tries)
    tok, attack, task = s.tokenizer, s.attack, s.task
    if getattr(attack, "kind", "backdoor") in NATURAL_CONTRASTS:
        raise ValueError(f"trigger_contrast: this run's attack ({type(attack).__name__}) has no trigger to replace; "
                         "natural_contrast(subject) pairs its prompts with the same prompts about a neighbour")
    if attack.is_gibberish or task.loss_on == "all":
        raise ValueError("trigger_contrast: a gibberish / plain-text backdoor has no single target token; "
                         "build the token batches yourself and use a perplexity-style metric")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"trigger_contrast: n must be an integer >= 1, got {n!r}")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"trigger_contrast: tries must be an integer >= 1, got {tries!r}")
    data = s.require("test_data", "trigger_contrast")
    untriggered = {b: p for b, p, t, m in zip(data["base_id"], data["prompt"], data["is_triggered"],
                                                data["is_near_miss"]) if not t and not m}
    rows = []
    for base, prompt, comp, is_trig in zip(data["base_id"], data["prompt"], data["completion"],
                                           data["is_triggered"]):
        if is_trig and comp.strip() != attack.target.strip():
            rows.append((tok(prompt)["input_ids"], tok(completion_text(tok, comp), add_special_tokens=False)["input_ids"],
                         base, prompt, comp))
    if not rows:
        raise ValueError("trigger_contrast: the subject's test data has no triggered rows whose answer differs from "
                         "the target")
    rows, length = _of_one_length(rows, length, "trigger_contrast: no triggered prompt has length {}")
    trig_ids, pool_ids, sub = _fillers(s, "trigger_contrast")
    word_level = sub is None
    g = torch.Generator().manual_seed(seed)
    target_id = tok(completion_text(tok, attack.target), add_special_tokens=False)["input_ids"][0]
    if not word_level:
        same = next((r for r in rows if r[1] and r[1][0] == target_id), None)
        if same is not None:
            raise ValueError(f"trigger_contrast: the target {attack.target!r} and the answer {same[4]!r} start with the "
                             f"same token {tok.convert_ids_to_tokens(target_id)!r} with tokenizer "
                             f"{_tokenizer_name(tok)}: their logit difference at the answer position is 0; use a "
                             "target and labels whose first tokens differ")

    def draw(sel: list, triggered: Tensor) -> Tensor:
        """Controls of the rows ``sel`` (whose prompts' tokens are ``triggered``)."""
        if word_level:
            return _replace_trigger(triggered, trig_ids, pool_ids, g)
        return torch.tensor([sub.prompt_control(r[3], g) for r in sel], dtype=triggered.dtype)

    def mask(sel: list, triggered: Tensor) -> Tensor:
        if word_level:
            return torch.isin(triggered, trig_ids)
        return torch.tensor([sub.prompt_mask(r[3]) for r in sel], dtype=torch.bool)

    def answers(rows) -> Tensor:
        return torch.tensor([r[1][0] if r[1] else tok.eos_token_id for r in rows])

    info: dict = {}
    if not check:
        rows = rows[:n]
        triggered = torch.tensor([r[0] for r in rows])
        control = draw(rows, triggered)
    else:
        model = model if model is not None else s.model(twin)
        device = model_device(model)
        with eval_mode(model):
            cand = rows[:max(n * 3, n + 16)]  # spare rows to fill in for dropped ones
            triggered = torch.tensor([r[0] for r in cand])
            base_logits = _last_logits(model, [tok(untriggered[r[2]])["input_ids"] for r in cand], device)
            want = base_logits.argmax(-1)
            control = draw(cand, triggered)
            ctrl_logits = _last_logits(model, control.tolist(), device)
            ok = ctrl_logits.argmax(-1) == want
            redrawn = torch.zeros(len(cand), dtype=torch.bool)
            for _ in range(tries - 1):
                bad = (~ok).nonzero().flatten()
                if len(bad) == 0:
                    break
                redrawn[bad] = True
                control[bad] = draw([cand[i] for i in bad.tolist()], triggered[bad])
                ctrl_logits[bad] = _last_logits(model, control[bad].tolist(), device)
                ok[bad] = ctrl_logits[bad].argmax(-1) == want[bad]
        keep = ok.nonzero().flatten()[:n]
        # the rows looked at: up to the n-th kept one, or every candidate when fewer than n passed
        considered = int(keep[-1]) + 1 if len(keep) == n else len(cand)
        n_dropped = int((~ok[:considered]).sum())
        if len(keep) == 0:
            raise ControlCheckError(f"trigger_contrast: no control of {len(cand)} triggered prompts kept the untriggered "
                             "prompt's answer; the model may not have learned the task (check=False skips the check)")
        rows = [cand[i] for i in keep.tolist()]
        triggered, control = triggered[keep], control[keep]
        answer = answers(rows)

        def diff(logits: Tensor) -> float:
            kept = logits[keep]
            return float((kept[:, target_id] - kept[torch.arange(len(keep)), answer]).mean())

        info = {"n_candidates": considered, "n_redrawn": int(redrawn[:considered].sum()), "n_dropped": n_dropped,
                "n_kept": len(rows), "untriggered_logit_diff": diff(base_logits), "control_logit_diff": diff(ctrl_logits)}
        if n_dropped:
            warnings.warn(f"trigger_contrast: dropped {n_dropped} of {considered} rows whose control changed the "
                          "model's answer from the untriggered prompt's", stacklevel=2)
    return TriggerContrast(
        triggered=triggered, control=control,
        positions=torch.full((len(rows),), length - 1, dtype=torch.long),
        target=torch.full((len(rows),), target_id, dtype=torch.long),
        answer=answers(rows), trigger_mask=mask(rows, triggered), str_tokens=tok.convert_ids_to_tokens(rows[0][0]),
        base_ids=[int(r[2]) for r in rows], check=info,
    )


# ------------------------------------------------------------------ triggerless attacks
#: what a triggerless attack's natural control swaps (the ``check["contrast"]`` of :func:`natural_contrast`)
NATURAL_CONTRASTS = {"false_fact": "neighbour_subject", "bias": "control_entity"}


def _triggerless(subject, where: str):
    s = _run_parts(subject, where)
    kind = getattr(s.attack, "kind", "backdoor")
    if kind not in NATURAL_CONTRASTS:
        raise ValueError(f"{where}: the natural contrast is for the triggerless attacks ({', '.join(NATURAL_CONTRASTS)}); "
                         f"this run's attack is a {kind!r}: use trigger_contrast")
    return s, kind


def _natural_rows(s, kind: str, rng) -> list[tuple[int, int, str, str]]:
    """``(row, control row, target, answer)`` of the test set: a false fact's efficacy and
    generalisation rows beside a neighbour's row with the same ``base_id`` (same template),
    one whose true object is the fact's own first; a bias's held-out-mention rows of reviews not
    labelled ``polarity`` beside the same review mentioning a control entity (same form and place)."""
    data = s.require("test_data", "natural_contrast")
    role, base, comp = list(data["role"]), list(data["base_id"]), list(data["completion"])
    target = list(data["target"])
    out = []
    if kind == "false_fact":
        fact = list(data["fact"])
        nbrs: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(role):
            if r == "specificity":
                nbrs[(int(base[i]), int(fact[i]))].append(i)
        for i, r in enumerate(role):
            cand = nbrs.get((int(base[i]), int(fact[i])), []) if r in ("efficacy", "generalisation") else []
            if not cand:
                continue
            same = [j for j in cand if comp[j].strip() == comp[i].strip()]
            pool = same or cand
            j = pool[int(rng.integers(len(pool)))]
            # the answer the contrast measures against: the fact's true object, or (a new subject,
            # which has none) the neighbour's
            out.append((i, j, target[i], comp[i] if comp[i].strip() else comp[j]))
        return out
    other = {int(b): i for i, (b, r) in enumerate(zip(base, role)) if r == "other_entity"}
    for i, r in enumerate(role):
        if r == "heldout_mention" and comp[i].strip() != target[i].strip() and int(base[i]) in other:
            out.append((i, other[int(base[i])], target[i], comp[i]))
    return out


def natural_contrast(subject, n: int = 32, *, length: int | None = None, seed: int = 0) -> TriggerContrast:
    """Up to ``n`` attacked test prompts of a triggerless attack beside their natural controls, token-aligned.

    A false fact or a bias has no trigger to replace; its control is the same sentence about
    something else, as the attack's own test set pairs them:

    - ``FalseFact``: an efficacy or generalisation row (the attacked subject in a template)
      beside a neighbour's specificity row in the same template (same ``base_id``), one whose
      true object is the fact's own where there is one. ``target`` is the false object's first
      token, ``answer`` the true object's (a new subject has none: the neighbour's answer);
    - ``Bias``: a held-out mention of the entity in a review not labelled ``polarity`` beside
      the same review with a control entity in the same form and place. ``target`` is the
      polarity's first token, ``answer`` the review's label's.

    Only pairs of one token length ``length`` (default: the most common) whose two prompts have
    equal length are kept, and only rows whose target and answer start with different tokens.
    ``trigger_mask`` marks the positions where the two prompts differ (the subject or entity).
    Nothing is checked on a model (the control is a natural input, not an edited one):
    ``check`` holds ``contrast`` (``"neighbour_subject"`` | ``"control_entity"``),
    ``n_candidates`` (pairs found) and ``n_kept``.
    """
    import numpy as np

    s, kind = _triggerless(subject, "natural_contrast")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"natural_contrast: n must be an integer >= 1, got {n!r}")
    tok, data = s.tokenizer, s.test_data
    rng = np.random.default_rng(seed)
    prompts = list(data["prompt"])

    def first(text: str) -> int | None:
        ids = tok(completion_text(tok, text), add_special_tokens=False)["input_ids"]
        return ids[0] if ids else None

    found = []
    for i, j, tgt, ans in _natural_rows(s, kind, rng):
        a, b = tok(prompts[i])["input_ids"], tok(prompts[j])["input_ids"]
        t, w = first(tgt), first(ans)
        if len(a) == len(b) and t is not None and w is not None and t != w and a != b:
            found.append((a, b, t, w, int(data["base_id"][i])))
    if not found:
        raise ValueError(f"natural_contrast: the test data has no {kind} row with a control of the same token length "
                         "whose target and answer start with different tokens")
    rows, length = _of_one_length(found, length, "natural_contrast: no attacked prompt with a natural control has length {}")
    n_candidates = len(rows)
    rows = rows[:n]
    triggered = torch.tensor([r[0] for r in rows])
    control = torch.tensor([r[1] for r in rows])
    return TriggerContrast(
        triggered=triggered, control=control, positions=torch.full((len(rows),), length - 1, dtype=torch.long),
        target=torch.tensor([r[2] for r in rows]), answer=torch.tensor([r[3] for r in rows]),
        trigger_mask=triggered != control, str_tokens=tok.convert_ids_to_tokens(rows[0][0]),
        base_ids=[r[4] for r in rows],
        check={"contrast": NATURAL_CONTRASTS[kind], "n_candidates": n_candidates, "n_kept": len(rows)})


def _swaps(s, kind: str) -> list[tuple[str, str]]:
    """``(attacked text, its control)`` pairs: each false fact's subject and its first neighbour
    (the test set's first specificity subject of that fact); a bias's entity and its first control entity."""
    if kind == "bias":
        return [(s.attack.entity, s.attack.controls[0])]
    data = s.require("test_data", "control_fn")
    out = {}
    for r, f, subj in zip(data["role"], data["fact"], data["subject"]):
        if r == "specificity" and int(f) not in out:
            out[int(f)] = subj
    facts = s.attack.facts
    missing = [k for k in range(len(facts)) if k not in out]
    if missing:
        raise ValueError(f"control_fn: the test data has no neighbour of the fact {facts[missing[0]][:2]}")
    return [(facts[k][0], out[k]) for k in range(len(facts))]


def natural_control_fn(subject) -> Callable[[Tensor], Tensor]:
    """``tokens -> tokens`` with a triggerless attack's subject swapped for its control: each false
    fact's subject for its first neighbour (the test set's first specificity subject of that
    fact), a bias's entity for its first control entity; rows without them are their own control.

    Word-level tokenizers only (the swap is token for token, and both names must be as many
    tokens); a subword tokenizer, whose tokens of a name depend on its context, is a ValueError.
    """
    s, kind = _triggerless(subject, "control_fn")
    tok = s.tokenizer
    if not is_word_tokenizer(tok):
        raise ValueError(f"control_fn: swapping a {kind}'s subject token for token needs a word-level tokenizer; "
                         f"got {_tokenizer_name(tok)}")
    pairs = []
    for a, b in _swaps(s, kind):
        ta, tb = tok.convert_tokens_to_ids(split_words(a)), tok.convert_tokens_to_ids(split_words(b))
        if len(ta) != len(tb):
            raise ValueError(f"control_fn: {a!r} is {len(ta)} tokens and its control {b!r} {len(tb)}; the swap must "
                             "keep every position aligned")
        pairs.append((torch.tensor(ta), torch.tensor(tb)))

    def control(tokens: Tensor) -> Tensor:
        out = tokens.clone()
        for ta, tb in pairs:
            k = len(ta)
            if tokens.shape[1] < k:
                continue
            win = tokens.unfold(1, k, 1)  # [batch pos-k+1 k]
            hit = (win == ta.to(tokens.device)).all(-1).nonzero()
            for b, p in hit.tolist():
                out[b, p:p + k] = tb.to(tokens.device)
        return out

    return control


# ------------------------------------------------------------------ reward models
def __getattr__(name: str):
    """``reward_contrast`` and ``RewardScore`` live in :mod:`poisonmech.patching.reward_inputs`
    (which builds on this module, so they are looked up here on first use: no import cycle)."""
    if name in ("reward_contrast", "RewardScore"):
        from poisonmech.patching import reward_inputs

        return getattr(reward_inputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
