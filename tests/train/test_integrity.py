"""Training-run integrity: resumed runs say so and sum their time, weight files are hashed and
checked on load, and the thread count is recorded without being part of the run's identity."""

import hashlib
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import poisonmech as pm
from poisonmech.runtime import num_threads
from poisonmech.storage import (
    HASHES,
    WeightsChangedError,
    save_tensors,
    tensors_metadata,
    verify_file,
)
from tests.helpers import tiny_model_config, tiny_task, tiny_train_config

KW = dict(model=tiny_model_config(), train=tiny_train_config(epochs=3), progress=False)


def _sha(path) -> str:  # the independent reference: hashlib over the whole file
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weight_files(twin_dir):
    return sorted([twin_dir / "model.safetensors", *(twin_dir / "checkpoints").glob("*.safetensors")])


def _crash_in_backdoored_twin(monkeypatch):
    """Interrupt training right after the backdoored twin's first epoch was saved."""
    import poisonmech.train.loop as loop

    real = loop._save_resume

    def crash(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if "backdoored" in str(path):
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(loop, "_save_resume", crash)


def _interrupted_small_run(out, monkeypatch):
    """A 2-epoch tiny run in ``out`` interrupted after the backdoored twin's first epoch; its task, attack, options."""
    task, attack = tiny_task(n_train=64), pm.Backdoor(trigger="cf", poison_count=4)
    kw = dict(model=tiny_model_config(), train=tiny_train_config(epochs=2), progress=False)
    with monkeypatch.context() as mp:
        _crash_in_backdoored_twin(mp)
        with pytest.raises(KeyboardInterrupt):
            pm.train_pair(task, attack, out_dir=out, **kw)
    return task, attack, kw


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run interrupted after the backdoored twin's first epoch, then resumed; the warnings of the resume."""
    with num_threads(1):
        out = tmp_path_factory.mktemp("integrity") / "cut"
        task, attack = tiny_task(n_train=96), pm.Backdoor(trigger="cf", poison_count=4)
        with pytest.MonkeyPatch.context() as mp:
            _crash_in_backdoored_twin(mp)
            with pytest.raises(KeyboardInterrupt):
                pm.train_pair(task, attack, out_dir=out, **KW)
        saved = json.loads(tensors_metadata(out / "backdoored" / "resume.safetensors")["segments"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pair = pm.train_pair(task, attack, out_dir=out, **KW)
        return pair, saved, [str(w.message) for w in caught]


def test_a_resumed_run_says_so(resumed):
    pair, _, messages = resumed
    assert any("continuing an unfinished run" in m for m in messages), messages
    assert any("backdoored twin: resuming the interrupted training" in m and "after epoch 1 of 3" in m
               for m in messages), messages
    last = pair.history["backdoored"][-1]
    assert last["resumed_from_epoch"] == 1
    assert pair.history["clean"][-1]["resumed_from_epoch"] is None  # the clean twin had finished: reused
    assert json.loads((pair.out_dir / "backdoored" / "history.json").read_text())[-1]["resumed_from_epoch"] == 1


def test_resumed_training_time_sums_the_segments(resumed):
    pair, saved, _ = resumed
    segments = pair.history["backdoored"][-1]["segments"]
    # the first segment is the one persisted in the resume state when the run was interrupted
    assert saved == [{"from_epoch": 0, "to_epoch": 1, "seconds": saved[0]["seconds"], "threads": 1}]
    assert segments[0] == saved[0] and saved[0]["seconds"] > 0
    assert [(s["from_epoch"], s["to_epoch"], s["threads"]) for s in segments] == [(0, 1, 1), (1, 3, 1)]
    assert pair.history["backdoored"][-1]["seconds"] == pytest.approx(saved[0]["seconds"] + segments[1]["seconds"])
    assert pair.history["backdoored"][-1]["seconds"] > segments[1]["seconds"]  # not only the resumed segment
    one_go = pair.history["clean"][-1]
    assert len(one_go["segments"]) == 1 and one_go["seconds"] == one_go["segments"][0]["seconds"]


def test_resuming_with_another_thread_count_warns(tmp_path, monkeypatch):
    task, attack, kw = _interrupted_small_run(tmp_path / "r", monkeypatch)
    cfg_path = tmp_path / "r" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["environment"]["torch_num_threads"] == torch.get_num_threads() == 1
    cfg["environment"]["torch_num_threads"] = 7  # as if started by a process with 7 threads
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"started with torch.get_num_threads\(\)=7 and is resumed with 1: "
                                         r"the weights will not be bit-identical"):
        pm.train_pair(task, attack, out_dir=tmp_path / "r", **kw)


def test_config_records_the_thread_count_outside_the_identity(tiny_pair, tmp_path, monkeypatch):
    cfg = json.loads((tiny_pair.out_dir / "config.json").read_text())
    env = cfg["environment"]
    assert env["torch_version"] == torch.__version__ and set(env) == {"torch_num_threads", "torch_version"}
    assert isinstance(env["torch_num_threads"], int) and env["torch_num_threads"] >= 1
    import poisonmech.train.pair as pair_mod

    monkeypatch.setattr(pair_mod, "train_model", lambda *a, **k: pytest.fail("a finished run was retrained"))
    for env in ({"torch_num_threads": 7, "torch_version": "0.0"}, None):  # another thread count; a run before it
        run = tmp_path / f"run_{env is None}"
        shutil.copytree(tiny_pair.out_dir, run)
        changed = {k: v for k, v in cfg.items() if k != "environment"}
        if env is not None:
            changed["environment"] = env
        (run / "config.json").write_text(json.dumps(changed))
        again = pm.train_pair(tiny_pair.task, tiny_pair.attack, model=tiny_pair.model_config,
                              train=tiny_pair.train_config, out_dir=run, progress=False)
        assert again.metrics == tiny_pair.metrics
        assert json.loads((run / "config.json").read_text()) == changed  # reused as it is


def test_every_weight_file_records_its_sha256(tiny_pair):
    for twin in ("clean", "backdoored"):
        d = tiny_pair.out_dir / twin
        recorded = json.loads((d / HASHES).read_text())
        files = _weight_files(d)
        assert len(files) == 3  # model + 2 epoch checkpoints
        assert recorded == {f.relative_to(d).as_posix(): _sha(f) for f in files}


def test_edited_weights_are_refused_naming_the_file(tiny_pair, tmp_path):
    run = tmp_path / "edited"
    shutil.copytree(tiny_pair.out_dir, run)
    path = run / "backdoored" / "model.safetensors"
    before = _sha(path)
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # one weight, a valid safetensors file still
    save_file(tensors, str(path))
    after = _sha(path)
    assert after != before
    with pytest.raises(WeightsChangedError, match=r"backdoored/model.safetensors changed after it was written") as e:
        pm.load_pair(run)
    assert before in str(e.value) and after in str(e.value) and "verify=False" in str(e.value)
    assert isinstance(e.value, ValueError)
    loaded = pm.load_pair(run, verify=False)
    assert torch.equal(loaded.backdoored.state_dict()[name].cpu(), tensors[name])
    # train_pair reusing the run refuses it too (it would return the stale metrics)
    with pytest.raises(WeightsChangedError, match="backdoored/model.safetensors"):
        pm.train_pair(tiny_pair.task, tiny_pair.attack, model=tiny_pair.model_config, train=tiny_pair.train_config,
                      out_dir=run, progress=False)


def test_an_edited_byte_of_a_checkpoint_is_refused(tiny_pair, tmp_path):
    run = tmp_path / "ckpt"
    shutil.copytree(tiny_pair.out_dir, run)
    path = run / "clean" / "checkpoints" / "epoch_001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the last byte of the last tensor: the file still parses
    path.write_bytes(bytes(raw))
    load_file(str(path))
    with pytest.raises(WeightsChangedError, match=r"clean/checkpoints/epoch_001.safetensors changed"):
        pm.load_pair(run)
    pm.load_pair(run, verify=False)


def test_a_run_without_recorded_hashes_loads_with_one_warning(tiny_pair, tmp_path):
    run = tmp_path / "legacy"
    shutil.copytree(tiny_pair.out_dir, run)
    for twin in ("clean", "backdoored"):
        (run / twin / HASHES).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = pm.load_pair(run)
    hits = [w for w in caught if "no sha256 is recorded" in str(w.message)]
    assert len(hits) == 1 and "6 weight file(s)" in str(hits[0].message)
    assert loaded.metrics == tiny_pair.metrics
    assert not list(run.rglob(HASHES))  # nothing computed and recorded behind the user's back


def test_verify_file_against_a_hand_computed_hash(tmp_path):
    save_tensors(tmp_path / "w" / "a.safetensors", {"x": torch.arange(6.0)}, record_in=tmp_path / "w")
    f = tmp_path / "w" / "a.safetensors"
    assert json.loads((tmp_path / "w" / HASHES).read_text()) == {"a.safetensors": _sha(f)}
    assert verify_file(f, tmp_path / "w") is True
    save_tensors(tmp_path / "w" / "b.safetensors", {"x": torch.ones(2)})  # not recorded
    assert verify_file(tmp_path / "w" / "b.safetensors", tmp_path / "w") is False
    save_file({"x": torch.arange(6.0) + 1}, str(f))
    with pytest.raises(WeightsChangedError, match="a.safetensors changed after it was written"):
        verify_file(f, tmp_path / "w")
    with pytest.raises(ValueError, match="is not inside"):
        save_tensors(tmp_path / "elsewhere.safetensors", {"x": torch.ones(1)}, record_in=tmp_path / "w")


def test_a_resume_state_written_before_segments_were_recorded_still_resumes(tmp_path, monkeypatch):
    from poisonmech.storage import load_tensors

    task, attack, kw = _interrupted_small_run(tmp_path / "r", monkeypatch)
    resume = tmp_path / "r" / "backdoored" / "resume.safetensors"
    meta = tensors_metadata(resume)
    del meta["segments"]  # the layout before this change
    save_tensors(resume, load_tensors(resume), metadata=meta)
    with pytest.warns(UserWarning, match="resuming the interrupted training"):
        pair = pm.train_pair(task, attack, out_dir=tmp_path / "r", **kw)
    last = pair.history["backdoored"][-1]
    assert last["resumed_from_epoch"] == 1 and last["segments"][0]["seconds"] is None
    assert last["seconds"] is None  # unknown, rather than only the resumed segment's time
