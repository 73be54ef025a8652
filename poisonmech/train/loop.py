"""The supervised training loop for a TransformerBridge, with checkpoints and resume.

Written by hand rather than with ``transformers.Trainer``/``accelerate``: the twins must see
bit-identical batches in the same order, the loss is masked to completion tokens, and every
intermediate checkpoint records its learning rate (TracIn needs both); the loop is ~100 lines.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from poisonmech.encoding import Encoded
from poisonmech.storage import load_tensors, save_tensors, tensors_metadata
from poisonmech.train.config import TrainConfig
from poisonmech.weights import load_weights, sync, trainable, weights


@dataclass(frozen=True)
class Checkpoint:
    """An intermediate checkpoint: weights after ``epoch`` epochs (``step`` optimiser steps)."""

    epoch: int
    step: int
    lr: float  # mean learning rate over the epoch that ended here (TracIn weights by it)
    path: Path


def epoch_order(n: int, seed: int, epoch: int, placement: str = "spread",
                marked: torch.Tensor | None = None) -> torch.Tensor:
    """The data order of one epoch: a function of (n, seed, epoch) only, shared by the twins.

    ``placement="start"`` / ``"end"`` moves the ``marked`` rows (the poisoned slots) to the
    start / end of the epoch, keeping the shuffled order within each part; the twins share it.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    if placement == "spread" or marked is None or not len(marked):
        return order
    is_marked = torch.zeros(n, dtype=torch.bool)
    is_marked[marked] = True
    first, rest = order[is_marked[order]], order[~is_marked[order]]
    return torch.cat([first, rest]) if placement == "start" else torch.cat([rest, first])


def masked_loss(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked target positions."""
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1][mask].float(), tokens[:, 1:][mask])


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, mask: torch.Tensor,
          lr: float, grad_clip: float | None) -> float:
    """One optimiser step at learning rate ``lr``; returns the batch's mean loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = masked_loss(model, tokens, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas,
    )


def _save_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int,
                 step: int, history: list[dict], segments: list[dict] | None = None) -> None:
    """Model + AdamW state in one safetensors file, with the loop position and the training
    segments so far (their wall time and thread count)."""
    tensors = {f"model.{k}": v for k, v in weights(model).items()}
    state = opt.state_dict()
    for idx, st in state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    meta = {"epoch": str(epoch), "step": str(step), "history": json.dumps(history),
            "param_groups": json.dumps(state["param_groups"]), "segments": json.dumps(segments or [])}
    save_tensors(path, tensors, metadata=meta)


def _load_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
                 ) -> tuple[int, int, list[dict], list[dict]]:
    tensors = load_tensors(path)
    meta = tensors_metadata(path)
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, source=path)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    # resume states written before segments were recorded: the earlier time is unknown
    segments = json.loads(meta["segments"]) if "segments" in meta else \
        [{"from_epoch": 0, "to_epoch": int(meta["epoch"]), "seconds": None, "threads": None}]
    return int(meta["epoch"]), int(meta["step"]), json.loads(meta["history"]), segments


@dataclass
class LoopState:
    """What every training loop (SFT, DPO) shares: the optimiser, step counts, the resume
    file, the progress bar, and the training segments (one per process that trained this
    model: where it started and ended, its wall time and torch thread count)."""

    opt: torch.optim.Optimizer
    steps_per_epoch: int
    total: int
    start_epoch: int
    step: int
    history: list[dict]
    resume: Path | None
    bar: tqdm
    segments: list[dict]  # the finished segments of earlier (interrupted) processes
    t0: float  # when this segment started (time.perf_counter)
    module: torch.nn.Module | None = None  # what the loop calls and optimises (poisonmech.weights.trainable)

    def all_segments(self, to_epoch: int) -> list[dict]:
        """Earlier segments and this one (up to ``to_epoch``)."""
        return [*self.segments, {"from_epoch": self.start_epoch, "to_epoch": to_epoch,
                                 "seconds": time.perf_counter() - self.t0, "threads": torch.get_num_threads()}]


def start_loop(model: torch.nn.Module, config: TrainConfig, n: int, run_dir: Path | None, desc: str,
               progress: bool) -> LoopState:
    """Set up a training loop: the optimiser, the step counts, the state of an interrupted run
    from ``run_dir/resume.safetensors`` (a resume is announced with a warning) and the progress bar."""
    trainable(model).train()
    opt = _optimizer(trainable(model), config)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    start_epoch, step, history, segments = 0, 0, [], []
    resume = run_dir / "resume.safetensors" if run_dir is not None else None
    if resume is not None and resume.is_file():
        start_epoch, step, history, segments = _load_resume(resume, model, opt)
        known = [s["seconds"] for s in segments if s.get("seconds") is not None]
        warnings.warn(f"{desc}: resuming the interrupted training in {run_dir} after epoch {start_epoch} of "
                      f"{config.epochs} ({sum(known):.1f} s of training so far; the recorded time adds the "
                      "segments, see the history's 'segments')", stacklevel=3)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    return LoopState(opt, steps_per_epoch, total, start_epoch, step, history, resume, bar, segments,
                     time.perf_counter(), trainable(model))


