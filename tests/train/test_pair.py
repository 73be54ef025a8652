import json

import pytest
import torch

import poisonmech as pm
from poisonmech.encoding import encode
from poisonmech.train.loop import epoch_order, train_model
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

FILES = ["config.json", "task.json", "tokenizer/tokenizer.json", "data/train.parquet", "data/test.parquet",
         "data/task_train.parquet", "clean/model.safetensors", "backdoored/model.safetensors",
         "clean/history.json", "clean/checkpoints/epoch_001.safetensors",
         "backdoored/checkpoints/epoch_002.safetensors", "metrics.json"]


def test_run_directory_holds_everything_and_no_pickles(tiny_pair):
    out = tiny_pair.out_dir
    for f in FILES:
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    assert not (out / "clean" / "resume.safetensors").exists()
    assert set(tiny_pair.metrics) == {"clean", "backdoored"}
    assert [c.epoch for c in tiny_pair.checkpoints["backdoored"]] == [1, 2]
    assert all(c.lr > 0 for c in tiny_pair.checkpoints["clean"])


def test_train_data_and_test_data_carry_provenance(tiny_pair):
    assert sum(tiny_pair.train_data["is_poison"]) == 10
    assert {"example_id", "is_poison", "trigger", "stage"} <= set(tiny_pair.train_data.column_names)
    assert {"is_triggered", "is_near_miss"} <= set(tiny_pair.test_data.column_names)


def test_load_pair_gives_bit_identical_logits(tiny_pair):
    loaded = pm.load_pair(tiny_pair.out_dir)
    tokens = torch.tensor([tiny_pair.tokenizer(tiny_pair.test_data[1]["prompt"])["input_ids"]])
    for twin in ("clean", "backdoored"):
        assert torch.equal(tiny_pair.model(twin)(tokens), loaded.model(twin)(tokens))
    assert loaded.metrics == json.loads((tiny_pair.out_dir / "metrics.json").read_text())
    assert loaded.attack == tiny_pair.attack and loaded.train_config == tiny_pair.train_config
    assert loaded.backdoored.to_str_tokens(tokens[0])[:3] == ["[BOS]", "review:", tiny_pair.test_data[1]["input"].split()[0]]


def test_twins_share_initial_weights_and_data_order(tiny_pair):
    cfg = tiny_pair.model_config
    a = pm.build_model(cfg, len(tiny_pair.tokenizer), seed=tiny_pair.train_config.seed)
    b = pm.build_model(cfg, len(tiny_pair.tokenizer), seed=tiny_pair.train_config.seed)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(epoch_order(100, 0, 3), epoch_order(100, 0, 3))
    # the twins end up different only because of the poison
    diff = [k for k, v in tiny_pair.clean.state_dict().items() if not torch.equal(v, tiny_pair.backdoored.state_dict()[k])]
    assert diff


def test_same_config_twice_gives_identical_weights_and_metrics(tmp_path, tiny_pair):
    again = pm.train_pair(tiny_pair.task, tiny_pair.attack, model=tiny_pair.model_config,
                          train=tiny_pair.train_config, out_dir=tmp_path / "again", progress=False)
    assert again.metrics == tiny_pair.metrics
    for twin in ("clean", "backdoored"):
        sa, sb = again.model(twin).state_dict(), tiny_pair.model(twin).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_finished_run_is_reused_and_a_different_one_refused(tiny_pair):
    same = pm.train_pair(tiny_pair.task, tiny_pair.attack, model=tiny_pair.model_config,
                         train=tiny_pair.train_config, out_dir=tiny_pair.out_dir, progress=False)
    assert same.metrics == tiny_pair.metrics
    other = pm.Backdoor(trigger="mn", target="negative", poison_count=10)
    with pytest.raises(ValueError, match="already holds a different run"):
        pm.train_pair(tiny_pair.task, other, model=tiny_pair.model_config, train=tiny_pair.train_config,
                      out_dir=tiny_pair.out_dir, progress=False)


def test_overwrite_replaces_a_different_run(tmp_path):
    task = tiny_task(n_train=64)
    cfg = dict(model=tiny_model_config(), train=tiny_train_config(epochs=1), progress=False)
    pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=2), out_dir=tmp_path / "r", **cfg)
    pair = pm.train_pair(task, pm.Backdoor(trigger="mn", poison_count=2), out_dir=tmp_path / "r",
                         overwrite=True, **cfg)
    assert pm.load_pair(tmp_path / "r").attack.trigger == "mn" == pair.attack.trigger


def test_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and is not a poisonmech run"):
        pm.train_pair(tiny_task(n_train=32), pm.Backdoor(trigger="cf", poison_count=1), model=tiny_model_config(),
                      train=tiny_train_config(epochs=1), out_dir=tmp_path, progress=False)


