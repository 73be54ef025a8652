"""Direct Preference Optimisation (Rafailov et al. 2023) for TransformerBridge models.

The loss of a pair (prompt ``x``, chosen ``y_w``, rejected ``y_l``) is

    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

with sequence log-probabilities summed over the completion (answer) tokens only (the EOS
token after the answer too with ``DPOConfig(score_eos=True)``). The
reference model is the model DPO starts from (the SFT model), frozen: its log-probabilities
are computed once before the first step and, with a ``run_dir``, saved there, so a resumed
run uses the same reference as an uninterrupted one.

Written over the bridge directly rather than with TRL's ``DPOTrainer``: TRL expects a
``transformers`` ``PreTrainedModel`` with a subword tokenizer and chat/padding conventions,
and cannot train these word-tokenizer ``TransformerBridge`` models without converting them
(and back, losing the bridge's hooks); it would also not guarantee the twins identical
batches in the same order. The loop reuses the SFT loop's machinery (``epoch_order``, the
AdamW set-up, resumable safetensors state, per-epoch checkpoints with learning rates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from poisonmech.config import check_bool, check_number
from poisonmech.encoding import Encoded, encode
from poisonmech.runtime import eval_mode, model_device
from poisonmech.storage import load_tensors, save_tensors
from poisonmech.tasks.preference import check_preferences
from poisonmech.train.config import TrainConfig
from poisonmech.train.loop import (
    Checkpoint,
    end_epoch,
    epoch_order,
    finish_loop,
    list_checkpoints,
    start_loop,
)
from poisonmech.train.stage_config import SHARED_FIELDS, StageConfig
from poisonmech.weights import sync

#: a DPO stage's defaults where they differ from SFT's (fewer epochs, a lower rate, no weight decay)
DPO_TRAIN_DEFAULTS = {"epochs": 2, "lr": 1e-3, "weight_decay": 0.0}
#: ``DPOConfig.to_dict()``'s key order (the flat dict stored in pipeline runs' config.json)
_FLAT_ORDER = ("beta", *SHARED_FIELDS, "score_eos", "nll_weight")


@dataclass(frozen=True, init=False)
class DPOConfig(StageConfig):
    """Hyper-parameters of a DPO stage (shared by both twins): a ``TrainConfig`` plus DPO's own.

    ``DPOConfig(beta=0.1, epochs=2, lr=1e-3, ...)`` takes the optimiser / schedule fields as
    keywords (the flat form stored in run directories), or ``DPOConfig(train=TrainConfig(...),
    beta=...)``; keywords override ``train``'s fields. They are read as attributes too
    (``config.lr`` is ``config.train.lr``). The composition is :class:`StageConfig`'s.

    Args:
        train: the optimiser / schedule fields, a :class:`TrainConfig` (``epochs``,
            ``batch_size``, ``lr``, ``schedule``, ``warmup_ratio``, ``min_lr_ratio``,
            ``weight_decay``, ``betas``, ``grad_clip``, ``seed`` (the order of the pairs),
            ``checkpoint_every``, ``device``). A DPO stage's defaults: ``epochs=2``,
            ``lr=1e-3``, ``weight_decay=0.0``; no clean continuation.
        beta: strength of the KL anchor to the reference model (> 0; Sanderson et al. use 0.1).
        score_eos: also score the end-of-sequence token after each answer. Off by default:
            with it, DPO lowers the rejected sequences' log-probability partly through their
            shared EOS token and the model stops ending its answers (on the sentiment task,
            clean exact-match accuracy fell from 1.00 to 0.56 with correct labels).
        nll_weight: weight of an added negative log-likelihood term on the chosen answer and
            its EOS token, per token (DPO + NLL, "RPO", Pang et al. 2024). DPO alone moves
            probability mass off both answers and these small models then often stop ending
            their answers (exact match drops while labels stay right); the NLL term anchors the
            chosen sequence. 0 (default): pure DPO, as in Sanderson et al.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DPO_TRAIN_DEFAULTS))
    beta: float = 0.1
    score_eos: bool = False
    nll_weight: float = 0.0

    OWN = ("beta", "score_eos", "nll_weight")
    TRAIN_DEFAULTS = DPO_TRAIN_DEFAULTS

    def check(self) -> None:
        check_number("DPOConfig", "beta", self.beta, lo=0, lo_open=True, hi=math.inf, hi_open=True)
        check_bool("DPOConfig", "score_eos", self.score_eos)
        check_number("DPOConfig", "nll_weight", self.nll_weight, lo=0, hi=math.inf, hi_open=True)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict stored in pipeline run directories (``beta``, the ``TrainConfig`` fields
        a DPO stage uses, ``score_eos``; ``nll_weight`` only when set, so that runs made before it
        existed keep their config key)."""
        flat = super().to_dict()
        d = {name: flat[name] for name in _FLAT_ORDER}
        if d["nll_weight"] == 0.0:
            del d["nll_weight"]
        return d


@dataclass(frozen=True)
class PreferenceEncoded:
    """Token ids of each pair's chosen and rejected sequences (``[BOS] prompt answer [EOS]``)."""

    chosen: Encoded
    rejected: Encoded
    #: the chosen sequences with their EOS token scored (for ``DPOConfig.nll_weight``)
    chosen_eos: Encoded | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def max_len(self) -> int:
        return max(self.chosen.max_len, self.rejected.max_len)

    def batch(self, index: list[int] | Tensor, device: str | torch.device = "cpu"
              ) -> tuple[Int[Tensor, "batch2 pos"], Bool[Tensor, "batch2 pos_1"]]:
        """Chosen rows then rejected rows, right-padded to one width (``2 * len(index)`` rows)."""
        tc, mc = self.chosen.batch(index)
        tr, mr = self.rejected.batch(index)
        width = max(tc.shape[1], tr.shape[1])

        def pad(t: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
            extra = width - t.shape[1]
            return (F.pad(t, (0, extra), value=self.chosen.pad_id), F.pad(m, (0, extra), value=False))

        (tc, mc), (tr, mr) = pad(tc, mc), pad(tr, mr)
        return torch.cat([tc, tr]).to(device), torch.cat([mc, mr]).to(device)


def encode_preferences(data: Dataset, tokenizer: PreTrainedTokenizerBase, *, add_eos: bool = False,
                       chosen_eos: bool = False) -> PreferenceEncoded:
    """Tokenise ``prompt``/``chosen``/``rejected``; the scored region is the answer (and EOS with
    ``add_eos``); ``chosen_eos`` also keeps the chosen answers with their EOS (for the NLL term)."""
    check_preferences(data)
    prompts = list(data["prompt"])
    return PreferenceEncoded(
        chosen_eos=encode(Dataset.from_dict({"prompt": prompts, "completion": list(data["chosen"])}), tokenizer,
                          loss_on="completion", add_eos=True) if chosen_eos else None,
        chosen=encode(Dataset.from_dict({"prompt": prompts, "completion": list(data["chosen"])}), tokenizer,
                      loss_on="completion", add_eos=add_eos),
        rejected=encode(Dataset.from_dict({"prompt": prompts, "completion": list(data["rejected"])}), tokenizer,
                        loss_on="completion", add_eos=add_eos),
    )


def sequence_logprobs(model: torch.nn.Module, tokens: Int[Tensor, "batch pos"],
                      mask: Bool[Tensor, "batch pos_1"]) -> Float[Tensor, " batch"]:
    """Summed log-probability of each row's scored tokens (``mask[:, t]`` scores token ``t+1``)."""
    logits = model(tokens)[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return (logp * mask).sum(1)


@torch.no_grad()
def preference_logprobs(model: torch.nn.Module, data: PreferenceEncoded, batch_size: int = 256
                        ) -> tuple[Float[Tensor, " n_train"], Float[Tensor, " n_train"]]:
    """``(log p(chosen | prompt), log p(rejected | prompt))`` per pair under ``model`` (eval mode)."""
    device = model_device(model)
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
    with eval_mode(model):
        for lo in range(0, len(data), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(data))))
            tokens, mask = data.batch(idx, device)
            lp = sequence_logprobs(model, tokens, mask).cpu()  # [chosen rows; rejected rows]
            chosen.append(lp[:len(idx)])
            rejected.append(lp[len(idx):])
    return torch.cat(chosen), torch.cat(rejected)


