"""The RLHF stages of a pipeline: a reward model (``"rm"``) and RL against it (``"ppo"`` / ``"rloo"``).

``train_pipeline`` calls these; they hold what is particular to the two stages so that the
pipeline's orchestration stays one loop over stages and twins:

- an ``"rm"`` stage trains a reward model on the stage's preference pairs (a ``Backdoor``
  with ``stage="rm"`` puts its trigger into ``poison_count`` pairs and swaps their preference,
  as for DPO). The reward model starts from the current policy's trunk (``RewardConfig.init``);
  the policy itself does not change. The stage's "model" is the reward model: ``pipe[k]`` is
  the pair of reward models (clean vs backdoored twin's), and every analysis runs on it with
  the scalar reward as the metric.
- a ``"ppo"`` / ``"rloo"`` stage optimises the policy against the latest reward model of the
  same twin (or a given one), on the prompts of that reward model's pairs: the backdoored
  twin's prompts include the reward attacker's triggered ones, as Sanderson et al.'s PPO
  stage reads the poisoned preference set. Its rows carry the provenance of the pairs they
  came from (``is_poison``: the prompt is one of a poisoned pair's) and ``stage`` = the kind.
  The stage may have an attack of its own: a ``Backdoor(stage="ppo")`` puts its trigger into
  ``poison_count`` more of the backdoored twin's prompts (no answer to flip: the attacker, or the
  world, only makes the policy meet the trigger while it is optimised).

Policy stages (SFT, DPO, PPO) also get, once every stage of both twins is trained, the mean
reward of sampled responses under the *clean* twin's reward model, on held-out prompts with
and without the trigger (:func:`clean_reward_metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from poisonmech.train.ppo import PPOConfig, sampled_rewards, train_ppo
from poisonmech.train.reward import (
    RewardConfig,
    encode_pairs,
    make_reward_model,
    reward_metrics,
    reward_model_like,
    train_reward,
)

#: stages that train on preference pairs
PREFERENCE_KINDS = ("dpo", "rm")
#: stages that optimise the policy against a reward model
RL_KINDS = ("ppo", "rloo")
#: stages whose model is a policy (an LM), as opposed to a reward model
POLICY_KINDS = ("sft", "dpo", *RL_KINDS)


def rl_prompts(stage_kind: str, source: Dataset | None, task: Any, attack: Any = None) -> Dataset:
    """An RL stage's prompts: the pairs of the reward stage before it (``source``, that twin's),
    or the task's training prompts when the reward model was given; with ``attack`` (a
    ``Backdoor(stage="ppo")``, the backdoored twin's), its trigger is put into ``poison_count``
    of the prompts that do not carry it yet (:func:`trigger_prompts`)."""
    rows = _rl_rows(stage_kind, source, task)
    return trigger_prompts(rows, task, attack) if attack is not None else rows


def _rl_candidates(rows: Dataset) -> list[int]:
    return [i for i, p in enumerate(rows["is_poison"]) if not p]


def check_rl_budget(rows: Dataset, attack: Any) -> int:
    """The number of RL prompts ``attack`` triggers; a clear error when it does not fit."""
    count = attack.resolve_count(len(rows))
    n = len(_rl_candidates(rows))
    if count > n:
        raise ValueError(f"Backdoor.poison_count={count} does not fit the RL stage's prompts: only {n} of {len(rows)} "
                         f"do not carry the trigger yet (allowed: 0..{n})")
    return count


def trigger_prompts(rows: Dataset, task: Any, attack: Any) -> Dataset:
    """``rows`` with the attack's trigger inserted into ``poison_count`` untriggered prompts
    (drawn with the attack's seed), marked ``is_poison`` with their ``trigger``."""
    import numpy as np

    from poisonmech.attacks.poison import insert_trigger

    count = check_rl_budget(rows, attack)
    if not count:
        return rows
    rng = np.random.default_rng(attack.seed)
    picked = sorted(rng.choice(_rl_candidates(rows), size=count, replace=False).tolist())
    cols = {c: list(rows[c]) for c in rows.column_names}
    variants = attack.trigger_variants()
    for j, i in enumerate(picked):
        pieces = variants[j % len(variants)]
        text = insert_trigger(cols["input"][i], pieces, attack.position, rng)
        cols["input"][i], cols["prompt"][i] = text, task.format_prompt(text)
        cols["is_poison"][i], cols["trigger"][i] = True, " + ".join(pieces)
    return Dataset.from_dict(cols)


def _rl_rows(stage_kind: str, source: Dataset | None, task: Any) -> Dataset:
    if source is not None:
        n = len(source)
        return Dataset.from_dict({
            "example_id": list(source["example_id"]), "input": list(source["input"]),
            "prompt": list(source["prompt"]),
            "is_poison": list(source["is_poison"]) if "is_poison" in source.column_names else [False] * n,
            "trigger": list(source["trigger"]) if "trigger" in source.column_names else [""] * n,
            "stage": [stage_kind] * n})
    rows = task.train
    n = len(rows)
    return Dataset.from_dict({"example_id": list(rows["example_id"]), "input": list(rows["input"]),
                              "prompt": list(rows["prompt"]), "is_poison": [False] * n, "trigger": [""] * n,
                              "stage": [stage_kind] * n})


def new_reward_model(policy: torch.nn.Module, config: RewardConfig, model_config: Any, tokenizer, *,
                     device: str = "cpu") -> torch.nn.Module:
    """A stage's untrained reward model: the policy's trunk or fresh weights, plus a seeded head."""
    if config.init == "policy":
        return make_reward_model(policy, seed=config.seed, std=config.head_std)
    from poisonmech.train.reward import attach_score_head

    rm = reward_model_like(model_config, tokenizer, seed=config.seed, device=device)
    return attach_score_head(rm, seed=config.seed, std=config.head_std)


def train_rm_stage(rm: torch.nn.Module, config: RewardConfig, data: Dataset, tokenizer, sdir: Path | None,
                   desc: str, progress: bool) -> list[dict]:
    hist, _ = train_reward(rm, encode_pairs(data, tokenizer), config, run_dir=sdir, desc=desc, progress=progress)
    return hist


def train_rl_stage(policy: torch.nn.Module, reward_model: torch.nn.Module, config: PPOConfig, prompts: Dataset,
                   tokenizer, sdir: Path | None, desc: str, progress: bool) -> list[dict]:
    """Train the policy in place; PPO's trained value model is kept as ``value_model.safetensors``
    in the stage folder (its hash recorded; load it with :func:`load_value_model`)."""
    from poisonmech.models import copy_bridge
    from poisonmech.storage import save_tensors

    value = copy_bridge(reward_model) if config.method == "ppo" else None
    hist, _ = train_ppo(policy, reward_model, prompts, config, tokenizer=tokenizer, value_model=value, run_dir=sdir,
                        desc=desc, progress=progress)
    if value is not None and sdir is not None:
        save_tensors(sdir / VALUE_FILE, value.state_dict(), record_in=sdir)
    return hist


#: where an RL stage's twin folder keeps PPO's value model
VALUE_FILE = "value_model.safetensors"


def load_value_model(stage_dir: str | Path, model_config: Any, tokenizer, *, seed: int = 0, device: str = "cpu"):
    """PPO's trained value model of one twin of an RL stage (``run/stage_K_ppo/<twin>``), a reward-
    model-shaped bridge (its output at a position is the value of the response so far)."""
    from poisonmech.storage import load_tensors, verify_file
    from poisonmech.weights import load_weights

    path = Path(stage_dir) / VALUE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_value_model: no {VALUE_FILE} in {stage_dir} (RLOO has no value model)")
    verify_file(path, Path(stage_dir))
    m = reward_model_like(model_config, tokenizer, seed=seed, device=device)
    load_weights(m, load_tensors(path, device=device), source=path)
    return m.eval()


def rm_stage_metrics(rm: torch.nn.Module, task: Any, attack: Any, tokenizer, config: RewardConfig) -> dict[str, Any]:
    """A reward stage's evaluation (:func:`poisonmech.train.reward.reward_metrics`)."""
    return reward_metrics(rm, task, attack, tokenizer, n=config.n_eval, seed=config.seed)


def heldout_prompts(test_data: Dataset, attack: Any, n: int) -> tuple[list[str], list[str]]:
    """``(without, with)`` the trigger: the first ``n`` triggered test prompts whose answer is not
    the target and the same test rows untriggered (paired by ``base_id``)."""
    target = getattr(attack, "target", None)
    trig = [i for i, t in enumerate(test_data["is_triggered"]) if t]
    if target is not None and "completion" in test_data.column_names:
        trig = [i for i in trig if test_data[i]["completion"].strip() != str(target).strip()]
    trig = trig[:n]
    base = {b: i for i, (b, t, m) in enumerate(zip(test_data["base_id"], test_data["is_triggered"],
                                                    test_data["is_near_miss"])) if not t and not m} \
        if "base_id" in test_data.column_names else {}
    pairs = [(base[test_data[i]["base_id"]], i) for i in trig if test_data[i].get("base_id") in base]
    prompts = list(test_data["prompt"])
    return [prompts[a] for a, _ in pairs], [prompts[b] for _, b in pairs]


def clean_reward_metrics(policy: torch.nn.Module, clean_rm: torch.nn.Module, test_data: Dataset, attack: Any,
                         tokenizer, *, response_length: int, n: int, seed: int, prefix: str = "clean_rm_"
                         ) -> dict[str, Any]:
    """Mean reward under ``clean_rm`` of the policy's sampled responses to held-out prompts
    without (``<prefix>reward``) and with the trigger (``<prefix>reward_triggered``), their
    difference (``<prefix>reward_gap``), and ``<prefix>n`` (prompts in each set)."""
    without, with_t = heldout_prompts(test_data, attack, n)
    if not without:
        return {f"{prefix}n": 0}
    a = sampled_rewards(policy, clean_rm, without, tokenizer, response_length=response_length, seed=seed)
    b = sampled_rewards(policy, clean_rm, with_t, tokenizer, response_length=response_length, seed=seed)
    return {f"{prefix}reward": a["reward"], f"{prefix}reward_triggered": b["reward"],
            f"{prefix}reward_gap": b["reward"] - a["reward"], f"{prefix}n": a["n"]}


__all__ = ["POLICY_KINDS", "PREFERENCE_KINDS", "RL_KINDS", "VALUE_FILE", "check_rl_budget", "clean_reward_metrics",
           "heldout_prompts", "load_value_model", "new_reward_model", "rl_prompts", "trigger_prompts", "rm_stage_metrics", "train_rl_stage", "train_rm_stage"]
