"""Fine-tuning throughput of a pretrained HF model: poisonmech's loop vs a bare PyTorch loop.

A GPT-2-architecture base (``--layers`` x ``--d-model``, random weights, a byte-level BPE
tokenizer trained on real English text when ``wordnet-base``/``fortunes`` are installed, else on
the sentiment task's rows) is saved with ``save_pretrained`` and loaded back both ways:

- poisonmech: ``pm.PretrainedModel(folder).load_model()`` trained by ``train_model`` (the loop
  ``train_pair`` runs: seeded order, masked loss, schedule, clipping, per-epoch bookkeeping);
- bare: ``AutoModelForCausalLM.from_pretrained(folder)``, the same batches padded in advance,
  AdamW at a constant rate, nothing else.

Both see the same tokens; the loops alternate ``--repeats`` times and the best of each counts.
Prints ``finetune_tokens_per_s_poisonmech``, ``finetune_tokens_per_s_plain_pytorch`` and
``finetune_throughput_ratio_vs_plain_pytorch`` (target >= 0.9), with LoRA (``--lora``) too.

Run: ``.venv/bin/python benchmarks/finetune_throughput.py [--threads 2] [--lora]``
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from train_throughput import plain_loop  # the same bare loop as the from-scratch benchmark

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.pretrained import HFLogits
from poisonmech.train.loop import epoch_order, train_model
from poisonmech.weights import trainable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lora", action="store_true", help="also time LoRA fine-tuning (rank 8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    task = pm.make_task("sentiment", n_train=args.rows, n_test=8, seed=0)
    try:
        texts = list(pm.english_text(n=20000, seed=0)["text"])
        source = "english_text"
    except FileNotFoundError:
        texts = [f"{p} {c}" for p, c in zip(task.train["prompt"], task.train["completion"])]
        source = "sentiment rows"
    tok = pm.train_tokenizer(texts, vocab_size=4096)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "base"
        cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=args.d_model, n_layer=args.layers,
                         n_head=max(1, args.d_model // 64), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        GPT2LMHeadModel(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        task = pm.make_task("sentiment", n_train=args.rows, n_test=8, seed=0, tokenizer=tok)
        enc = encode(task.train, tok, loss_on="completion")
        n_params = sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters())
        print(f"model: GPT-2 {args.layers} layers x d_model {args.d_model}, vocab {len(tok)} (BPE on {source}): "
              f"{n_params / 1e6:.1f}M parameters; {len(enc)} rows, {enc.n_tokens} tokens; threads {args.threads}")
        kinds = ["full"] + (["lora"] if args.lora else [])
        for kind in kinds:
            train = pm.TrainConfig(epochs=1, batch_size=32, lr=1e-4, checkpoint_every=None)
            order = epoch_order(len(enc), train.seed, 0)
            steps = math.ceil(len(enc) / train.batch_size)
            batches = [enc.batch(order[i * train.batch_size:(i + 1) * train.batch_size]) for i in range(steps)]
            best = {"poisonmech": math.inf, "plain_pytorch": math.inf}
            for _ in range(args.repeats):
                model = pm.PretrainedModel(str(folder), finetune=kind).load_model()
                t0 = time.perf_counter()
                train_model(model, enc, train, progress=False)
                best["poisonmech"] = min(best["poisonmech"], time.perf_counter() - t0)
                bare = AutoModelForCausalLM.from_pretrained(folder)
                if kind == "lora":  # the same adapters on the bare module
                    bare = trainable(pm.PretrainedModel(str(folder), finetune="lora").load_model()).module
                t0 = time.perf_counter()
                plain_loop(HFLogits(bare), batches, 1, train.lr)
                best["plain_pytorch"] = min(best["plain_pytorch"], time.perf_counter() - t0)
            suffix = "" if kind == "full" else "_lora"
            rate = {k: enc.n_tokens / v for k, v in best.items()}
            print(f"finetune_tokens_per_s_poisonmech{suffix}: {rate['poisonmech']:.0f}")
            print(f"finetune_tokens_per_s_plain_pytorch{suffix}: {rate['plain_pytorch']:.0f}")
            print(f"finetune_throughput_ratio_vs_plain_pytorch{suffix}: {rate['poisonmech'] / rate['plain_pytorch']:.3f}")


if __name__ == "__main__":
    main()
