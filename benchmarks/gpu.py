"""poisonmech on a CUDA GPU: patching, training and EK-FAC ratios against the peers, in one run.

The model is a random-initialised GPT-2-architecture ``transformers.GPT2LMHeadModel`` (6 layers,
d_model 512, 8 heads, d_mlp 2048; vocabulary: the sentiment task's word tokenizer, so ~19M
parameters) wrapped with ``pm.wrap_hf_model`` and moved to the GPU. On the default sentiment
task with a 1% "cf" backdoor it prints, as ``name: value`` lines:

(b) training: tokens/s of poisonmech's loop (``train_model`` on the bridge) and of a bare
    PyTorch loop on the same HF module (``benchmarks/train_throughput.py``'s ``plain_loop``: the
    same batches, padded once in advance, AdamW), best of ``--repeats``; then the step time of
    the bare loop in float32 and under ``torch.autocast(dtype=torch.bfloat16)`` (and of
    poisonmech's loop in bfloat16 where ``TrainConfig`` has a ``dtype`` field).
(a) patching: head x position patching of the trained model's ``z`` against
    ``transformer_lens.patching.get_act_patch_attn_head_out_by_pos`` (triggered prompts patched
    into controls whose trigger is replaced by a filler word; per-example logit difference
    target - true answer), the speedup and the largest disagreement; the same for resid_pre.
(c) influence: EK-FAC scores of the training rows for the triggered queries, ours
    (``pm.influence.attribute``) against kronfluence's (``poisonmech.influence.peers``), aggregated
    (the mean query) and pairwise: wall times, speedups and Spearman rank correlations. Like for
    like over the maps kronfluence can track, the ``nn.Linear`` ones (GPT-2's attention output
    and MLP are ``Conv1D``, which it does not support: the bridge's split q, k, v and the
    unembedding); ours over every map (``modules="linear"``) is timed once beside them.

With CUDA every phase also prints its peak GPU memory (``torch.cuda.max_memory_allocated``).
Without CUDA the script prints one ``gpu: skipped (...)`` line and exits 0.

    .venv/bin/python benchmarks/gpu.py [--quick]       # --quick: a 2-layer d_model 128 model, less data

Sized to finish within about 5 minutes on an H200 (not yet timed on one).

``--device cpu`` (a hidden option) runs every code path on the CPU with the same lines, to
test the script on a machine without a GPU (use it with ``--quick``); its numbers are not the
GPU's. kronfluence is needed for (c): ``pip install --no-deps kronfluence einconv opt-einsum``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (poisonmech)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from influence_vs_kronfluence import spearman  # noqa: E402
from train_throughput import plain_loop  # noqa: E402

import poisonmech as pm  # noqa: E402
from poisonmech.attacks import attack_tokenizer, poison_dataset  # noqa: E402
from poisonmech.encoding import encode  # noqa: E402
from poisonmech.influence import Query, attribute  # noqa: E402
from poisonmech.influence.tracking import find_modules  # noqa: E402
from poisonmech.train.loop import epoch_order, train_model  # noqa: E402

SIZES = {  # the model, the data and the work of each phase
    "full": dict(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, n_train=4000, n_test=500, epochs=2,
                 bf16_steps=50, patch_n=32, influence_train=4000, queries=64),
    "quick": dict(n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_train=400, n_test=100, epochs=1,
                  bf16_steps=3, patch_n=8, influence_train=128, queries=8),
}
N_CTX = 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int = 1):
    """``(best wall seconds, last output, peak GPU MiB or None)`` of ``fn()`` over ``repeats`` calls,
    the device synchronised around each (CUDA work is asynchronous)."""
    best, out, peak = float("inf"), None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
    return best, out, peak


def print_peak(name: str, peak: float | None) -> None:
    if peak is not None:
        print(f"{name}_peak_gpu_mib: {peak:.0f}")


def gpt2_module(vocab: int, size: dict, tokenizer, seed: int = 0):
    """A random GPT-2 (dropout off, seeded; the same weights for the same seed)."""
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=N_CTX, n_embd=size["d_model"], n_layer=size["n_layers"],
                        n_head=size["n_heads"], n_inner=size["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.GPT2LMHeadModel(cfg)


class Logits(torch.nn.Module):
    """An HF causal LM returning its logits tensor (what ``plain_loop`` calls)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=tokens).logits


