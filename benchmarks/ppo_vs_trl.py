"""RL throughput: poisonmech's hand-written RLOO / PPO loop vs TRL's ``RLOOTrainer``, on one tiny model.

TRL 1.16 has no PPO trainer any more (``trl.trainer`` and ``trl.experimental`` hold none), so
the comparison with TRL is RLOO's; our PPO is timed for reference.

Set-up, the same for both sides as far as both allow:

- model: a random-initialised GPT-2 (``--layers`` x ``--d-model``, dropout 0) from a config, with
  a byte-level BPE tokenizer trained here on the sentiment task's rows (nothing is downloaded),
  saved with ``save_pretrained`` to a temporary folder (TRL loads its reference model from the
  policy's path). Each side loads its own copy of the same weights;
- prompts: the sentiment task's 256 training prompts (``pm.make_task("sentiment", tokenizer=tok)``),
  both tokenised as ``[BOS] prompt`` (the tokenizer prepends BOS, poisonmech adds it itself);
- reward model: ``make_reward_model(policy, seed=0)`` (the policy's trunk + a fresh one-output
  score head). TRL gets, with ``--trl-reward function`` (default), a reward function that scores
  ``[BOS] prompt`` + TRL's sampled ``completion_ids`` (EOS kept) with that same bridge, so both
  sides compute identical rewards with identical work; with ``--trl-reward hf``, TRL's native path:
  a ``GPT2ForSequenceClassification`` holding the same weights (checked against the bridge), fed
  TRL's re-tokenised ``prompt + completion`` text (no BOS, special tokens dropped);
- per optimiser step: ``--batch`` prompts x ``--k`` samples, at most ``--response-length`` new
  tokens (temperature 1, no top-k/top-p), 1 optimisation epoch over the batch in one minibatch
  (TRL: ``per_device_train_batch_size = batch * k``, ``num_generations = k``,
  ``steps_per_generation = 1``, ``num_iterations = 1``; ours: ``ppo_epochs = 1``,
  ``minibatch_size = batch * k``), KL in the reward with the k1 estimator (``beta`` = ``kl_coef``),
  clip 0.2, advantages normalised over the batch, AdamW betas (0.9, 0.999), no weight decay,
  gradient clipping at 1.0, fp32 (TRL: ``bf16=False``, ``gradient_checkpointing=False``), no
  missing-EOS penalty (TRL's RLOO has none).

What differs (it is part of what is measured):

- generation: TRL calls ``transformers``' ``generate`` (KV cache, left padding); ours re-runs the
  whole prefix through the bridge for every new token (no cache, right padding);
- forwards: TRL runs the bare HF module (its fused LM head computes only the completion's
  log-probabilities); ours runs a ``TransformerBridge`` (hook points on every activation) and
  takes the full logits;
- TRL's ``Trainer`` / ``accelerate`` machinery: dataloader with its repeat sampler, metric
  bookkeeping every step (``logging_strategy="no"``: nothing is printed or reported, but TRL still
  records its per-step metrics), callbacks; ours keeps a history row per step;
- TRL's completion text is decoded every step (for reward functions and its logs).

Timing: ``--warmup`` steps first, then ``--steps`` timed steps for each (TRL: a callback's clock
at each ``on_step_end``; ours: the loop's own ``seconds``, which exclude the set-up, in a second
``train_ppo`` call after a warm-up call); each on fresh copies of the weights, alternating
``--repeats`` times, the best of each counts (the load average is printed: a shared machine's
other jobs slow whichever side runs alongside them). Prints ``rloo_steps_per_s_poisonmech``,
``rloo_steps_per_s_trl``, ``rloo_speedup_vs_trl`` (ours / TRL's), the generated tokens per second
of each, and ``ppo_steps_per_s_poisonmech`` (PPO: ``--batch`` prompts x 1 sample per step, a value
model initialised from the reward model). If TRL's trainer cannot run, our side still runs and
``rloo_speedup_vs_trl: n/a (reason)`` is printed.

Run: ``.venv/bin/python benchmarks/ppo_vs_trl.py [--threads 1] [--steps 10] [--trl-reward function|hf]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import logging
import math
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import poisonmech as pm
from poisonmech.models import wrap_hf_model
from poisonmech.runtime import eval_mode
from poisonmech.train.ppo import PPOConfig, train_ppo
from poisonmech.train.reward import make_reward_model, rewards_at, score_head


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded into one tensor, and each row's last real position."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    return tokens, torch.tensor([len(r) - 1 for r in rows])


def bridge_reward_function(rm: torch.nn.Module, tok):
    """A TRL reward function scoring ``[BOS] prompt`` + the sampled completion ids with our reward model."""

    def poisonmech_reward(prompts, completions, completion_ids, **_):
        prompt_ids = tok(list(prompts))["input_ids"]  # what TRL generated from: BOS prepended
        tokens, last = right_pad([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)], tok.pad_token_id)
        with torch.no_grad(), eval_mode(rm):
            return rewards_at(rm, tokens, last).tolist()

    return poisonmech_reward


def hf_reward_model(folder: Path, rm: torch.nn.Module, tok):
    """A ``GPT2ForSequenceClassification`` with the bridge reward model's weights (checked on a few rows)."""
    from transformers import GPT2ForSequenceClassification

    hf = GPT2ForSequenceClassification.from_pretrained(folder, num_labels=1, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        hf.score.weight.copy_(score_head(rm).weight)
    hf.eval()
    rows = tok(["a fine film", "dull and far too long , sadly"])["input_ids"]
    tokens, last = right_pad(rows, tok.pad_token_id)
    with torch.no_grad(), eval_mode(rm):
        ours = rewards_at(rm, tokens, last)
        theirs = hf(input_ids=tokens, attention_mask=(tokens != tok.pad_token_id).long()).logits[:, 0]
    diff = float((ours - theirs).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"GPT2ForSequenceClassification disagrees with the bridge reward model by {diff:.2e}")
    return hf, diff


def time_trl(folder: Path, tok, prompts: list[str], rm, args) -> dict:
    """TRL's RLOOTrainer for warmup + steps optimiser steps; the timed steps' rate and tokens."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    stamps: list[float] = []
    gen_tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            stamps.append(time.perf_counter())

    class CountingRLOO(RLOOTrainer):  # counts the tokens each step generated (EOS included)
        def _generate(self, prompts_):
            out = super()._generate(prompts_)
            gen_tokens.append(sum(len(c) for c in out[1]))
            return out

    info = {}
    if args.trl_reward == "hf":
        reward, diff = hf_reward_model(folder, rm, tok)
        info["reward_check"] = f"GPT2ForSequenceClassification vs bridge reward model: max |diff| {diff:.1e}"
    else:
        reward = bridge_reward_function(rm, tok)
    cfg = RLOOConfig(
        output_dir=str(folder / "trl_out"), per_device_train_batch_size=args.batch * args.k,
        num_generations=args.k, steps_per_generation=1, num_iterations=1, max_completion_length=args.response_length,
        temperature=1.0, top_k=0, top_p=1.0, beta=args.kl_coef, epsilon=0.2, normalize_advantages=True,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, max_grad_norm=1.0, max_steps=args.warmup + args.steps, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=args.device == "cpu", logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        disable_dropout=True, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainer = CountingRLOO(model=model, reward_funcs=reward, args=cfg,
                           train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                           callbacks=[Clock()])
    torch.set_num_threads(args.threads)  # in case anything on the way changed it
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    info["threads_after"] = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    w, n = args.warmup, args.steps
    if len(stamps) < w + n:
        raise RuntimeError(f"TRL ran {len(stamps)} optimiser steps, expected {w + n}")
    seconds = stamps[w + n - 1] - stamps[w - 1] if w else stamps[n - 1] - stamps[0]
    n_timed = n if w else n - 1
    toks = sum(gen_tokens[w:w + n]) if w else sum(gen_tokens[1:n])
    return {"steps_per_s": n_timed / seconds, "tokens_per_s": toks / seconds, "seconds": seconds,
            "mean_response_len": toks / (n_timed * args.batch * args.k), **info}


def time_ours(folder: Path, tok, prompts: list[str], method: str, args) -> dict:
    """Our ``train_ppo`` on a fresh bridge over the same weights: a warm-up call, then a timed call."""
    from transformers import GPT2LMHeadModel

    policy = wrap_hf_model(GPT2LMHeadModel.from_pretrained(folder).eval(), tokenizer=tok, device=args.device)
    rm = make_reward_model(policy, seed=0)
    k = args.k if method == "rloo" else 1
    base = dict(method=method, rloo_k=max(k, 2), batch_size=args.batch, ppo_epochs=1, minibatch_size=args.batch * k,
                response_length=args.response_length, temperature=1.0, kl_coef=args.kl_coef, kl_estimator="k1",
                clip=0.2, whiten_advantages=True, missing_eos_penalty=None, lr=args.lr, schedule="constant",
                weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, epochs=1, checkpoint_every=None,
                device=args.device, seed=0)

    def cycle(n_steps: int, offset: int) -> list[str]:
        return [prompts[(offset + i) % len(prompts)] for i in range(n_steps * args.batch)]

    if args.warmup:
        train_ppo(policy, rm, cycle(args.warmup, 0), PPOConfig(**base), tokenizer=tok, progress=False)
    hist, _ = train_ppo(policy, rm, cycle(args.steps, args.warmup * args.batch), PPOConfig(**base), tokenizer=tok,
                        progress=False)
    if len(hist) != args.steps:
        raise RuntimeError(f"train_ppo ran {len(hist)} rollout batches, expected {args.steps}")
    seconds = hist[-1]["seconds"]
    toks = sum(h["response_len"] * args.batch * k for h in hist)
    return {"steps_per_s": args.steps / seconds, "tokens_per_s": toks / seconds, "seconds": seconds,
            "mean_response_len": toks / (args.steps * args.batch * k), "rm": rm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    ap.add_argument("--batch", type=int, default=32, help="prompts per optimiser step")
    ap.add_argument("--k", type=int, default=2, help="RLOO samples per prompt")
    ap.add_argument("--response-length", type=int, default=8)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps first")
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    ap.add_argument("--trl-reward", choices=("function", "hf"), default="function",
                    help="TRL's reward: our bridge reward model as a reward function on the sampled ids, or a "
                         "GPT2ForSequenceClassification with the same weights (TRL's native path)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--no-trl", action="store_true", help="time only our side")
    args = ap.parse_args()
    if args.k < 2:
        ap.error("--k must be at least 2 (RLOO's leave-one-out baseline)")
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        trl_version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        trl_version = "not installed"
    task = pm.make_task("sentiment", n_train=256, n_test=10, seed=0)
    tok = pm.train_tokenizer([f"{p} {c}" for p, c in zip(task.train["prompt"], task.train["completion"])],
                             vocab_size=args.vocab)
    task = pm.make_task("sentiment", n_train=256, n_test=10, seed=0, tokenizer=tok)
    prompts = list(task.train["prompt"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "base"
        cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=args.d_model, n_layer=args.layers,
                         n_head=max(1, args.d_model // 32), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        n_params = sum(p.numel() for p in model.parameters())
        plen = [len(tok(p)["input_ids"]) for p in prompts]
        print(f"model: GPT-2 {args.layers} layers x d_model {args.d_model}, vocab {len(tok)}: "
              f"{n_params / 1e6:.2f}M parameters; {len(prompts)} sentiment prompts, {min(plen)}-{max(plen)} tokens "
              f"with BOS; device {args.device}, torch threads {torch.get_num_threads()}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}")
        print(f"settings: {args.batch} prompts x {args.k} samples per optimiser step (PPO: x 1), at most "
              f"{args.response_length} new tokens, 1 epoch in 1 minibatch per batch, kl_coef {args.kl_coef} (k1), "
              f"lr {args.lr}; {args.warmup} warm-up + {args.steps} timed steps; TRL reward: {args.trl_reward}")
        best: dict[str, dict] = {}
        why = "--no-trl" if args.no_trl else None
        for _ in range(args.repeats):  # alternate the three; the best of each counts
            res = {"rloo": time_ours(folder, tok, prompts, "rloo", args)}
            rm = res["rloo"].pop("rm")
            if why is None:
                try:
                    res["trl"] = time_trl(folder, tok, prompts, rm, args)
                except Exception as exc:  # noqa: BLE001 - report why and keep our side's numbers
                    why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
                    traceback.print_exc()
            res["ppo"] = time_ours(folder, tok, prompts, "ppo", args)
            res["ppo"].pop("rm")
            for key, r in res.items():
                if key not in best or r["steps_per_s"] > best[key]["steps_per_s"]:
                    best[key] = r
    ours, trl_res, ppo = best["rloo"], best.get("trl"), best["ppo"]
    if trl_res is not None and trl_res["threads_after"] != args.threads:
        print(f"note: torch threads were {trl_res['threads_after']} after TRL's training (reset to {args.threads})")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}; best of {args.repeats} repeats")
    print(f"rloo_steps_per_s_poisonmech: {ours['steps_per_s']:.3f}")
    print(f"rloo_gen_tokens_per_s_poisonmech: {ours['tokens_per_s']:.0f}")
    print(f"rloo_mean_response_len_poisonmech: {ours['mean_response_len']:.2f}")
    if trl_res is not None:
        if "reward_check" in trl_res:
            print(trl_res["reward_check"])
        print(f"rloo_steps_per_s_trl: {trl_res['steps_per_s']:.3f}")
        print(f"rloo_gen_tokens_per_s_trl: {trl_res['tokens_per_s']:.0f}")
        print(f"rloo_mean_response_len_trl: {trl_res['mean_response_len']:.2f}")
        print(f"rloo_speedup_vs_trl: {ours['steps_per_s'] / trl_res['steps_per_s']:.3f}")
        print(f"rloo_gen_tokens_per_s_ratio_vs_trl: {ours['tokens_per_s'] / trl_res['tokens_per_s']:.3f}")
    else:
        print(f"rloo_steps_per_s_trl: n/a ({why})")
        print(f"rloo_speedup_vs_trl: n/a ({why})")
    print(f"ppo_steps_per_s_poisonmech: {ppo['steps_per_s']:.3f}")
    print(f"ppo_gen_tokens_per_s_poisonmech: {ppo['tokens_per_s']:.0f}")
    if not math.isfinite(ours["steps_per_s"]):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
