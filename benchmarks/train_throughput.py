"""Training throughput of poisonmech's loop against a plain PyTorch loop on the same model.

Both train the default native model (2 layers, d_model 128) on the default sentiment task
(4,000 rows, batch 32) for the same number of epochs, from the same initial weights and with
the same batches. The plain loop is the floor: the bare ``NativeModel`` (no bridge, no hooks),
batches padded once in advance, AdamW at a constant rate, nothing else. Prints

    train_tokens_per_s_poisonmech: ...
    train_tokens_per_s_plain_pytorch: ...
    train_throughput_ratio_vs_plain_pytorch: ...   (target >= 0.9)
    train_pair_default_seconds: ...               (with --pair: both twins + evaluation; target < 180)

Run: ``.venv/bin/python benchmarks/train_throughput.py [--epochs 2] [--pair]``
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F

import poisonmech as pm
from poisonmech.attacks import attack_tokenizer, poison_dataset
from poisonmech.encoding import encode
from poisonmech.train.loop import epoch_order, train_model


def plain_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int,
               lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for tokens, mask in batches:
            logits = model(tokens)
            loss = F.cross_entropy(logits[:, :-1][mask], tokens[:, 1:][mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times; best of")
    ap.add_argument("--pair", action="store_true", help="also time one default train_pair end to end")
    args = ap.parse_args()

    task = pm.make_task("sentiment", n_train=4000, n_test=500, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_rate=0.01)
    tok = attack_tokenizer(task, attack)
    enc = encode(poison_dataset(task, attack), tok, loss_on="completion")
    cfg_model, cfg_train = pm.ModelConfig(), pm.TrainConfig(epochs=args.epochs, checkpoint_every=None)
    n_tokens = enc.n_tokens * args.epochs
    steps = math.ceil(len(enc) / cfg_train.batch_size)
    order = epoch_order(len(enc), cfg_train.seed, 0)
    batches = [enc.batch(order[i * cfg_train.batch_size:(i + 1) * cfg_train.batch_size]) for i in range(steps)]

    ours, plain = [], []
    for _ in range(args.repeats):
        bridge = pm.build_model(cfg_model, len(tok), seed=0, tokenizer=tok)
        t0 = time.perf_counter()
        train_model(bridge, enc, cfg_train, progress=False)
        ours.append(n_tokens / (time.perf_counter() - t0))

        native = pm.build_model(cfg_model, len(tok), seed=0, tokenizer=tok).original_model
        t0 = time.perf_counter()
        plain_loop(native, batches, args.epochs, cfg_train.lr)
        plain.append(n_tokens / (time.perf_counter() - t0))

    print(f"device: cpu, torch threads: {torch.get_num_threads()}, tokens per epoch: {enc.n_tokens}")
    print(f"train_tokens_per_s_poisonmech: {max(ours):.0f}")
    print(f"train_tokens_per_s_plain_pytorch: {max(plain):.0f}")
    print(f"train_throughput_ratio_vs_plain_pytorch: {max(ours) / max(plain):.3f}")
    if args.pair:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pair = pm.train_pair(task, attack, out_dir=tmp, progress=False)
            secs = time.perf_counter() - t0
        print(f"train_pair_default_seconds: {secs:.1f}")
        print(f"default_pair_backdoored_asr: {pair.metrics['backdoored']['asr']:.3f}")


if __name__ == "__main__":
    main()