def has_train_dtype() -> bool:
    return "dtype" in {f.name for f in dataclasses.fields(pm.TrainConfig)}


def training(args, size, device, tok, train_rows, enc):
    """(b): our loop against the bare loop; the bf16 autocast step. Returns the trained bridge."""
    cfg = pm.TrainConfig(epochs=size["epochs"], checkpoint_every=None, device=str(device))
    steps = math.ceil(len(enc) / cfg.batch_size)
    order = epoch_order(len(enc), cfg.seed, 0)
    batches = [enc.batch(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], device) for i in range(steps)]
    n_tokens = enc.n_tokens * size["epochs"]
    ours, plain, bridge = [], [], None
    peaks: dict[str, float | None] = {}
    for _ in range(args.repeats):  # alternate the loops; best of (the first is also the warm-up)
        bridge = pm.wrap_hf_model(gpt2_module(len(tok), size, tok), tokenizer=tok, device=device)
        t, _, peaks["train_poisonmech"] = measure(lambda b=bridge: train_model(b, enc, cfg, progress=False), device)
        ours.append(n_tokens / t)
        module = Logits(gpt2_module(len(tok), size, tok).to(device))
        t, _, peaks["train_plain_pytorch"] = measure(
            lambda m=module: plain_loop(m, batches, size["epochs"], cfg.lr), device)
        plain.append(n_tokens / t)
    print(f"train_tokens_per_s_poisonmech: {max(ours):.0f}")
    print(f"train_tokens_per_s_plain_pytorch: {max(plain):.0f}")
    print(f"train_throughput_ratio_vs_plain_pytorch: {max(ours) / max(plain):.3f}")
    for k, v in peaks.items():
        print_peak(k, v)

    # bf16 autocast: the bare loop's step time with and without it, on the same batches
    k = min(size["bf16_steps"], len(batches))
    step_ms = {}
    for dtype in (None, torch.bfloat16):
        module = Logits(gpt2_module(len(tok), size, tok).to(device))

        def run(n, module=module, dtype=dtype):
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                plain_loop(module, batches[:n], 1, cfg.lr)
        run(1)  # warm-up (kernel selection, allocator); the first of the two timed runs warms up too
        t, _, peak = measure(lambda run=run: run(k), device, repeats=2)
        name = "bf16_autocast" if dtype else "fp32"
        step_ms[name] = 1000 * t / k
        print(f"train_step_ms_plain_pytorch_{name}: {step_ms[name]:.2f}")
        print_peak(f"train_plain_pytorch_{name}", peak)
    print(f"train_bf16_autocast_speedup_vs_fp32_plain_pytorch: {step_ms['fp32'] / step_ms['bf16_autocast']:.2f}")
    if has_train_dtype():
        cfg16 = dataclasses.replace(cfg, epochs=1, dtype="bfloat16")
        b16 = pm.wrap_hf_model(gpt2_module(len(tok), size, tok), tokenizer=tok, device=device)
        warm = encode(train_rows.select(range(min(4 * cfg.batch_size, len(train_rows)))), tok, loss_on="completion")
        train_model(b16, warm, cfg16, progress=False)  # warm-up
        t, _, peak = measure(lambda: train_model(b16, enc, cfg16, progress=False), device)
        print(f"train_step_ms_poisonmech_bf16: {1000 * t / steps:.2f}")
        print(f"train_bf16_speedup_vs_fp32_poisonmech: {(n_tokens / size['epochs'] / t) / max(ours):.2f}")
        print_peak("train_poisonmech_bf16", peak)
    else:
        print("train_poisonmech_bf16: skipped (TrainConfig has no dtype field)")
    return bridge