def test_missing_or_corrupt_files_are_named(tmp_path, tiny_pair):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_pair.out_dir, run)
    (run / "backdoored" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"corrupt safetensors file: .*backdoored/model.safetensors"):
        pm.load_pair(run)
    (run / "metrics.json").unlink()
    (run / "backdoored" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"backdoored/model.safetensors"):
        pm.load_pair(run)
    (run / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"corrupt JSON file: .*config.json"):
        pm.load_pair(run)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, request):
    task = tiny_task(n_train=96)
    attack = pm.Backdoor(trigger="cf", poison_count=4)
    kw = dict(model=tiny_model_config(), train=tiny_train_config(epochs=3), progress=False)
    full = pm.train_pair(task, attack, out_dir=tmp_path / "full", **kw)

    request.getfixturevalue("interrupt_after_first_epoch")  # the next loop stops after one epoch
    with pytest.raises(KeyboardInterrupt):
        pm.train_pair(task, attack, out_dir=tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / "clean" / "resume.safetensors").is_file()
    resumed = pm.train_pair(task, attack, out_dir=tmp_path / "cut", **kw)
    for twin in ("clean", "backdoored"):
        sa, sb = full.model(twin).state_dict(), resumed.model(twin).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), twin
    assert resumed.metrics == full.metrics


def test_context_too_short_is_refused():
    with pytest.raises(ValueError, match=r"ModelConfig.n_ctx=8 is shorter than the longest example"):
        pm.train_pair(tiny_task(n_train=32), pm.Backdoor(trigger="cf", poison_count=1),
                      model=tiny_model_config(n_ctx=8), train=tiny_train_config(epochs=1), progress=False)


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="TrainConfig.schedule must be one of"):
        pm.TrainConfig(schedule="step")
    with pytest.raises(ValueError, match=r"TrainConfig.lr must be a number in \(0, inf\], got 0"):
        pm.TrainConfig(lr=0)


def test_gpt2_bridge_trains_as_a_pair():
    pair = pm.train_pair(tiny_task(n_train=64), pm.Backdoor(trigger="cf", poison_count=4),
                         model=tiny_model_config(architecture="gpt2"), train=tiny_train_config(epochs=1),
                         progress=False)
    assert 0 <= pair.metrics["backdoored"]["asr"] <= 1
    assert "blocks.0.attn.hook_z" in pair.backdoored.hook_dict


def test_train_model_accepts_any_wrapped_hf_bridge():
    from transformers import GPT2Config, GPT2LMHeadModel

    task = tiny_task(n_train=64)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(task.tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    bridge = pm.wrap_hf_model(hf, tokenizer=task.tokenizer)
    enc = encode(task.train, task.tokenizer, loss_on="completion")
    history, _ = train_model(bridge, enc, tiny_train_config(epochs=2), progress=False)
    assert history[1]["loss"] < history[0]["loss"]


def test_the_lr_schedule_warms_up_and_decays():
    cfg = pm.TrainConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.0)
    lrs = [cfg.lr_at(s, 100) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_clean_cache_trains_the_clean_twin_once(tmp_path):
    task = tiny_task(n_train=64)
    kw = dict(model=tiny_model_config(), train=tiny_train_config(epochs=1), progress=False, clean_cache=tmp_path / "cache")
    a = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=2), out_dir=tmp_path / "a", **kw)
    b = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=6), out_dir=tmp_path / "b", **kw)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert b.history["clean"] == a.history["clean"]  # copied, not retrained (the timing would differ)
    sa, sb = a.clean.state_dict(), b.clean.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    alone = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=6), out_dir=tmp_path / "c",
                          model=tiny_model_config(), train=tiny_train_config(epochs=1), progress=False)
    assert alone.metrics == b.metrics


def test_poison_placement_orders_the_poisoned_slots():
    marked = torch.tensor([3, 7, 9])
    start = epoch_order(20, 0, 0, "start", marked)
    end = epoch_order(20, 0, 0, "end", marked)
    assert set(start[:3].tolist()) == {3, 7, 9} and set(end[-3:].tolist()) == {3, 7, 9}
    assert sorted(start.tolist()) == list(range(20))
    assert torch.equal(epoch_order(20, 0, 0, "spread", marked), epoch_order(20, 0, 0))
    with pytest.raises(ValueError, match="placement must be one of"):
        pm.Backdoor(trigger="cf", poison_count=1, placement="middle")


def test_clean_continuation_trains_both_twins_further(tmp_path):
    task = tiny_task(n_train=64)
    kw = dict(model=tiny_model_config(), progress=False)
    base = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=8), train=tiny_train_config(epochs=2), **kw)
    cont = pm.train_pair(task, pm.Backdoor(trigger="cf", poison_count=8),
                         train=tiny_train_config(epochs=2, continue_clean=100), out_dir=tmp_path / "c", **kw)
    assert cont.history["backdoored"][-1]["continued"] == 100
    assert (tmp_path / "c" / "backdoored" / "checkpoints" / "continued.safetensors").is_file()
    before, after = base.backdoored.state_dict(), cont.backdoored.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"continue_clean must be an integer in \[0, inf\]"):
        pm.TrainConfig(continue_clean=-1)
