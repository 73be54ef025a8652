"""TrainConfig.lr_at against transformers' schedulers: where they agree, and where ours differs.

Ours is written by hand (see ``TrainConfig.lr_at``): its warm-up is ``(step + 1) / warmup``
(transformers': ``step / warmup``, a first step at rate 0) and its decay ends exactly on the
floor at the last step (transformers' decays over ``total - warmup`` steps and stays above
it). After warm-up ours is transformers' schedule with ``num_training_steps = total - 1``;
during warm-up ours at ``step`` is transformers' at ``step + 1``."""

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

import poisonmech as pm


def _theirs(kind: str, lr: float, warmup: int, steps: int, floor: float, n: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if kind == "cosine":
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=floor)
    elif kind == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, steps)
    else:
        sched = get_constant_schedule_with_warmup(opt, warmup)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total, warmup_ratio", [(100, 0.05), (37, 0.1), (10, 0.0), (200, 0.3)])
def test_ours_is_transformers_schedule_shifted(kind, total, warmup_ratio):
    floor = 0.0 if kind == "linear" else 0.05  # transformers' linear schedule has no floor
    cfg = pm.TrainConfig(lr=3e-3, schedule=kind, warmup_ratio=warmup_ratio, min_lr_ratio=floor)
    warmup = int(warmup_ratio * total)
    ours = [cfg.lr_at(s, total) for s in range(total)]
    theirs = _theirs(kind, cfg.lr, warmup, total - 1, floor, total)
    for s in range(warmup, total):  # after warm-up: theirs with num_training_steps = total - 1
        assert ours[s] == pytest.approx(theirs[s], rel=1e-12, abs=1e-15), s
    for s in range(warmup - 1):  # warm-up: ours at step is theirs at step + 1
        assert ours[s] == pytest.approx(theirs[s + 1], rel=1e-12), s
    if kind == "constant":  # exactly, after warm-up
        assert ours[warmup:] == theirs[warmup:]


def test_where_ours_differs_from_transformers_own_convention():
    """Why the schedule stays hand-written: with transformers' own arguments (num_training_steps
    = total) the first step has rate 0 and the last one is above the floor; ours is not."""
    cfg = pm.TrainConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.05)
    ours = [cfg.lr_at(s, 100) for s in range(100)]
    theirs = _theirs("cosine", 1.0, 10, 100, 0.05, 100)
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(0.1)
    assert ours[10] == 1.0 and ours[-1] == pytest.approx(0.05, abs=1e-12) and theirs[-1] > 0.05 + 1e-5


def test_pinned_values():
    """Values of the schedule every cached run was trained with (exact: they must never change)."""
    assert [pm.TrainConfig().lr_at(s, 40) for s in (0, 1, 2, 20, 39)] == \
        [0.0015, 0.003, 0.003, 0.0016354787145545112, 0.00015000000000000001]
    assert [pm.TrainConfig(schedule="linear").lr_at(s, 40) for s in (0, 1, 2, 20, 39)] == \
        [0.0015, 0.003, 0.003, 0.0016135135135135134, 0.00015000000000000001]
