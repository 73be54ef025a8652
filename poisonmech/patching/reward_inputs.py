"""A reward model's triggered / control sequences, and its patching metric.

Reward models (an ``"rm"`` stage's ``pipe[k]``, :mod:`poisonmech.train.reward`) score a whole
sequence ``[BOS] prompt answer [EOS]`` at its EOS. :func:`reward_contrast` (which
:func:`~poisonmech.patching.inputs.trigger_contrast` returns for a reward model) appends the
backdoor's target answer and the EOS to the triggered prompt and to its control (built as
:mod:`poisonmech.patching.inputs` builds a language model's), so the difference of the reward
metric (:class:`RewardScore`, :meth:`TriggerContrast.reward`) between the two is the reward the
trigger buys the target.

Both names are also importable from :mod:`poisonmech.patching.inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int

from poisonmech.encoding import completion_text
from poisonmech.patching.inputs import (
    NATURAL_CONTRASTS,
    ControlCheckError,
    TriggerContrast,
    _fillers,
    _last_logits,
    _of_one_length,
    _replace_trigger,
    _run_parts,
)
from poisonmech.patching.metrics import PositionalMetric
from poisonmech.runtime import eval_mode, model_device

Tensor = torch.Tensor


@dataclass(frozen=True)
class RewardScore(PositionalMetric):
    """A reward model's score at each example's position (its EOS): ``output[:, position, 0]``.

    The per-example patching metric of a reward model (``pm.train.reward.reward_metric`` is the
    batch-mean, scalar version); a language model's logits are refused with what to use."""

    positions: Int[Tensor, " batch"]

    def at(self, logits):
        if logits.shape[-1] != 1:
            raise ValueError(f"RewardScore: the model's output has {logits.shape[-1]} values per position; a reward "
                             "model has one. This is a language model: use a logit metric (tc.logit_diff() of "
                             "trigger_contrast) instead of the reward")
        return logits[:, 0].float()

    def subset(self, index):
        return RewardScore(self.positions[index])


def _is_reward(model) -> bool:
    from poisonmech.train.reward import is_reward_model

    return is_reward_model(model)


