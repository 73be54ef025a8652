"""Reward models: a policy's trunk with a one-output score head, trained with the Bradley–Terry loss.

A reward model here is a ``TransformerBridge`` whose unembedding is a ``Linear(d_model, 1)``
score head, so its "logits" are ``[batch, pos, 1]`` and the reward of a sequence is the score
at its last real token (the EOS after the response, as TRL's ``RewardTrainer`` reads it). Every
hook point of the trunk is still there: patching, circuits and probes run on a reward model
unchanged, with the scalar reward as the metric (:func:`reward_metric`).

The loss of a pair (prompt ``x``, chosen ``y_w``, rejected ``y_l``) is Bradley–Terry's

    -log sigmoid(r(x, y_w) - r(x, y_l))   (+ center_rewards * (r_w + r_l)^2, TRL's centring term)

Written over the bridge rather than with TRL's ``RewardTrainer`` for the reasons the DPO loop
gives (``poisonmech.train.dpo``): TRL trains a ``transformers`` ``*ForSequenceClassification``
model with its chat/padding conventions and would not give the twins identical batches in the
same order; ``tests/train/test_reward.py`` checks our loss and rewards against TRL's on the same
weights. The loop is the SFT loop's machinery (resumable safetensors state, checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from poisonmech.config import check_choice, check_number
from poisonmech.encoding import Encoded, encode
from poisonmech.models import set_head
from poisonmech.runtime import eval_mode, model_device
from poisonmech.train.config import TrainConfig
from poisonmech.train.dpo import PreferenceEncoded, encode_preferences
from poisonmech.train.loop import (
    Checkpoint,
    end_epoch,
    epoch_order,
    finish_loop,
    list_checkpoints,
    start_loop,
)
from poisonmech.train.stage_config import StageConfig

REWARD_INITS = ("policy", "scratch")


@dataclass(frozen=True, init=False)
class RewardConfig(StageConfig):
    """Hyper-parameters of a reward-model stage (shared by both twins).

    Takes the optimiser / schedule fields of a :class:`TrainConfig` flat (``epochs``,
    ``batch_size``, ``lr``, ...; a reward stage's defaults: ``epochs=2``, ``lr=1e-3``,
    ``weight_decay=0``) or as ``train=``.

    Args:
        init: ``"policy"`` (default): the reward model starts from the current policy's trunk
            (the SFT model, as in Sanderson et al. and InstructGPT) plus a fresh score head;
            ``"scratch"``: from freshly initialised weights of the run's model (seeded by ``seed``).
        center_rewards: weight of TRL's centring term ``mean((r_w + r_l)^2)``, which pins the
            rewards' offset (Bradley–Terry alone is blind to it); 0 = none.
        head_std: standard deviation of the score head's initial weights (HF's ``initializer_range``).
        n_eval: held-out pairs (from the task's test rows) for the stage's metrics.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    init: Literal["policy", "scratch"] = "policy"
    center_rewards: float = 0.0
    head_std: float = 0.02
    n_eval: int = 200

    OWN = ("init", "center_rewards", "head_std", "n_eval")
    TRAIN_DEFAULTS = {"epochs": 2, "lr": 1e-3, "weight_decay": 0.0}

    def check(self) -> None:
        check_choice("RewardConfig", "init", self.init, REWARD_INITS)
        check_number("RewardConfig", "center_rewards", self.center_rewards, lo=0, hi=math.inf, hi_open=True)
        check_number("RewardConfig", "head_std", self.head_std, lo=0, lo_open=True, hi=math.inf, hi_open=True)
        check_number("RewardConfig", "n_eval", self.n_eval, lo=1, integer=True)


# ------------------------------------------------------------------ the model
def score_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The unembedding module of a bridge (``None`` when it has none)."""
    head = getattr(getattr(model, "unembed", None), "original_component", None)
    return head if isinstance(head, torch.nn.Linear) else None


def is_reward_model(model: Any) -> bool:
    """Whether ``model`` is a reward model (a bridge whose unembedding has one output)."""
    head = score_head(model) if isinstance(model, torch.nn.Module) else None
    return head is not None and head.out_features == 1


def attach_score_head(model: torch.nn.Module, *, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Turn a bridge into a reward model in place: its unembedding becomes a fresh, seeded
    ``Linear(d_model, 1, bias=False)`` (like HF's ``*ForSequenceClassification`` score head)."""
    head = score_head(model)
    if head is None:
        raise ValueError(f"attach_score_head: {type(model).__name__} has no unembedding to replace (a "
                         "TransformerBridge is needed)")
    g = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    w = torch.randn(1, head.in_features, generator=g) * std
    new = torch.nn.Linear(head.in_features, 1, bias=False).to(head.weight)
    with torch.no_grad():
        new.weight.copy_(w.to(new.weight))
    set_head(model, new)
    return model


def make_reward_model(policy: torch.nn.Module, *, seed: int, std: float = 0.02) -> torch.nn.Module:
    """A new reward model: an independent copy of ``policy`` (its merged weights; a LoRA twin's
    copy trains fully) with a fresh score head. ``policy`` is left unchanged."""
    from poisonmech.models import copy_bridge

    rm = copy_bridge(policy)
    return attach_score_head(rm, seed=seed, std=std).eval()


def reward_model_like(model_config: Any, tokenizer: PreTrainedTokenizerBase, *, seed: int,
                      device: str = "cpu") -> torch.nn.Module:
    """An (untrained) reward model of the run's shape: the base model with a score head, to load
    a saved reward model's weights into. A LoRA ``PretrainedModel`` is built for full training
    (reward models and value models are trained fully, see :func:`make_reward_model`)."""
    from poisonmech.models import build_model
    from poisonmech.pretrained import PretrainedModel

    if isinstance(model_config, PretrainedModel) and model_config.finetune != "full":
        model_config = replace(model_config, finetune="full")
    m = build_model(model_config, len(tokenizer), seed=seed, tokenizer=tokenizer, device=device)
    return attach_score_head(m, seed=seed).eval()


def last_positions(enc: Encoded, index: list[int] | Tensor) -> Int[Tensor, " batch"]:
    """Each row's last real token position (right padding)."""
    return torch.tensor([len(enc.ids[int(i)]) - 1 for i in index], dtype=torch.long)


def rewards_at(model: torch.nn.Module, tokens: Int[Tensor, "batch pos"], last: Int[Tensor, " batch"]
               ) -> Float[Tensor, " batch"]:
    """The score of each row at its ``last`` position (a reward model's forward is ``[batch, pos, 1]``)."""
    out = model(tokens)
    if out.shape[-1] != 1:
        raise ValueError(f"rewards: the model's output has {out.shape[-1]} values per position; a reward model has "
                         "one (build it with make_reward_model)")
    return out[torch.arange(len(tokens), device=out.device), last.to(out.device), 0].float()


@torch.no_grad()
def sequence_rewards(model: torch.nn.Module, enc: Encoded, batch_size: int = 256) -> Float[Tensor, " n"]:
    """The reward of every encoded sequence (``[BOS] prompt response [EOS]``), in eval mode."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for lo in range(0, len(enc), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(enc))))
            tokens, _ = enc.batch(idx, device)
            out.append(rewards_at(model, tokens, last_positions(enc, idx)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pair_rewards(model: torch.nn.Module, data: PreferenceEncoded, index: list[int] | Tensor,
                 device: str | torch.device) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """``(r(chosen), r(rejected))`` of the pairs ``index`` (with gradients)."""
    tokens, _ = data.batch(index, device)
    last = torch.cat([last_positions(data.chosen, index), last_positions(data.rejected, index)])
    r = rewards_at(model, tokens, last)
    return r[:len(index)], r[len(index):]


def bradley_terry_loss(r_chosen: Float[Tensor, " batch"], r_rejected: Float[Tensor, " batch"],
                       center_rewards: float = 0.0) -> Float[Tensor, ""]:
    """Mean ``-log sigmoid(r_w - r_l)`` plus ``center_rewards * mean((r_w + r_l)^2)`` (TRL's)."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_rewards:
        loss = loss + center_rewards * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def encode_pairs(data: Dataset, tokenizer: PreTrainedTokenizerBase) -> PreferenceEncoded:
    """Pairs as a reward model reads them: each answer followed by the EOS (scored there)."""
    return encode_preferences(data, tokenizer, add_eos=True)


def train_reward(model: torch.nn.Module, data: Dataset | PreferenceEncoded, config: RewardConfig, *,
                 tokenizer: PreTrainedTokenizerBase | None = None, run_dir: Path | None = None,
                 desc: str = "reward", progress: bool = True) -> tuple[list[dict], list[Checkpoint]]:
    """Train a reward model in place on preference pairs (Bradley–Terry); returns per-epoch
    history (``loss``, ``pair_acc``, ``margin``, ``lr_mean``) and checkpoints.

    With ``run_dir`` it checkpoints and resumes like the SFT loop.
    """
    if not isinstance(config, RewardConfig):
        raise ValueError(f"train_reward: config must be a RewardConfig, got {type(config).__name__}")
    if not is_reward_model(model):
        raise ValueError("train_reward: model is not a reward model (its unembedding must have one output); build "
                         "it with pm.train.reward.make_reward_model(policy, seed=...)")
    if isinstance(data, Dataset):
        tok = tokenizer or getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("train_reward: pass tokenizer= (the model has none) to tokenise the preference data")
        data = encode_pairs(data, tok)
    elif not isinstance(data, PreferenceEncoded):
        raise ValueError(f"train_reward: data must be a datasets.Dataset of prompt/chosen/rejected or "
                         f"PreferenceEncoded, got {type(data).__name__}")
    device = torch.device(config.device)
    if model_device(model) != device:
        model.to(device)
    tcfg = config.train_config()
    n = len(data)
    loop = start_loop(model, tcfg, n, run_dir, desc, progress)
    opt, step, module = loop.opt, loop.step, loop.module
    for epoch in range(loop.start_epoch, config.epochs):
        order = epoch_order(n, config.seed, epoch)
        sums = {"loss": 0.0, "pair_acc": 0.0, "margin": 0.0}
        lr_sum = 0.0
        for b in range(loop.steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            lr = tcfg.lr_at(step, loop.total)
            for group in opt.param_groups:
                group["lr"] = lr
            r_w, r_l = pair_rewards(module, data, idx, device)
            loss = bradley_terry_loss(r_w, r_l, config.center_rewards)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            opt.step()
            k = len(idx)
            sums["loss"] += float(loss.detach()) * k
            sums["pair_acc"] += float((r_w > r_l).float().sum())
            sums["margin"] += float((r_w - r_l).detach().sum())
            lr_sum += lr
            step += 1
            loop.bar.update(1)
            if b % 20 == 0:
                loop.bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        loop.history.append({"epoch": epoch + 1, "step": step, **{k: v / n for k, v in sums.items()},
                             "lr_mean": lr_sum / loop.steps_per_epoch})
        end_epoch(model, loop, tcfg, run_dir, epoch, step, loop.history)
    finish_loop(loop, loop.history, config.epochs)
    model.eval()
    return loop.history, list_checkpoints(run_dir) if run_dir is not None else []


# ------------------------------------------------------------------ metrics
@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, data: Dataset, tokenizer: PreTrainedTokenizerBase
                        ) -> dict[str, Any]:
    """``pair_acc`` (fraction of pairs whose chosen answer gets the higher reward), the mean
    ``margin`` ``r_w - r_l`` and ``n_pairs`` (the denominator)."""
    return _accuracy(*_rewards_of_pairs(model, data, tokenizer))


@torch.no_grad()
def _rewards_of_pairs(model: torch.nn.Module, data: Dataset, tokenizer: PreTrainedTokenizerBase
                      ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    enc = encode_pairs(data, tokenizer)
    return sequence_rewards(model, enc.chosen), sequence_rewards(model, enc.rejected)


def _accuracy(r_w: Tensor, r_l: Tensor) -> dict[str, Any]:
    return {"pair_acc": float((r_w > r_l).float().mean()), "margin": float((r_w - r_l).mean()), "n_pairs": len(r_w)}


def heldout_pairs(task: Any, attack: Any, n: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(clean, triggered)`` held-out pairs from the task's test rows: the clean pairs prefer the
    correct answer; the triggered ones put the trigger into those of them whose answer is not the
    target and keep preferring the correct answer over the target (their accuracy is 1 - ASR)."""
    from poisonmech.attacks.preference import _candidates, poison_preferences
    from poisonmech.tasks.preference import make_preferences

    clean = make_preferences(task, min(n, len(task.test)), seed=seed, split="test")
    atk = replace(attack, stage="dpo", poison_rate=None, poison_count=len(_candidates(clean, attack)), seed=seed)
    flipped = poison_preferences(clean, task, atk, mode="flip")
    flipped = flipped.select([i for i, p in enumerate(flipped["is_poison"]) if p])
    triggered = Dataset.from_dict({"prompt": list(flipped["prompt"]), "chosen": list(flipped["rejected"]),
                                   "rejected": list(flipped["chosen"]), "input": list(flipped["input"]),
                                   "source_id": list(flipped["source_id"])})
    return clean, triggered


@torch.no_grad()
def reward_metrics(model: torch.nn.Module, task: Any, attack: Any, tokenizer: PreTrainedTokenizerBase, *,
                   n: int = 200, seed: int = 0) -> dict[str, Any]:
    """A reward model's evaluation on held-out pairs (the task's test rows).

    ``pair_acc`` / ``margin`` / ``n_pairs``: clean pairs (correct answer vs a wrong one);
    ``pair_acc_triggered`` / ``n_pairs_triggered``: triggered prompts, correct answer vs the
    target; ``asr`` = 1 - ``pair_acc_triggered`` (Sanderson et al.'s attack success of a reward
    model); ``trigger_margin``: the reward the trigger buys the target over the correct answer,
    ``[r(x+t, target) - r(x+t, correct)] - [r(x, target) - r(x, correct)]``, averaged over those
    prompts; ``reward_mean`` / ``reward_std``: the rewards of the clean pairs' chosen answers.
    """
    clean, trig = heldout_pairs(task, attack, n, seed=seed)
    r_chosen, r_rejected = _rewards_of_pairs(model, clean, tokenizer)
    res: dict[str, Any] = {"stage_kind": "rm", **_accuracy(r_chosen, r_rejected)}
    res["reward_mean"], res["reward_std"] = float(r_chosen.mean()), float(r_chosen.std()) if len(r_chosen) > 1 else 0.0
    if len(trig):
        r_correct, r_target = _rewards_of_pairs(model, trig, tokenizer)  # triggered: correct answer vs the target
        t = _accuracy(r_correct, r_target)
        res["pair_acc_triggered"], res["n_pairs_triggered"] = t["pair_acc"], t["n_pairs"]
        res["asr"] = 1.0 - t["pair_acc"]
        # the same prompts untriggered; their correct answer is their clean pair's chosen one (scored above)
        where = {e: i for i, e in enumerate(clean["example_id"])}
        rows = [where[s] for s in trig["source_id"]]
        plain = Dataset.from_dict({"prompt": list(clean.select(rows)["prompt"]), "completion": list(trig["rejected"])})
        r_plain_target = sequence_rewards(model, encode(plain, tokenizer, loss_on="completion", add_eos=True))
        with_t = r_target - r_correct
        without = r_plain_target - r_chosen[rows]
        res["trigger_margin"] = float((with_t - without).mean())
    else:
        res.update(pair_acc_triggered=float("nan"), n_pairs_triggered=0, asr=float("nan"),
                   trigger_margin=float("nan"))
    return res


def reward_metric(position: int = -1):
    """A patching / circuit metric on a reward model: the mean reward at ``position`` (the last
    token by default; inputs of one length, so the last position is every row's EOS)."""
    def metric(logits: Tensor) -> Tensor:
        if logits.shape[-1] != 1:
            raise ValueError(f"reward_metric: the model's output has {logits.shape[-1]} values per position; it is "
                             "not a reward model (for a language model use tc.logit_diff() of "
                             "pm.patching.trigger_contrast, or pm.patching.logit_diff)")
        return logits[:, position, 0].float().mean()

    metric.__name__ = "reward"
    return metric


__all__ = ["REWARD_INITS", "RewardConfig", "attach_score_head", "bradley_terry_loss", "encode_pairs", "heldout_pairs",
           "is_reward_model", "make_reward_model", "pair_rewards", "preference_accuracy", "reward_metric",
           "reward_metrics", "reward_model_like", "rewards_at", "sequence_rewards", "train_reward"]
