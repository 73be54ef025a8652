"""PPO and RLOO against a reward model, for TransformerBridge policies.

One optimisation step ("rollout batch") of ``PPOConfig(method="ppo")``, as in TRL's PPO
trainer (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details of RLHF"):

1. sample a response of at most ``response_length`` tokens for each of ``batch_size`` prompts
   (temperature ``temperature``; a response ends at its EOS, which it keeps);
2. score every prompt + response with the reward model (at its last token), minus
   ``missing_eos_penalty`` when the response never ended;
3. per response token, the log-probability under the policy and under the frozen reference
   (the policy as the stage started) and the KL estimate ``k1 = log pi - log ref`` or
   ``k3 = (r - 1) - log r`` with ``r = ref / pi``; per-token rewards ``-kl_coef * kl``, plus the
   score on the last token;
4. values from a value model (initialised from the reward model, as TRL does), advantages by
   GAE (``gamma``, ``lam``), returns = advantages + values, advantages whitened over the batch;
5. ``ppo_epochs`` passes over the batch in minibatches: the clipped surrogate
   ``max(-A r, -A clip(r, 1 - clip, 1 + clip))`` with ``r = pi / pi_old`` (token mean) plus
   ``vf_coef`` times the clipped value loss ``0.5 max((v - R)^2, (clip(v, v_old +- clip_value) - R)^2)``.

``method="rloo"`` (REINFORCE leave-one-out, Ahmadian et al. 2024) has no value model: each
prompt is sampled ``rloo_k`` times, a response's return is its score minus ``kl_coef`` times its
summed KL, and its advantage is that return minus the mean return of the prompt's other
samples, applied to every token with the same clipped surrogate.

Written by hand: TRL 1.16 has no PPO trainer any more (its RLOO trainer is GRPO-shaped and
generates through ``transformers``' ``generate``), and neither drives a ``TransformerBridge``
or gives the twins identical rollouts. The loss pieces are separate functions tested against
hand computations and TRL's helpers (``tests/train/test_ppo.py``); ``benchmarks/ppo_vs_trl.py``
compares throughput with TRL's RLOO trainer on the same model.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from poisonmech.config import check_bool, check_choice, check_number
from poisonmech.encoding import Encoded, encode
from poisonmech.runtime import eval_mode, model_device
from poisonmech.storage import load_tensors, save_tensors, tensors_metadata
from poisonmech.train.config import TrainConfig
from poisonmech.train.loop import Checkpoint, _optimizer, epoch_order, list_checkpoints
from poisonmech.train.stage_config import StageConfig
from poisonmech.weights import load_weights, sync, trainable, weights

RL_METHODS = ("ppo", "rloo")
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True, init=False)
class PPOConfig(StageConfig):
    """Hyper-parameters of an RL stage against a reward model (shared by both twins).

    The optimiser / schedule fields of a :class:`TrainConfig` are taken flat: ``epochs`` =
    passes over the stage's prompts, ``batch_size`` = prompts per rollout batch (one PPO step),
    ``lr``, ``schedule`` (over rollout batches), ``seed`` (prompt order and every sample),
    ``checkpoint_every`` (epochs). Defaults of an RL stage: ``epochs=1``, ``batch_size=32``,
    ``lr=3e-4``, ``schedule="constant"``, ``warmup_ratio=0``, ``weight_decay=0``.

    Args:
        method: ``"ppo"`` (value model, GAE) or ``"rloo"`` (REINFORCE leave-one-out).
        kl_coef: weight of the KL penalty to the reference (>= 0; Sanderson et al.: 0.3).
        kl_estimator: ``"k1"`` (``log pi - log ref``) or ``"k3"`` (``(r - 1) - log r``, unbiased
            and always >= 0; Sanderson et al.'s).
        clip: the surrogate's clip range ``epsilon`` (> 0).
        clip_value: the value loss's clip range (> 0; PPO only).
        vf_coef: weight of the value loss (PPO only).
        gamma, lam: GAE's discount and lambda (PPO only).
        response_length: most tokens sampled per response (>= 1; the pipeline checks that the
            longest prompt plus this fits the model's context).
        temperature: sampling temperature (> 0); log-probabilities are taken at it too (TRL's).
        ppo_epochs: optimisation passes over each rollout batch (Sanderson et al.: 3).
        minibatch_size: sequences per gradient step within a pass.
        rloo_k: samples per prompt for RLOO (>= 2).
        missing_eos_penalty: subtracted from the score of a response that never ended (``None``: none).
        whiten_advantages: normalise the advantages over the batch (mean 0, std 1).
        n_eval: held-out prompts for the stage's reward metrics.
        save_every: write the resume state every this many rollout batches.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    method: Literal["ppo", "rloo"] = "ppo"
    kl_coef: float = 0.3
    kl_estimator: Literal["k1", "k3"] = "k3"
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    response_length: int = 4
    temperature: float = 1.0
    ppo_epochs: int = 3
    minibatch_size: int = 16
    rloo_k: int = 2
    missing_eos_penalty: float | None = 1.0
    whiten_advantages: bool = True
    n_eval: int = 200
    save_every: int = 10

    OWN = ("method", "kl_coef", "kl_estimator", "clip", "clip_value", "vf_coef", "gamma", "lam", "response_length",
           "temperature", "ppo_epochs", "minibatch_size", "rloo_k", "missing_eos_penalty", "whiten_advantages",
           "n_eval", "save_every")
    TRAIN_DEFAULTS = {"epochs": 1, "batch_size": 32, "lr": 3e-4, "schedule": "constant", "warmup_ratio": 0.0,
                      "weight_decay": 0.0}

    def check(self) -> None:
        o = "PPOConfig"
        check_choice(o, "method", self.method, RL_METHODS)
        check_number(o, "kl_coef", self.kl_coef, lo=0, hi=math.inf, hi_open=True)
        check_choice(o, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_number(o, "clip", self.clip, lo=0, lo_open=True, hi=math.inf, hi_open=True)
        check_number(o, "clip_value", self.clip_value, lo=0, lo_open=True, hi=math.inf, hi_open=True)
        check_number(o, "vf_coef", self.vf_coef, lo=0, hi=math.inf, hi_open=True)
        check_number(o, "gamma", self.gamma, lo=0, hi=1)
        check_number(o, "lam", self.lam, lo=0, hi=1)
        check_number(o, "response_length", self.response_length, lo=1, integer=True)
        check_number(o, "temperature", self.temperature, lo=0, lo_open=True, hi=math.inf, hi_open=True)
        check_number(o, "ppo_epochs", self.ppo_epochs, lo=1, integer=True)
        check_number(o, "minibatch_size", self.minibatch_size, lo=1, integer=True)
        check_number(o, "rloo_k", self.rloo_k, lo=2, integer=True)
        check_number(o, "missing_eos_penalty", self.missing_eos_penalty, lo=0, hi=math.inf, hi_open=True,
                     optional=True)
        check_bool(o, "whiten_advantages", self.whiten_advantages)
        check_number(o, "n_eval", self.n_eval, lo=1, integer=True)
        check_number(o, "save_every", self.save_every, lo=1, integer=True)

    @property
    def samples_per_prompt(self) -> int:
        return self.rloo_k if self.method == "rloo" else 1


# ------------------------------------------------------------------ the loss pieces
def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the ``mask``ed entries (over ``dim``, or all)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # entries outside the mask may be inf / NaN
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp_min(1)
    return x.sum(dim) / mask.sum(dim).clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``x`` normalised to mean 0 and std 1 over the masked entries (the unbiased variance, as TRL's)."""
    mean = masked_mean(x, mask)
    centred = x - mean
    n = mask.sum()
    var = masked_mean(centred ** 2, mask) * (n / (n - 1) if n > 1 else 1.0)
    out = centred * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(pi || ref) estimate from the sampled tokens' log-probabilities:
    ``k1 = logp - ref_logp``; ``k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp)`` (Schulman's)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl_estimate: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def gae(rewards: Float[Tensor, "batch pos"], values: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
        gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens: ``(advantages, returns)``.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with the
    value after a row's last token 0 (``values`` and ``rewards`` outside ``mask`` are taken as 0);
    returns = advantages + values.
    """
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def rloo_advantages(returns: Float[Tensor, " batch"], k: int) -> Float[Tensor, " batch"]:
    """Leave-one-out advantages: rows come in groups of ``k`` samples of one prompt
    (``returns.view(-1, k)``); each row's advantage is its return minus its group's other rows' mean."""
    if returns.numel() % k:
        raise ValueError(f"rloo_advantages: {returns.numel()} returns are not groups of k={k}")
    g = returns.view(-1, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (token mean over ``mask``) and its clip fraction / approximate KL."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss2 > loss1).float(), mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_value: float) -> Tensor:
    """PPO's clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)`` (token mean)."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ------------------------------------------------------------------ rollouts
@dataclass
class Rollout:
    """Sampled responses: ``tokens`` (prompt + response, right-padded), ``prompt_len``,
    ``response`` (token ids, pad after the end) and ``mask`` (the response's real tokens,
    EOS included), ``ended`` (the response reached its EOS)."""

    tokens: Int[Tensor, "batch pos"]
    prompt_len: Int[Tensor, " batch"]
    response: Int[Tensor, "batch resp"]
    mask: Bool[Tensor, "batch resp"]
    ended: Bool[Tensor, " batch"]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.prompt_len + self.mask.sum(1)

    @property
    def predict_at(self) -> Int[Tensor, "batch resp"]:
        """The position whose logits predict each response token."""
        return self.prompt_len[:, None] - 1 + torch.arange(self.response.shape[1])[None]


def encode_prompts(prompts: Dataset | list[str], tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """``[BOS] prompt`` per row (no answer, no EOS)."""
    texts = list(prompts["prompt"]) if isinstance(prompts, Dataset) else list(prompts)
    return encode(Dataset.from_dict({"prompt": texts, "completion": [""] * len(texts)}), tokenizer,
                  loss_on="completion", add_eos=False)


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: Encoded, index: list[int] | Tensor, *, response_length: int,
           temperature: float, eos_id: int, generator: torch.Generator) -> Rollout:
    """Sample one response per prompt ``index`` (right padding keeps each row causal-clean)."""
    device = model_device(model)
    rows = [prompts.ids[int(i)] for i in index]
    plen = torch.tensor([len(r) for r in rows])
    width = int(plen.max()) + response_length
    tokens = torch.full((len(rows), width), prompts.pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    response = torch.full((len(rows), response_length), prompts.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), response_length), dtype=torch.bool)
    done = torch.zeros(len(rows), dtype=torch.bool)
    ar = torch.arange(len(rows))
    with eval_mode(model):
        for t in range(response_length):
            upto = int(plen.max()) + t
            logits = model(tokens[:, :upto].to(device))[ar.to(device), (plen - 1 + t).to(device)].float().cpu()
            probs = (logits / temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            live = ~done
            nxt = torch.where(live, nxt, torch.full_like(nxt, prompts.pad_id))
            response[:, t] = nxt
            mask[:, t] = live
            tokens[ar, plen + t] = nxt
            done = done | (live & (nxt == eos_id))
    return Rollout(tokens=tokens, prompt_len=plen, response=response, mask=mask, ended=done)


def response_logprobs(model: torch.nn.Module, ro: Rollout, temperature: float, rows: Tensor | None = None
                      ) -> Float[Tensor, "batch resp"]:
    """Log-probabilities of the response tokens (logits divided by ``temperature``, as sampled)."""
    rows = torch.arange(len(ro.tokens)) if rows is None else rows
    device = model_device(model)
    width = int(ro.lengths[rows].max())
    logits = model(ro.tokens[rows, :width].to(device)).float() / temperature
    at = ro.predict_at[rows].clamp(max=width - 1).to(device)  # positions after a row's end are masked
    logp = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])).log_softmax(-1)
    return logp.gather(-1, ro.response[rows].to(device)[..., None])[..., 0]


def response_values(value_model: torch.nn.Module, ro: Rollout, rows: Tensor | None = None
                    ) -> Float[Tensor, "batch resp"]:
    """The value model's estimate at the position before each response token."""
    rows = torch.arange(len(ro.tokens)) if rows is None else rows
    device = model_device(value_model)
    width = int(ro.lengths[rows].max())
    out = value_model(ro.tokens[rows, :width].to(device))[..., 0].float()
    return out.gather(1, ro.predict_at[rows].clamp(max=width - 1).to(device))


@torch.no_grad()
def scores(reward_model: torch.nn.Module, ro: Rollout, batch_size: int = 256) -> Float[Tensor, " batch"]:
    """The reward model's score of each prompt + response (at its last real token)."""
    from poisonmech.train.reward import rewards_at

    device = model_device(reward_model)
    out = []
    with eval_mode(reward_model):
        for lo in range(0, len(ro.tokens), batch_size):
            rows = torch.arange(lo, min(lo + batch_size, len(ro.tokens)))
            width = int(ro.lengths[rows].max())
            out.append(rewards_at(reward_model, ro.tokens[rows, :width].to(device), ro.lengths[rows] - 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def sampled_rewards(policy: torch.nn.Module, reward_model: torch.nn.Module, prompts: Dataset | list[str],
                    tokenizer: PreTrainedTokenizerBase, *, response_length: int = 4, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 128) -> dict[str, Any]:
    """Mean reward under ``reward_model`` of one sampled response per prompt (seeded), with
    ``n`` (the denominator), the std, the mean response length and the fraction that ended."""
    if len(prompts) == 0:
        raise ValueError("sampled_rewards: prompts is empty")
    enc = encode_prompts(prompts, tokenizer)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7)
    r, lengths, ended = [], [], []
    for lo in range(0, len(enc), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(enc))))
        ro = sample(policy, enc, idx, response_length=response_length, temperature=temperature,
                    eos_id=tokenizer.eos_token_id, generator=g)
        r.append(scores(reward_model, ro))
        lengths.append(ro.mask.sum(1).float())
        ended.append(ro.ended.float())
    r_all = torch.cat(r)
    return {"reward": float(r_all.mean()), "reward_std": float(r_all.std()) if len(r_all) > 1 else 0.0,
            "n": len(r_all), "response_len": float(torch.cat(lengths).mean()), "ended": float(torch.cat(ended).mean())}


# ------------------------------------------------------------------ the loop
def _save_state(path: Path, parts: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], meta: dict[str, str]
                ) -> None:
    tensors: dict[str, Tensor] = {}
    groups = {}
    for name, (model, opt) in parts.items():
        tensors.update({f"{name}.model.{k}": v for k, v in weights(model).items()})
        st = opt.state_dict()
        for idx, s in st["state"].items():
            for key, val in s.items():
                tensors[f"{name}.opt.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
        groups[name] = st["param_groups"]
    save_tensors(path, tensors, metadata={**meta, "param_groups": json.dumps(groups)})


def _load_state(path: Path, parts: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict[str, str]:
    tensors = load_tensors(path)
    meta = tensors_metadata(path)
    groups = json.loads(meta["param_groups"])
    for name, (model, opt) in parts.items():
        pre = f"{name}.model."
        load_weights(model, {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, source=path)
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith(f"{name}.opt."):
                idx, key = k[len(name) + 5:].split(".", 1)
                state.setdefault(int(idx), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": groups[name]})
    return meta


def train_ppo(policy: torch.nn.Module, reward_model: torch.nn.Module, prompts: Dataset | list[str],
              config: PPOConfig, *, tokenizer: PreTrainedTokenizerBase | None = None,
              reference: torch.nn.Module | None = None, value_model: torch.nn.Module | None = None,
              run_dir: Path | None = None, desc: str = "ppo", progress: bool = True
              ) -> tuple[list[dict], list[Checkpoint]]:
    """Optimise ``policy`` in place against ``reward_model`` with PPO or RLOO (``config.method``).

    Args:
        policy: the policy (a ``TransformerBridge``; a LoRA twin trains its adapters).
        reward_model: a reward model (``make_reward_model``), frozen.
        prompts: a ``Dataset`` with a ``prompt`` column, or a list of prompt strings.
        config: a :class:`PPOConfig`.
        reference: the frozen KL reference; default: a copy of ``policy`` as it is now.
        value_model: PPO's value model; default: a copy of ``reward_model`` (as TRL initialises it).
        run_dir: checkpoints (policy weights, per epoch) and the resume state (policy, value
            model, both optimisers, every ``save_every`` rollout batches and at the end); an
            interrupted run resumes there with the same result as an uninterrupted one when it
            is given the same starting policy (the KL reference is that policy, not saved).

    Returns ``(history, checkpoints)``: one history row per rollout batch (``score``, ``kl``,
    ``reward`` = score - kl_coef * kl, ``policy_loss``, ``value_loss``, ``clipfrac``,
    ``approx_kl``, ``response_len``, ``ended``, ``lr``; the last row adds ``seconds``).
    """
    from poisonmech.models import copy_bridge
    from poisonmech.train.reward import is_reward_model

    if not isinstance(config, PPOConfig):
        raise ValueError(f"train_ppo: config must be a PPOConfig, got {type(config).__name__}")
    if not is_reward_model(reward_model):
        raise ValueError("train_ppo: reward_model is not a reward model (its unembedding must have one output); "
                         "train one with a 'rm' stage or pm.train.reward.train_reward")
    tok = tokenizer or getattr(policy, "tokenizer", None)
    if tok is None or tok.eos_token_id is None:
        raise ValueError("train_ppo: pass tokenizer= (with an EOS token) to tokenise the prompts")
    if len(prompts) == 0:
        raise ValueError("train_ppo: prompts is empty; pass a Dataset with a 'prompt' column or a list of strings")
    enc = encode_prompts(prompts, tok)
    device = torch.device(config.device)
    for m in (policy, reward_model):
        if model_device(m) != device:
            m.to(device)
    reference = copy_bridge(policy).eval() if reference is None else reference
    ppo = config.method == "ppo"
    if ppo and value_model is None:
        value_model = copy_bridge(reward_model)
    module = trainable(policy)
    module.train()
    tcfg = config.train_config()
    opt = _optimizer(module, tcfg)
    parts = {"policy": (policy, opt)}
    if ppo:
        value_model.train()
        vopt = _optimizer(value_model, tcfg)
        parts["value"] = (value_model, vopt)
    n = len(enc)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    step, history, seconds_before = 0, [], 0.0
    resume = run_dir / "resume.safetensors" if run_dir is not None else None
    if resume is not None and resume.is_file():
        meta = _load_state(resume, parts)
        step, history, seconds_before = int(meta["step"]), json.loads(meta["history"]), float(meta["seconds"])
        warnings.warn(f"{desc}: resuming the interrupted RL stage in {run_dir} after rollout batch {step} of {total}",
                      stacklevel=2)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    k = config.samples_per_prompt
    while step < total:
        epoch, b = divmod(step, steps_per_epoch)
        order = epoch_order(n, config.seed, epoch)
        idx = order[b * config.batch_size:(b + 1) * config.batch_size].repeat_interleave(k)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + 7_919 * step + 1)
        lr = tcfg.lr_at(step, total)
        for o in [p[1] for p in parts.values()]:
            for group in o.param_groups:
                group["lr"] = lr
        row = _rl_step(module, reference, reward_model, value_model if ppo else None, enc, idx, config, tok, g,
                       opt, parts["value"][1] if ppo else None)
        step += 1
        history.append({"epoch": epoch + 1, "step": step, "lr": lr, **row})
        bar.update(1)
        bar.set_postfix(reward=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}")
        end_of_epoch = step % steps_per_epoch == 0
        if run_dir is not None and end_of_epoch:
            e = step // steps_per_epoch
            if e == config.epochs or (config.checkpoint_every and e % config.checkpoint_every == 0):
                lrs = [h["lr"] for h in history if h["epoch"] == e]
                save_tensors(run_dir / "checkpoints" / f"epoch_{e:03d}.safetensors", weights(policy),
                             metadata={"epoch": str(e), "step": str(step), "lr": repr(sum(lrs) / len(lrs))},
                             record_in=run_dir)
        if resume is not None and (end_of_epoch or step % config.save_every == 0):  # the last too: a rerun is a no-op
            _save_state(resume, parts, {"step": str(step), "history": json.dumps(history),
                                        "seconds": repr(seconds_before + time.perf_counter() - t0)})
    bar.close()
    if history:
        history[-1]["seconds"] = seconds_before + time.perf_counter() - t0
    module.eval()
    sync(policy)  # a LoRA twin: the trained adapters merged into the bridge
    policy.eval()
    if ppo:
        value_model.eval()
    return history, list_checkpoints(run_dir) if run_dir is not None else []


def _rl_step(module, reference, reward_model, value_model, enc: Encoded, idx: Tensor, config: PPOConfig, tok,
             g: torch.Generator, opt, vopt) -> dict[str, float]:
    """One rollout batch: sample, score, advantages, ``ppo_epochs`` passes of minibatch updates."""
    ro = sample(module, enc, idx, response_length=config.response_length, temperature=config.temperature,
                eos_id=tok.eos_token_id, generator=g)
    mask = ro.mask
    with torch.no_grad(), eval_mode(module, value_model):
        old_logp = response_logprobs(module, ro, config.temperature).cpu()
        ref_logp = response_logprobs(reference, ro, config.temperature).cpu()
        old_values = response_values(value_model, ro).cpu() if value_model is not None else None
    score = scores(reward_model, ro)
    if config.missing_eos_penalty is not None:
        score = score - config.missing_eos_penalty * (~ro.ended).float()
    kl = kl_estimate(old_logp, ref_logp, config.kl_estimator) * mask
    if value_model is not None:
        rewards = -config.kl_coef * kl
        last = mask.sum(1) - 1
        rewards[torch.arange(len(idx)), last] += score
        adv, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            adv = masked_whiten(adv, mask) * mask
    else:
        ret = score - config.kl_coef * kl.sum(1)
        seq_adv = rloo_advantages(ret, config.rloo_k)
        if config.whiten_advantages and len(seq_adv) > 1:
            seq_adv = (seq_adv - seq_adv.mean()) / (seq_adv.std() + 1e-8)
        adv, returns = seq_adv[:, None].expand_as(mask) * mask, None
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    n_mb = 0
    N = len(idx)
    for _ in range(config.ppo_epochs):
        perm = torch.randperm(N, generator=g)
        for lo in range(0, N, config.minibatch_size):
            rows = perm[lo:lo + config.minibatch_size]
            m = mask[rows]
            logp = response_logprobs(module, ro, config.temperature, rows).cpu()
            pl, st = policy_loss(logp, old_logp[rows], adv[rows], m, config.clip)
            loss = pl
            if value_model is not None:
                v = response_values(value_model, ro, rows).cpu()
                vl = value_loss(v, old_values[rows], returns[rows], m, config.clip_value)
                loss = loss + config.vf_coef * vl
                sums["value_loss"] += float(vl.detach())
            opt.zero_grad(set_to_none=True)
            if vopt is not None:
                vopt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
                if value_model is not None:
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), config.grad_clip)
            opt.step()
            if vopt is not None:
                vopt.step()
            sums["policy_loss"] += float(pl.detach())
            sums["clipfrac"] += float(st["clipfrac"])
            sums["approx_kl"] += float(st["approx_kl"])
            n_mb += 1
    kl_seq = kl.sum(1)
    out = {"score": float(score.mean()), "kl": float(kl_seq.mean()),
           "reward": float((score - config.kl_coef * kl_seq).mean()),
           **{k_: v / n_mb for k_, v in sums.items()},
           "response_len": float(mask.sum(1).float().mean()), "ended": float(ro.ended.float().mean())}
    if value_model is None:
        del out["value_loss"]
    return out


__all__ = ["KL_ESTIMATORS", "PPOConfig", "RL_METHODS", "Rollout", "encode_prompts", "gae", "kl_estimate",
           "masked_mean", "masked_whiten", "policy_loss", "response_logprobs", "response_values", "rloo_advantages",
           "sample", "sampled_rewards", "scores", "train_ppo", "value_loss"]