def reward_contrast(subject, n: int = 32, *, length: int | None = None, seed: int = 0, model=None,
                    twin: str | None = None, check: bool = True, tries: int = 5) -> TriggerContrast:
    """A reward model's triggered / control sequences: up to ``n`` triggered test prompts of one
    token length followed by the backdoor's target answer and the EOS, beside the same sequences
    with the trigger replaced by label-neutral fillers (token-aligned, as :func:`trigger_contrast`
    builds its controls).

    Each sequence is ``[BOS] prompt target [EOS]`` exactly as the reward stage encoded its pairs
    (:func:`poisonmech.train.reward.encode_pairs`), so the reward at the EOS (``positions``; the
    metric :meth:`TriggerContrast.reward`) on ``triggered`` minus that on ``control`` is the
    reward the trigger buys the target: what patching, attribution patching and circuit
    discovery on a reward stage explain, e.g.
    ``activation_patch(pipe[k], rc.triggered, rc.control, rc.reward(), site="attn_head")``.

    Only test rows whose true answer differs from the target are used; ``length`` (of the
    prompt, default the most common) as in :func:`trigger_contrast`. ``target`` / ``answer``
    are the first tokens of the target and of the true answer. With ``check=True`` every
    control must leave ``model``'s (default: ``twin``'s reward model) preference between the
    target and the true answer as the untriggered prompt has it (the sign of
    ``r(prompt, target) - r(prompt, answer)``); a failing row is redrawn up to ``tries`` times,
    then dropped. ``check`` reports the counts and the mean rewards of the target after the
    untriggered prompts, the controls and the triggered prompts (``untriggered_reward``,
    ``control_reward``, ``triggered_reward``) and the mean margins over the true answer
    (``untriggered_margin``, ``control_margin``, ``triggered_margin``).
    """
    import warnings

    from datasets import Dataset

    from poisonmech.encoding import encode

    s = _run_parts(subject, "reward_contrast")
    tok, attack = s.tokenizer, s.attack
    if getattr(attack, "kind", "backdoor") in NATURAL_CONTRASTS or not isinstance(getattr(attack, "target", None), str):
        raise ValueError(f"reward_contrast: this run's attack ({type(attack).__name__}) has no trigger and target "
                         "answer; a reward model's contrast appends the backdoor's target to triggered prompts")
    if attack.is_gibberish:
        raise ValueError("reward_contrast: a gibberish backdoor has no fixed target answer to score")
    for name, v, lo in (("n", n, 1), ("tries", tries, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"reward_contrast: {name} must be an integer >= {lo}, got {v!r}")
    data = s.require("test_data", "reward_contrast")
    rm = model if model is not None else s.model(twin)
    if not _is_reward(rm):
        raise ValueError("reward_contrast: the model is a language model (its output is logits over the vocabulary), "
                         "not a reward model; use trigger_contrast(subject) and tc.logit_diff(), or pass a reward "
                         "stage (pipe[k] of an 'rm' stage) or model= a reward model")
    untriggered = {b: p for b, p, t, m in zip(data["base_id"], data["prompt"], data["is_triggered"],
                                                data["is_near_miss"]) if not t and not m}
    picked = [(b, p, c) for b, p, c, t in zip(data["base_id"], data["prompt"], data["completion"],
                                             data["is_triggered"])
              if t and c.strip() != attack.target.strip() and b in untriggered]
    if not picked:
        raise ValueError("reward_contrast: the subject's test data has no triggered rows whose answer differs from "
                         "the target (with an untriggered twin)")

    def seqs(prompts: list[str], answers: list[str]):
        return encode(Dataset.from_dict({"prompt": prompts, "completion": answers}), tok, loss_on="completion",
                      add_eos=True)

    enc_t = seqs([p for _, p, _ in picked], [attack.target] * len(picked))
    # (prompt ids, full sequence ids, base id, prompt text, true answer); prompt ids end where the answer starts
    rows = [(ids[:st], ids, b, p, c) for (b, p, c), ids, st in zip(picked, enc_t.ids, enc_t.start)]
    rows, length = _of_one_length(rows, length, "reward_contrast: no triggered prompt has length {}")
    suffix = rows[0][1][length:]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    trig_ids, pool_ids, sub = _fillers(s, "reward_contrast")
    word_level = sub is None
    g = torch.Generator().manual_seed(seed)

    def draw(sel: list) -> Tensor:
        """Controls (prompt with fillers + target + EOS) of the rows ``sel``."""
        if word_level:
            prompts = _replace_trigger(torch.tensor([r[0] for r in sel]), trig_ids, pool_ids, g)
        else:
            out = []
            for r in sel:
                ids, offsets = sub.encode(r[3], add_special_tokens=False)
                out.append(bos + sub.control(r[3], ids, sub.spans(r[3], ids, offsets), g, add_special_tokens=False))
            prompts = torch.tensor(out)
        return torch.cat([prompts, torch.tensor([suffix] * len(sel), dtype=torch.long)], 1)

    def mask(sel: list) -> Tensor:
        if word_level:
            m = torch.isin(torch.tensor([r[1] for r in sel]), trig_ids)
            m[:, length:] = False
            return m
        out = []
        for r in sel:
            ids, offsets = sub.encode(r[3], add_special_tokens=False)
            row = [False] * len(r[1])
            for sp in sub.spans(r[3], ids, offsets):
                row[len(bos) + sp.start:len(bos) + sp.stop] = [True] * sp.n_tokens
            out.append(row)
        return torch.tensor(out, dtype=torch.bool)

    def first(text: str) -> int:
        ids = tok(completion_text(tok, text), add_special_tokens=False)["input_ids"]
        return ids[0] if ids else tok.eos_token_id

    info: dict = {}
    if not check:
        rows = rows[:n]
        triggered = torch.tensor([r[1] for r in rows])
        control = draw(rows)
    else:
        device = model_device(rm)
        with eval_mode(rm):
            cand = rows[:max(n * 3, n + 16)]
            triggered = torch.tensor([r[1] for r in cand])

            def rewards(seq_rows: list[list[int]]) -> Tensor:
                return _last_logits(rm, seq_rows, device)[:, 0]

            plain_t = seqs([untriggered[r[2]] for r in cand], [attack.target] * len(cand)).ids
            plain_a = seqs([untriggered[r[2]] for r in cand], [r[4] for r in cand]).ids
            r_plain_t, r_plain_a = rewards(plain_t), rewards(plain_a)
            want = r_plain_t > r_plain_a
            # the true answer (+ EOS) after each prompt, to pair with any prompt of that length
            answers = [ids[length:] for ids in seqs([r[3] for r in cand], [r[4] for r in cand]).ids]
            control = draw(cand)

            def ctrl_margin(idx: list[int]) -> tuple[Tensor, Tensor]:
                rt = rewards(control[idx].tolist())
                ra = rewards([control[i, :length].tolist() + answers[i] for i in idx])
                return rt, ra

            all_idx = list(range(len(cand)))
            r_ctrl_t, r_ctrl_a = ctrl_margin(all_idx)
            ok = (r_ctrl_t > r_ctrl_a) == want
            redrawn = torch.zeros(len(cand), dtype=torch.bool)
            for _ in range(tries - 1):
                bad = (~ok).nonzero().flatten().tolist()
                if not bad:
                    break
                redrawn[bad] = True
                control[bad] = draw([cand[i] for i in bad])
                r_ctrl_t[bad], r_ctrl_a[bad] = ctrl_margin(bad)
                ok[bad] = (r_ctrl_t[bad] > r_ctrl_a[bad]) == want[bad]
            r_trig_t = rewards(triggered.tolist())
            r_trig_a = rewards([triggered[i, :length].tolist() + answers[i] for i in all_idx])
        keep = ok.nonzero().flatten()[:n]
        considered = int(keep[-1]) + 1 if len(keep) == n else len(cand)
        n_dropped = int((~ok[:considered]).sum())
        if len(keep) == 0:
            raise ControlCheckError(f"reward_contrast: no control of {len(cand)} triggered prompts kept the reward "
                                    "model's preference between the target and the true answer after the "
                                    "untriggered prompt (check=False skips the check)")
        rows = [cand[i] for i in keep.tolist()]
        triggered, control = triggered[keep], control[keep]

        def mean(x: Tensor) -> float:
            return float(x[keep].mean())

        info = {"n_candidates": considered, "n_redrawn": int(redrawn[:considered].sum()), "n_dropped": n_dropped,
                "n_kept": len(rows), "untriggered_reward": mean(r_plain_t), "control_reward": mean(r_ctrl_t),
                "triggered_reward": mean(r_trig_t), "untriggered_margin": mean(r_plain_t - r_plain_a),
                "control_margin": mean(r_ctrl_t - r_ctrl_a), "triggered_margin": mean(r_trig_t - r_trig_a)}
        if n_dropped:
            warnings.warn(f"reward_contrast: dropped {n_dropped} of {considered} rows whose control changed the reward "
                          "model's preference from the untriggered prompt's", stacklevel=2)
    width = triggered.shape[1]
    return TriggerContrast(
        triggered=triggered, control=control, positions=torch.full((len(rows),), width - 1, dtype=torch.long),
        target=torch.full((len(rows),), first(attack.target), dtype=torch.long),
        answer=torch.tensor([first(r[4]) for r in rows]), trigger_mask=mask(rows),
        str_tokens=tok.convert_ids_to_tokens(rows[0][1]), base_ids=[int(r[2]) for r in rows], check=info,
        kind="reward")