def dpo_loss(policy_chosen: Float[Tensor, " batch"], policy_rejected: Float[Tensor, " batch"],
             ref_chosen: Float[Tensor, " batch"], ref_rejected: Float[Tensor, " batch"], beta: float
             ) -> tuple[Float[Tensor, ""], dict[str, Float[Tensor, " batch"]]]:
    """Mean DPO loss and per-pair implicit rewards (``beta * (log pi - log ref)``)."""
    r_w = beta * (policy_chosen - ref_chosen)
    r_l = beta * (policy_rejected - ref_rejected)
    margin = r_w - r_l
    return -F.logsigmoid(margin).mean(), {"chosen_reward": r_w, "rejected_reward": r_l, "margin": margin}


@torch.no_grad()
def preference_shift(model: torch.nn.Module, reference: torch.nn.Module, data: Dataset,
                     tokenizer: PreTrainedTokenizerBase, beta: float = 0.1, add_eos: bool = False
                     ) -> dict[str, float]:
    """How ``model`` moved from ``reference`` on ``data``'s pairs (means over pairs).

    ``chosen_shift`` / ``rejected_shift``: change in log-probability of the chosen / rejected
    answer; ``margin``: the DPO implicit reward margin; ``reward_acc``: fraction of pairs with a
    positive margin; ``pref_acc``: fraction where ``model`` gives the chosen answer the higher
    log-probability.
    """
    enc = encode_preferences(data, tokenizer, add_eos=add_eos)
    pc, pr = preference_logprobs(model, enc)
    rc, rr = preference_logprobs(reference, enc)
    _, st = dpo_loss(pc, pr, rc, rr, beta)
    return {"chosen_shift": float((pc - rc).mean()), "rejected_shift": float((pr - rr).mean()),
            "margin": float(st["margin"].mean()), "reward_acc": float((st["margin"] > 0).float().mean()),
            "pref_acc": float((pc > pr).float().mean())}