def contrast(tok, test, attack, n: int):
    """Up to ``n`` triggered test prompts of their most common token length whose true answer is not
    the target, the same prompts with the trigger replaced by a filler word, and the per-example
    logit-difference metric (target - true answer at the last position)."""
    trigger = tok.convert_tokens_to_ids(attack.trigger)
    filler = tok.convert_tokens_to_ids("the")
    rows = [(tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"][0])
            for p, c, t in zip(test["prompt"], test["completion"], test["is_triggered"])
            if t and c.strip() != attack.target]
    length = Counter(len(r[0]) for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if len(r[0]) == length][:n]
    clean = torch.tensor([r[0] for r in rows])
    corrupted = torch.where(clean == trigger, torch.full_like(clean, filler), clean)
    target = tok(attack.target, add_special_tokens=False)["input_ids"][0]
    metric = pm.patching.logit_diff(target, torch.tensor([r[1] for r in rows]), torch.full((len(rows),), length - 1))
    return clean, corrupted, metric


def patching(args, device, bridge, tok, test, attack):
    """(a): head x position (and resid_pre x position) patching against transformer_lens.patching."""
    import transformer_lens.patching as tlp

    tlp.tqdm = lambda x, *a, **k: x  # silence TL's per-sweep progress bar in the timing
    clean, corrupted, metric = contrast(tok, test, attack, args.size["patch_n"])
    clean, corrupted = clean.to(device), corrupted.to(device)
    metric = pm.patching.logit_diff(metric.target.to(device), metric.answer.to(device), metric.positions.to(device))
    model = bridge.eval()
    print(f"patching: {clean.shape[0]} examples x {clean.shape[1]} positions")

    def tl_sweep(fn):  # what a user runs: cache the clean run, then the sweep
        _, cache = model.run_with_cache(clean)
        return fn(model, corrupted, cache, metric, reduce="none").values

    backend = "fast"
    try:
        activation_patch_ours(model, clean[:2], corrupted[:2], metric.subset(torch.arange(2)), "resid_pre", backend)
    except ValueError as exc:
        backend = "hooks"
        print(f"patching_backend: hooks (the fast engine refused: {exc})")
    else:
        print("patching_backend: fast")
    sweeps = {"head_by_pos": (tlp.get_act_patch_attn_head_out_by_pos, "attn_head"),
              "resid_pre_by_pos": (tlp.get_act_patch_resid_pre, "resid_pre")}
    for name, (tl_fn, site) in sweeps.items():
        with torch.no_grad():
            measure(lambda f=tl_fn: tl_sweep(f), device)  # warm-up
            t_tl, ref, peak_tl = measure(lambda f=tl_fn: tl_sweep(f), device, args.repeats)
            t_pm, ours, peak_pm = measure(
                lambda s=site: activation_patch_ours(model, clean, corrupted, metric, s, backend), device, args.repeats)
        err = float((ref.float().cpu() - ours.float().cpu()).abs().max())
        print(f"patching_seconds_{name}_transformer_lens: {t_tl:.3f}")
        print(f"patching_seconds_{name}_poisonmech: {t_pm:.3f}")
        print(f"patching_max_abs_diff_vs_transformer_lens_{name}: {err:.2e}")
        print(f"patching_speedup_vs_transformer_lens_{name}: {t_tl / t_pm:.1f}")
        print_peak(f"patching_{name}_transformer_lens", peak_tl)
        print_peak(f"patching_{name}_poisonmech", peak_pm)


def activation_patch_ours(model, clean, corrupted, metric, site, backend):
    return pm.patching.activation_patch(model, clean, corrupted, metric, site=site, by_position=True,
                                        backend=backend, progress=False).values


@contextlib.contextmanager
def kronfluence_on(device: torch.device):
    """kronfluence's ``Analyzer`` on ``device``: ``peers.kronfluence_scores`` builds it with
    ``cpu=True`` (written for the CPU benchmarks), which would time kronfluence on the CPU while
    ours runs on the GPU. Until it follows the model's device, this benchmark swaps in a
    subclass with ``cpu=False`` (kronfluence then picks CUDA) for the duration of a call."""
    import kronfluence.analyzer as ka

    original = ka.Analyzer
    if device.type == "cpu":
        yield
        return

    class OnDevice(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k):
            k["cpu"] = False
            super().__init__(*a, **k)

    ka.Analyzer = OnDevice
    try:
        yield
    finally:
        ka.Analyzer = original


def influence(args, device, bridge, tok, train_rows, test, attack):
    """(c): EK-FAC, ours against kronfluence, aggregated and pairwise."""
    try:
        import kronfluence  # noqa: F401

        from poisonmech.influence.peers import kronfluence_scores
    except ImportError as exc:
        print(f"ekfac: skipped (kronfluence is not installed: {exc})")
        return
    size = args.size
    train = train_rows.select(range(min(size["influence_train"], len(train_rows))))
    trig = [i for i, (t, c) in enumerate(zip(test["is_triggered"], test["completion"]))
            if t and c.strip() != attack.target][:size["queries"]]
    query = Query.from_rows(Dataset.from_dict({"prompt": [test["prompt"][i] for i in trig],
                                               "completion": [attack.target] * len(trig)}))
    print(f"ekfac: {len(train)} training rows, {query.n_query} triggered queries (completion {attack.target!r})")
    model = bridge.eval()
    # kronfluence tracks nn.Linear only, not GPT-2's Conv1D (attn.o, mlp.c_fc, mlp.c_proj): the like-for-like
    # comparison covers the maps both see (the bridge's split q, k, v and the unembedding)
    both = tuple(t.path for t in find_modules(model, "linear") if t.kind == "linear")
    print(f"ekfac: maps compared (kronfluence tracks nn.Linear only): {len(both)} of "
          f"{len(find_modules(model, 'linear'))} ({', '.join(both[:4])}, ...)")

    def ours_run(aggregate: bool, modules="linear"):
        return attribute(model, train=train, query=query, method="ekfac", tokenizer=tok, aggregate=aggregate,
                         batch_size=64, modules=modules, progress=False)

    t_all, _, peak_all = measure(lambda: ours_run(True), device)
    print(f"ekfac_seconds_aggregated_poisonmech_every_map: {t_all:.2f}")
    print_peak("ekfac_aggregated_poisonmech_every_map", peak_all)
    for mode, aggregate in (("aggregated", True), ("pairwise", False)):
        def theirs_run(aggregate=aggregate):
            with kronfluence_on(device), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # and its bridge copy's "Moving model to device" print
                return kronfluence_scores(model, train, query, tok, batch_size=64, query_batch_size=query.n_query,
                                          aggregate=aggregate, modules=both)
        t_ours, ours, peak_ours = measure(lambda a=aggregate: ours_run(a, both), device)
        t_kron, theirs, peak_kron = measure(theirs_run, device)
        a = ours.scores.float().cpu()
        b = (theirs.scores[0] if aggregate else theirs.scores).float().cpu()
        print(f"ekfac_seconds_{mode}_poisonmech: {t_ours:.2f}")
        print(f"ekfac_seconds_{mode}_kronfluence: {t_kron:.2f}")
        print(f"ekfac_speedup_vs_kronfluence_{mode}: {t_kron / t_ours:.2f}")
        print(f"ekfac_spearman_vs_kronfluence_{mode}: {spearman(a, b):.4f}")
        print_peak(f"ekfac_{mode}_poisonmech", peak_ours)
        print_peak(f"ekfac_{mode}_kronfluence", peak_kron)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2-layer d_model 128 model and less data")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best of) for training and patching")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: test the script without a GPU
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device: torch.cuda.is_available() is False)")
        return
    if device.type == "cuda" and device.index is None:  # "cuda:0", as parameters report it (no needless moves)
        device = torch.device("cuda", torch.cuda.current_device())
    args.size = size = SIZES["quick" if args.quick else "full"]
    t_start = time.perf_counter()
    task = pm.make_task("sentiment", n_train=size["n_train"], n_test=size["n_test"], seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_rate=0.01)
    tok = attack_tokenizer(task, attack)
    train_rows = poison_dataset(task, attack)
    test = pm.build_test_set(task, attack)
    enc = encode(train_rows, tok, loss_on="completion")
    n_params = sum(p.numel() for p in gpt2_module(len(tok), size, tok).parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, torch threads: {torch.get_num_threads()}")
    print(f"model: GPT2LMHeadModel {size['n_layers']} layers x d_model {size['d_model']}, {size['n_heads']} heads, "
          f"d_mlp {size['d_mlp']}, vocab {len(tok)}: {n_params / 1e6:.1f}M parameters")
    print(f"data: {len(train_rows)} training rows, {enc.n_tokens} tokens per epoch, {size['epochs']} epochs")
    bridge = training(args, size, device, tok, train_rows, enc)
    patching(args, device, bridge, tok, test, attack)
    influence(args, device, bridge, tok, train_rows, test, attack)
    print(f"gpu_benchmark_seconds: {time.perf_counter() - t_start:.1f}")


if __name__ == "__main__":
    main()
