"""Work a sweep's runs share or skip: the count-0 backdoored twin, the clean twin another run is training."""

import os
import subprocess
import sys

import torch

import poisonmech as pm
import poisonmech.train.pair as pair_mod
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_count_zero_backdoored_twin_is_the_clean_twin_trained_once(tmp_path, monkeypatch):
    calls = []
    real = pair_mod.train_model
    monkeypatch.setattr(pair_mod, "train_model", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    task = tiny_task(n_train=64)
    kw = dict(model=tiny_model_config(), train=tiny_train_config(epochs=1), progress=False)
    for out in (tmp_path / "run", None):
        calls.clear()
        p = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=0), out_dir=out, **kw)
        assert calls == ["clean twin"]
        assert _equal(p.clean, p.backdoored)
    monkeypatch.setattr(pair_mod, "train_model", real)
    # what training it would have given: the same weights (same init, rows and order)
    from poisonmech.attacks.poison import attack_tokenizer
    from poisonmech.encoding import encode

    tok = attack_tokenizer(task, pm.Backdoor(trigger="cf", poison_count=0))
    m = pm.build_model(tiny_model_config(), len(tok), seed=0, tokenizer=tok)
    real(m, encode(task.train, tok, loss_on="completion"), tiny_train_config(epochs=1), progress=False,
         placement="spread", marked=torch.tensor([], dtype=torch.long))
    assert _equal(m, pm.load_pair(tmp_path / "run").backdoored)


def test_a_clean_twin_locked_by_another_run_is_waited_for_after_the_backdoored_twin(tmp_path, monkeypatch):
    task = tiny_task(n_train=64)
    attack = pm.Backdoor(trigger="cf", poison_count=4)
    kw = dict(model=tiny_model_config(), train=tiny_train_config(epochs=1), progress=False)
    reference = pm.train_pair(task, attack, out_dir=tmp_path / "ref", **kw)
    cache = tmp_path / "cache"
    config = pair_mod.run_config(task, attack, kw["model"], kw["train"])
    cached = pair_mod._clean_cache_dir(cache, config, attack.tokenizer(task))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    try:
        cached.with_name(cached.name + ".lock").write_text(str(holder.pid))
        calls = []
        real = pair_mod.train_model
        monkeypatch.setattr(pair_mod, "train_model", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
        p = pm.train_pair(task, attack, out_dir=tmp_path / "run", clean_cache=cache, **kw)
    finally:
        holder.kill()
        holder.wait()
    # the holder died without publishing: its stale lock was taken and the clean twin trained here
    assert calls == ["backdoored twin", "clean twin"]
    assert not cached.with_name(cached.name + ".lock").exists()
    assert (cached / "model.safetensors").is_file()
    assert _equal(p.clean, reference.clean) and _equal(p.backdoored, reference.backdoored)
    assert p.metrics == reference.metrics


def test_stale_and_empty_locks_are_cleared(tmp_path):
    cached = tmp_path / "abc"
    lock = tmp_path / "abc.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))
    assert pair_mod._lock_holder(cached) is None and not lock.exists()
    lock.write_text("")
    os.utime(lock, (0, 0))
    assert pair_mod._lock_holder(cached) is None and not lock.exists()
    taken = pair_mod._wait_or_lock(cached)
    assert taken == lock and lock.read_text() == str(os.getpid())


def test_clean_cache_keeps_apart_clean_twins_whose_order_depends_on_the_poison(tmp_path):
    """With placement="end" the poisoned slots close every epoch in both twins, so the clean
    twin's order (and weights) depends on which rows are poisoned: no sharing across counts."""
    task = tiny_task(n_train=64)
    kw = dict(model=tiny_model_config(), train=tiny_train_config(epochs=1), progress=False)
    shared = [pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=k, placement="end"),
                            out_dir=tmp_path / f"s{k}", clean_cache=tmp_path / "cache", **kw) for k in (2, 6)]
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]) == 2
    alone = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=6, placement="end"), out_dir=tmp_path / "a",
                          **kw)
    assert _equal(shared[1].clean, alone.clean)
    assert not _equal(shared[0].clean, shared[1].clean)
