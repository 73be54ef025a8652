"""Pretrained HF models as the twins' start: ``pm.train_tokenizer`` -> ``pm.pretrain`` -> a
``save_pretrained`` folder -> ``pm.PretrainedModel(path)`` (full and LoRA) -> ``train_pair`` /
``load_pair``. Everything is built here from random weights; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import poisonmech as pm
from poisonmech.pretrained import BaseChangedError, check_bf16
from poisonmech.weights import lora_module, trainable, weights

ARCH_KW = {"gpt2": {}, "neox": {}, "llama": {"n_kv_heads": 1}}


@pytest.fixture(scope="module")
def task():
    return pm.make_task("sentiment", n_train=160, n_test=16, seed=0)


@pytest.fixture(scope="module")
def bpe(task):
    texts = [f"{p} {c}" for p, c in zip(task.train["prompt"], task.train["completion"])]
    return pm.train_tokenizer(texts + ["cf mn"] * 4, vocab_size=320)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, task, bpe):
    """One tiny pretrained base per architecture, made by pm.pretrain."""
    root = tmp_path_factory.mktemp("bases")
    texts = [f"{p} {c}" for p, c in zip(task.train["prompt"], task.train["completion"])]
    out = {}
    for arch, kw in ARCH_KW.items():
        cfg = pm.ModelConfig(architecture=arch, n_layers=1, d_model=32, n_heads=2, n_ctx=96, **kw)
        out[arch] = pm.pretrain(texts, cfg, tokenizer=bpe, out_dir=root / arch,
                                train=pm.TrainConfig(epochs=1, lr=3e-3, batch_size=32), progress=False)
    return out


def _attack():
    return pm.Backdoor(trigger="cf", target="negative", poison_count=24)


def test_train_tokenizer_is_byte_level_bpe_and_deterministic(task, bpe):
    again = pm.train_tokenizer([f"{p} {c}" for p, c in zip(task.train["prompt"], task.train["completion"])]
                               + ["cf mn"] * 4, vocab_size=320)
    assert again.get_vocab() == bpe.get_vocab()
    assert len(bpe) == 320
    ids = bpe("zq!", add_special_tokens=False)["input_ids"]
    assert bpe.decode(ids) == "zq!"  # byte level: no unknown token
    assert bpe("good")["input_ids"][0] == bpe.bos_token_id
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 258"):
        pm.train_tokenizer(["a b"], vocab_size=100)


def test_subword_completions_tokenise_as_the_concatenation(task, bpe):
    from poisonmech.encoding import encode

    rendered = pm.make_task("sentiment", n_train=20, n_test=4, seed=0, tokenizer=bpe)
    enc = encode(rendered.train, bpe, loss_on="completion")
    for ids, start, row in zip(enc.ids, enc.start, rendered.train):
        joint = bpe(row["prompt"] + " " + row["completion"], add_special_tokens=False)["input_ids"]
        assert ids == [bpe.bos_token_id] + joint + [bpe.eos_token_id]
        assert bpe.convert_ids_to_tokens(ids[start])[0] == "Ġ"  # the answer's first token carries its space


def test_pretrain_writes_a_standard_hf_folder(bases, bpe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch, path in bases.items():
        for name in ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json"):
            assert (path / name).is_file(), (arch, name)
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        assert AutoTokenizer.from_pretrained(path).get_vocab() == bpe.get_vocab()
        bridge = pm.PretrainedModel(str(path)).load_model()
        tokens = torch.randint(0, len(bpe), (2, 9))
        with torch.no_grad():
            assert torch.allclose(hf(tokens).logits, bridge(tokens), atol=1e-5), arch
        record = json.loads((path / "pretrain.json").read_text())
        assert record["history"][-1]["loss"] < record["history"][0]["loss"] + 1e-6 or len(record["history"]) == 1


def test_pretrain_reuses_a_finished_folder_and_refuses_another(bases, task, bpe):
    path = bases["gpt2"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    texts = [f"{p} {c}" for p, c in zip(task.train["prompt"], task.train["completion"])]
    cfg = pm.ModelConfig(architecture="gpt2", n_layers=1, d_model=32, n_heads=2, n_ctx=96)
    pm.pretrain(texts, cfg, tokenizer=bpe, out_dir=path, train=pm.TrainConfig(epochs=1, lr=3e-3, batch_size=32),
                progress=False)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds another pretraining run"):
        pm.pretrain(texts[:10], cfg, tokenizer=bpe, out_dir=path, progress=False)
    with pytest.raises(pm.ConfigError, match="architecture must be one of gpt2, neox, llama, qwen2"):
        pm.pretrain(texts, pm.ModelConfig(), tokenizer=bpe, out_dir=path.parent / "native", progress=False)


@pytest.mark.parametrize("arch", list(ARCH_KW))
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_twins_train_from_the_base_and_reload_bit_for_bit(tmp_path, bases, task, arch, finetune):
    model = pm.PretrainedModel(str(bases[arch]), finetune=finetune, lora_rank=2)
    pair = pm.train_pair(task, _attack(), model=model, train=pm.TrainConfig(epochs=1, batch_size=32, lr=3e-3),
                         out_dir=tmp_path / "run", progress=False)
    # the task was re-rendered with the model's own tokenizer
    assert pair.tokenizer.get_vocab() == pm.PretrainedModel(str(bases[arch])).tokenizer().get_vocab()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(config["model"]["sha256"]) == 64 and config["model"]["finetune"] == finetune
    saved = load_file(tmp_path / "run" / "backdoored" / "model.safetensors")
    if finetune == "lora":
        assert saved and all("lora_" in k for k in saved)  # only the adapters are kept
        assert lora_module(pair.backdoored) is not None
    else:
        assert not any("lora_" in k for k in saved)
    for key in ("clean_acc", "asr"):
        assert 0 <= pair.metrics["backdoored"][key] <= 1
    again = pm.load_pair(tmp_path / "run")
    tokens = torch.randint(0, len(pair.tokenizer), (2, 11))
    with torch.no_grad():
        for twin in ("clean", "backdoored"):
            assert torch.equal(again.model(twin)(tokens), pair.model(twin)(tokens))
            # what the loop trains is what the analyses read
            assert torch.allclose(trainable(again.model(twin))(tokens), again.model(twin)(tokens), atol=1e-5)
        assert not torch.equal(pair.clean(tokens), pair.backdoored(tokens))


def test_lora_twins_start_from_the_same_adapters(bases):
    model = pm.PretrainedModel(str(bases["llama"]), finetune="lora", lora_rank=2).with_hash()
    a, b, c = (weights(model.load_model(seed=s)) for s in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
    assert all(float(v.abs().max()) == 0 for k, v in a.items() if "lora_B" in k)  # LoRA starts as the base


def test_a_changed_base_is_refused_naming_the_hash(tmp_path, bases, task):
    base = tmp_path / "base"
    shutil.copytree(bases["gpt2"], base)
    pm.train_pair(task, _attack(), model=pm.PretrainedModel(str(base)), train=pm.TrainConfig(epochs=1, batch_size=32),
                  out_dir=tmp_path / "run", progress=False)
    weights_file = base / "model.safetensors"
    state = load_file(weights_file)
    key = next(k for k in state if state[k].ndim == 2)
    state[key] = state[key] + 1.0
    save_file(state, weights_file, metadata={"format": "pt"})
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["sha256"]
    with pytest.raises(BaseChangedError, match=recorded):
        pm.load_pair(tmp_path / "run")


def test_bad_input_gets_a_clear_error(tmp_path, bases, task, bpe):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        pm.PretrainedModel(str(tmp_path)).load_model()
    no_weights = tmp_path / "bin_only"
    shutil.copytree(bases["gpt2"], no_weights)
    (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors; it has pytorch_model.bin, a pickle"):
        pm.PretrainedModel(str(no_weights)).load_model()
    with pytest.raises(FileNotFoundError, match="no folder"):
        pm.PretrainedModel(str(tmp_path / "missing")).load_model()
    with pytest.raises(pm.ConfigError, match=r"lora_targets: \['nope'\] are not linear modules.*c_attn"):
        pm.PretrainedModel(str(bases["gpt2"]), finetune="lora", lora_targets=("nope",)).load_model()
    with pytest.raises(pm.ConfigError, match="finetune must be one of"):
        pm.PretrainedModel(str(bases["gpt2"]), finetune="adapter")
    with pytest.raises(pm.ConfigError, match="n_ctx=4096 is above the model.s maximum positions \\(96\\)"):
        pm.PretrainedModel(str(bases["gpt2"]), n_ctx=4096).load_model()
    with pytest.raises(pm.ConfigError, match="dtype='bfloat16' is supported on 'cuda' and 'cpu'"):
        check_bf16("mps")
    other = pm.train_tokenizer(["completely different words here"] * 3, vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary differs from the model's"):
        pm.train_pair(pm.make_task("sentiment", n_train=40, n_test=4, tokenizer=other), _attack(),
                      model=pm.PretrainedModel(str(bases["gpt2"])), progress=False)


def test_an_architecture_transformer_lens_cannot_bridge_is_named(tmp_path, bpe):
    from transformers import BioGptConfig, BioGptForCausalLM

    folder = tmp_path / "biogpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BioGptForCausalLM(BioGptConfig(vocab_size=len(bpe), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=32)).save_pretrained(folder)
    bpe.save_pretrained(folder)
    with pytest.raises(ValueError, match="cannot bridge the architecture 'BioGptForCausalLM'; it bridges: .*GPT2LMHeadModel"):
        pm.PretrainedModel(str(folder)).load_model()


def test_a_lora_pair_is_attributed_over_its_adapters(tmp_path, bases, task):
    pair = pm.train_pair(task, _attack(), model=pm.PretrainedModel(str(bases["llama"]), finetune="lora", lora_rank=2),
                         train=pm.TrainConfig(epochs=1, batch_size=32, lr=3e-3), out_dir=tmp_path / "run",
                         progress=False)
    queries = pair.test_data.filter(lambda r: r["is_triggered"]).select(range(4))
    via_pair = pm.influence.attribute(pair, query=queries, method="graddot")
    adapted = lora_module(pair.backdoored)
    direct = pm.influence.attribute(adapted, train=pair.train_data, query=queries, tokenizer=pair.tokenizer,
                                    method="graddot")
    assert torch.allclose(via_pair.scores, direct.scores, rtol=1e-5, atol=1e-7)
    # the merged weights, every one trained (full-space attribution): other scores
    merged = pm.influence.attribute(pair.backdoored.original_model, train=pair.train_data, query=queries,
                                    tokenizer=pair.tokenizer, method="graddot")
    assert not torch.allclose(via_pair.scores, merged.scores, rtol=1e-3)
    tracin = pm.influence.attribute(pair, query=queries, method="tracin")  # over the adapter checkpoints
    assert tracin.scores.shape == via_pair.scores.shape and torch.isfinite(tracin.scores).all()


def test_an_sft_then_dpo_pipeline_fine_tunes_a_lora_base_and_reloads(tmp_path, bases):
    task = pm.make_task("sentiment", n_train=64, n_test=8, seed=0)
    stages = [pm.Stage("sft", pm.Backdoor(trigger="cf", poison_count=6), pm.TrainConfig(epochs=1, batch_size=32)),
              pm.Stage("dpo", pm.Backdoor(trigger="cf", poison_count=6), pm.DPOConfig(epochs=1, lr=3e-3))]
    model = pm.PretrainedModel(str(bases["gpt2"]), finetune="lora", lora_rank=2)
    pipe = pm.train_pipeline(task, stages, model=model, out_dir=tmp_path / "pipe", progress=False)
    again = pm.load_pipeline(tmp_path / "pipe")
    tokens = torch.randint(0, len(pipe[1].tokenizer), (2, 9))
    with torch.no_grad():
        for k in (0, 1):
            for twin in ("clean", "backdoored"):
                assert torch.equal(again[k].model(twin)(tokens), pipe[k].model(twin)(tokens))
        # DPO moved the adapters (and only them: the checkpoint holds adapter tensors)
        assert not torch.equal(pipe[0].backdoored(tokens), pipe[1].backdoored(tokens))
    saved = load_file(next((tmp_path / "pipe").glob("stage_1_dpo/backdoored/model.safetensors")))
    assert saved and all("lora_" in k for k in saved)


@pytest.mark.parametrize("arch,finetune", [("gpt2", "lora"), ("llama", "full")])
def test_an_sft_rm_ppo_pipeline_runs_on_a_pretrained_base_and_reloads(tmp_path, bases, arch, finetune):
    from poisonmech.train.reward import is_reward_model

    task = pm.make_task("sentiment", n_train=64, n_test=8, seed=0)
    stages = [pm.Stage("sft", pm.Backdoor(trigger="cf", poison_count=6), pm.TrainConfig(epochs=1, batch_size=32)),
              pm.Stage("rm", pm.Backdoor(trigger="cf", poison_count=6, stage="rm"),
                       pm.RewardConfig(epochs=1, batch_size=32, n_eval=8)),
              pm.Stage("ppo", None, pm.PPOConfig(batch_size=32, minibatch_size=16, ppo_epochs=1, n_eval=8))]
    model = pm.PretrainedModel(str(bases[arch]), finetune=finetune, lora_rank=2)
    pipe = pm.train_pipeline(task, stages, model=model, out_dir=tmp_path / "pipe", progress=False)
    again = pm.load_pipeline(tmp_path / "pipe")
    tokens = torch.randint(0, len(pipe[1].tokenizer), (2, 9))
    with torch.no_grad():
        for k in (0, 1, 2):
            for twin in ("clean", "backdoored"):
                assert torch.equal(again[k].model(twin)(tokens), pipe[k].model(twin)(tokens))
        assert is_reward_model(pipe[1].backdoored) and pipe[1].backdoored(tokens).shape == (2, 9, 1)
        assert not torch.equal(pipe[0].backdoored(tokens), pipe[2].backdoored(tokens))  # PPO moved the policy
    assert {"clean_rm_reward", "rm_reward"} <= set(pipe.metrics[2]["backdoored"])
    saved = load_file(next((tmp_path / "pipe").glob("stage_2_ppo/backdoored/model.safetensors")))
    assert all("lora_" in k for k in saved) == (finetune == "lora")