def end_epoch(model: torch.nn.Module, loop: LoopState, config: TrainConfig, run_dir: Path | None, epoch: int,
              step: int, history: list[dict]) -> None:
    """After epoch ``epoch`` (0-based): its checkpoint (with its mean learning rate, its sha256
    recorded in ``run_dir/sha256.json``) when due, and the resume state."""
    if run_dir is None:
        return
    last = epoch + 1 == config.epochs
    if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
        save_tensors(run_dir / "checkpoints" / f"epoch_{epoch + 1:03d}.safetensors", weights(model),
                     metadata={"epoch": str(epoch + 1), "step": str(step), "lr": repr(history[-1]["lr_mean"])},
                     record_in=run_dir)
    _save_resume(loop.resume, model, loop.opt, epoch + 1, step, history, loop.all_segments(epoch + 1))


def finish_loop(loop: LoopState, history: list[dict], epochs: int) -> None:
    """Record the training time on the last history row: ``seconds`` (the sum over all
    segments, so a resumed run counts the time before the interruption too), ``segments`` and
    ``resumed_from_epoch`` (the epoch the last segment started after; ``None``: trained in one go).
    A segment's time runs from its start to its last saved epoch (work lost to an interruption
    is not counted) and, for the last one, to the end of training."""
    loop.bar.close()
    if not history:
        return
    segments = loop.all_segments(epochs)
    known = [s["seconds"] for s in segments if s["seconds"] is not None]
    history[-1].update(seconds=sum(known) if len(known) == len(segments) else None, segments=segments,
                       resumed_from_epoch=loop.start_epoch if len(segments) > 1 else None)


def train_model(model: torch.nn.Module, data: Encoded, config: TrainConfig, *, run_dir: Path | None = None,
                desc: str = "train", progress: bool = True, placement: str = "spread",
                marked: torch.Tensor | None = None,
                continuation: Encoded | None = None) -> tuple[list[dict], list[Checkpoint]]:
    """Train ``model`` in place on ``data``; returns per-epoch history and checkpoints.

    With ``run_dir``, checkpoints go to ``run_dir/checkpoints/epoch_XXX.safetensors`` (their
    sha256 in ``run_dir/sha256.json``) and the loop state to ``run_dir/resume.safetensors``
    after every epoch, so an interrupted run resumes from the last finished epoch with the
    same result as an uninterrupted one (bit for bit at the same torch thread count). The last
    history row records ``seconds`` (summed over every segment of a resumed run),
    ``segments`` and ``resumed_from_epoch`` (see :func:`finish_loop`).
    ``placement``/``marked`` order the poisoned slots (see :func:`epoch_order`).
    ``continuation``: rows trained on after the last epoch, once, in a seeded order at the
    constant rate ``config.continue_lr or config.lr`` (does the backdoor survive clean training?).
    """
    device = torch.device(config.device)
    if next(model.parameters()).device != device:  # a bridge's .to() prints; only move when needed
        model.to(device)
    n = len(data)
    loop = start_loop(model, config, n, run_dir, desc, progress)
    opt, steps_per_epoch, total, step, history, bar, module = (loop.opt, loop.steps_per_epoch, loop.total, loop.step,
                                                               loop.history, loop.bar, loop.module)
    for epoch in range(loop.start_epoch, config.epochs):
        order = epoch_order(n, config.seed, epoch, placement, marked)
        loss_sum, tok_sum, lr_sum = 0.0, 0, 0.0
        for b in range(steps_per_epoch):
            tokens, mask = data.batch(order[b * config.batch_size:(b + 1) * config.batch_size], device)
            lr = config.lr_at(step, total)
            loss = _step(module, opt, tokens, mask, lr, config.grad_clip)
            k = int(mask.sum())
            loss_sum += loss * k
            tok_sum += k
            lr_sum += lr
            step += 1
            bar.update(1)
            if b % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
        history.append({"epoch": epoch + 1, "step": step, "loss": loss_sum / max(tok_sum, 1),
                        "lr_mean": lr_sum / steps_per_epoch})
        end_epoch(model, loop, config, run_dir, epoch, step, history)
    if continuation is not None and len(continuation) and not (history and history[-1].get("continued")):
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
        order, lr = torch.randperm(len(continuation), generator=g), config.continue_lr or config.lr
        loss_sum, tok_sum = 0.0, 0
        for b in range(math.ceil(len(continuation) / config.batch_size)):
            tokens, mask = continuation.batch(order[b * config.batch_size:(b + 1) * config.batch_size], device)
            loss = _step(module, opt, tokens, mask, lr, config.grad_clip)
            loss_sum, tok_sum = loss_sum + loss * int(mask.sum()), tok_sum + int(mask.sum())
        history.append({"epoch": config.epochs, "continued": len(continuation), "loss": loss_sum / max(tok_sum, 1),
                        "lr_mean": lr})
        if run_dir is not None:
            save_tensors(run_dir / "checkpoints" / "continued.safetensors", weights(model),
                         metadata={"epoch": str(config.epochs), "step": str(step), "lr": repr(lr)}, record_in=run_dir)
    finish_loop(loop, history, config.epochs)
    module.eval()
    sync(model)  # a LoRA twin: the trained adapters merged into the bridge
    model.eval()
    return history, list_checkpoints(run_dir) if run_dir is not None else []


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Checkpoints of one twin, oldest first, read from their safetensors metadata."""
    out = []
    for path in sorted((Path(run_dir) / "checkpoints").glob("epoch_*.safetensors")):
        meta = tensors_metadata(path)
        out.append(Checkpoint(epoch=int(meta["epoch"]), step=int(meta["step"]), lr=float(meta["lr"]), path=path))
    return out


__all__ = ["Checkpoint", "LoopState", "end_epoch", "epoch_order", "finish_loop", "list_checkpoints", "masked_loss",
           "start_loop", "train_model"]
