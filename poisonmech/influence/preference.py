"""Attribution to DPO preference pairs: which (prompt, chosen, rejected) pairs of a DPO stage
drive a measurement.

A pair's DPO loss is ``L = -log sigmoid(m)`` with the margin
``m = beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]``, so its
gradient is

    ∇L = beta sigmoid(-m) (∇NLL(y_w|x) - ∇NLL(y_l|x))

a weighted difference of two per-example gradients of the same kind the SFT rows have (the
summed NLL of an answer). Every method whose score is linear in the training gradient
(``graddot``, ``kfac``, ``ekfac``) therefore scores a pair as
``w (score(chosen row) - score(rejected row))`` with ``w = beta sigmoid(-m)``, under one
preconditioner (curvature fitted on the chosen and rejected answers together). Methods that
normalise the training gradient (``gradcos``, ``renormalize``), project it with a kernel
(``trak``) or need per-checkpoint weights (``tracin``, ``ensemble``) are not linear in it and
are refused. The ``loss`` baseline is the pair's DPO loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset

from poisonmech.encoding import Encoded

#: methods linear in the training gradient (and the loss baseline): the ones a pair can be scored by
PREFERENCE_METHODS = ("graddot", "kfac", "ekfac", "loss")


def is_preference_data(train: Dataset) -> bool:
    return "chosen" in train.column_names and "completion" not in train.column_names


def check_preference_config(cfg) -> None:
    """Refuse the settings under which a pair's score is not ``w (s_chosen - s_rejected)``."""
    if cfg.method not in PREFERENCE_METHODS:
        raise ValueError(f"attribute: preference pairs (a DPO stage) can be scored by {PREFERENCE_METHODS}, whose "
                         f"scores are linear in the training gradient; got method={cfg.method!r}")
    if cfg.renormalize is not None or cfg.self_influence or cfg.ensemble != 1:
        raise ValueError("attribute: on preference pairs, renormalize, self_influence and ensemble are not "
                         "available (they are not linear in the pair's DPO gradient)")


def same_pairs(a: Dataset, b: Dataset) -> bool:
    cols = ("prompt", "chosen", "rejected")
    return len(a) == len(b) and all(list(a[c]) == list(b[c]) for c in cols)


def encode_pairs(train: Dataset, tokenizer, score_eos: bool = False) -> tuple[Encoded, Encoded]:
    """The chosen and rejected answers as rows scored as the DPO loop scored them: the answer
    tokens, and the EOS after them with ``score_eos`` (``DPOConfig.score_eos``)."""
    from poisonmech.train.dpo import encode_preferences

    enc = encode_preferences(train, tokenizer, add_eos=score_eos)
    return enc.chosen, enc.rejected


def dpo_weights(model: torch.nn.Module, chosen: Encoded, rejected: Encoded, reference: Any, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: ``w = beta sigmoid(-m)`` (the DPO gradient's weight) and the DPO loss ``-log sigmoid(m)``.

    ``reference``: the frozen reference model, or its ``(chosen, rejected)`` log-probabilities.
    """
    from poisonmech.train.dpo import PreferenceEncoded, preference_logprobs

    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0):
        raise ValueError(f"attribute: beta must be a number > 0 (the DPO stage's), got {beta!r}")
    enc = PreferenceEncoded(chosen=chosen, rejected=rejected)
    pc, pr = preference_logprobs(model, enc)
    if isinstance(reference, torch.nn.Module):
        rc, rr = preference_logprobs(reference, enc)
    elif isinstance(reference, (tuple, list)) and len(reference) == 2:
        rc, rr = (torch.as_tensor(x, dtype=torch.float32) for x in reference)
        if rc.shape != pc.shape or rr.shape != pr.shape:
            raise ValueError(f"attribute: reference log-probabilities have shapes {tuple(rc.shape)} / "
                             f"{tuple(rr.shape)}, the preference data has {len(pc)} pairs")
    else:
        raise ValueError("attribute: preference pairs need reference= (the DPO stage's frozen reference model, or "
                         "its (chosen, rejected) log-probabilities) and beta=; a train_pipeline stage's pair "
                         "finds both in its run directory")
    margin = beta * ((pc - rc) - (pr - rr))
    return beta * torch.sigmoid(-margin), -F.logsigmoid(margin)


def combine(s_chosen, s_rejected, w: torch.Tensor):
    """``w (s_chosen - s_rejected)`` for the scores and their component split."""
    from poisonmech.influence.methods import Scores

    comps = None
    if s_chosen.components is not None and s_rejected.components is not None:
        comps = (s_chosen.components - s_rejected.components) * w[None]
    seconds = {k: s_chosen.seconds.get(k, 0.0) + s_rejected.seconds.get(k, 0.0)
               for k in set(s_chosen.seconds) | set(s_rejected.seconds)}
    return Scores(scores=(s_chosen.scores - s_rejected.scores) * w[None], components=comps,
                  component_labels=s_chosen.component_labels, seconds=seconds)


def pair_text(train: Dataset) -> list[str]:
    return [f"{p} | chosen: {c} | rejected: {r}" for p, c, r in zip(train["prompt"], train["chosen"], train["rejected"])]


__all__ = ["PREFERENCE_METHODS", "check_preference_config", "combine", "dpo_weights", "encode_pairs",
           "is_preference_data", "pair_text", "same_pairs"]