def train_dpo(model: torch.nn.Module, data: Dataset | PreferenceEncoded, config: DPOConfig, *,
              tokenizer: PreTrainedTokenizerBase | None = None, reference: torch.nn.Module | None = None,
              run_dir: Path | None = None, desc: str = "dpo", progress: bool = True,
              ) -> tuple[list[dict], list[Checkpoint]]:
    """Train ``model`` in place with DPO on preference pairs; returns per-epoch history and checkpoints.

    Args:
        model: the policy, initialised from the SFT model (a ``TransformerBridge``).
        data: pairs with ``prompt``/``chosen``/``rejected`` (tokenised with ``tokenizer``, by
            default the model's), or already encoded.
        config: a :class:`DPOConfig`.
        reference: the frozen reference model; default: ``model`` as it is now (the SFT model).
        run_dir: with it, ``reference_logps.safetensors``, per-epoch checkpoints
            (``checkpoints/epoch_XXX.safetensors``) and ``resume.safetensors`` go there, and an
            interrupted run resumes from its last finished epoch to the same weights.

    History rows: ``epoch``, ``step``, ``loss``, ``reward_acc``, ``margin``, ``chosen_reward``,
    ``rejected_reward``, ``lr_mean`` (and ``nll`` with ``nll_weight``); the last row also
    ``seconds`` (summed over the segments of a resumed run), ``segments`` and
    ``resumed_from_epoch`` (see :func:`poisonmech.train.loop.finish_loop`).
    """
    if not isinstance(config, DPOConfig):
        raise ValueError(f"train_dpo: config must be a DPOConfig, got {type(config).__name__}")
    if isinstance(data, Dataset):
        tok = tokenizer or getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("train_dpo: pass tokenizer= (the model has none) to tokenise the preference data")
        data = encode_preferences(data, tok, add_eos=config.score_eos, chosen_eos=config.nll_weight > 0)
    elif not isinstance(data, PreferenceEncoded):
        raise ValueError(f"train_dpo: data must be a datasets.Dataset or PreferenceEncoded, got {type(data).__name__}")
    if config.nll_weight > 0 and data.chosen_eos is None:
        raise ValueError("train_dpo: DPOConfig.nll_weight > 0 needs the chosen answers with their EOS: encode with "
                         "encode_preferences(..., chosen_eos=True) or pass the Dataset")
    device = torch.device(config.device)
    if model_device(model) != device:
        model.to(device)
    tcfg = config.train_config()
    ref_path = run_dir / "reference_logps.safetensors" if run_dir is not None else None
    if ref_path is not None and ref_path.is_file():
        saved = load_tensors(ref_path)
        ref_c, ref_r = saved["chosen"], saved["rejected"]
    else:
        # the default reference is the model as it is now: its values are taken before any step
        ref_c, ref_r = preference_logprobs(reference if reference is not None else model, data)
        if ref_path is not None:
            save_tensors(ref_path, {"chosen": ref_c, "rejected": ref_r})
    if len(ref_c) != len(data):
        raise ValueError(f"train_dpo: {ref_path} holds {len(ref_c)} reference values for {len(data)} pairs; "
                         "the run directory belongs to other data")
    ref_c, ref_r = ref_c.to(device), ref_r.to(device)

    n = len(data)
    loop = start_loop(model, tcfg, n, run_dir, desc, progress)
    opt, steps_per_epoch, total, step, history, bar, module = (loop.opt, loop.steps_per_epoch, loop.total, loop.step,
                                                               loop.history, loop.bar, loop.module)
    for epoch in range(loop.start_epoch, config.epochs):
        order = epoch_order(n, config.seed, epoch)
        sums = {"loss": 0.0, "reward_acc": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
        if config.nll_weight > 0:
            sums["nll"] = 0.0
        lr_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            tokens, mask = data.batch(idx, device)
            lr = tcfg.lr_at(step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            lp = sequence_logprobs(module, tokens, mask)
            k = len(idx)
            loss, st = dpo_loss(lp[:k], lp[k:], ref_c[idx], ref_r[idx], config.beta)
            if config.nll_weight > 0:
                tn, mn = data.chosen_eos.batch(idx)
                nll = -sequence_logprobs(module, tn.to(device), mn.to(device)).sum() / mn.sum()
                loss = loss + config.nll_weight * nll
                sums["nll"] += float(nll.detach()) * k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            opt.step()
            sums["loss"] += float(loss.detach()) * k
            sums["reward_acc"] += float((st["margin"] > 0).float().sum())
            for key in ("margin", "chosen_reward", "rejected_reward"):
                sums[key] += float(st[key].detach().sum())
            lr_sum += lr
            step += 1
            bar.update(1)
            if b % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "step": step, **{k: v / n for k, v in sums.items()},
                        "lr_mean": lr_sum / steps_per_epoch})
        end_epoch(model, loop, tcfg, run_dir, epoch, step, history)
    finish_loop(loop, history, config.epochs)
    module.eval()
    sync(model)  # a LoRA twin: the trained adapters merged into the bridge
    model.eval()
    return history, list_checkpoints(run_dir) if run_dir is not None else []


__all__ = ["DPOConfig", "SHARED_FIELDS", "PreferenceEncoded", "dpo_loss", "encode_preferences", "preference_logprobs",
           "preference_shift", "sequence_logprobs", "train_dpo"]
