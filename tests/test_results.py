"""Result files: the format name and version are checked on load."""

from __future__ import annotations

import json

import pytest
import torch

from poisonmech.results import ResultFormatError, read_result, write_result


def test_round_trip_with_and_without_tensors(tmp_path):
    write_result(tmp_path / "a.safetensors", "toy", 1, {"x": 1}, {"t": torch.arange(3)})
    meta, tensors = read_result(tmp_path / "a.safetensors", "toy", 1, "Toy")
    assert meta["x"] == 1 and meta["format"] == "poisonmech.toy/1" and torch.equal(tensors["t"], torch.arange(3))
    write_result(tmp_path / "b.json", "toy", 2, {"y": [1, 2]})
    meta, tensors = read_result(tmp_path / "b.json", "toy", 2, "Toy")
    assert meta["y"] == [1, 2] and tensors == {}


def test_other_kind_newer_version_and_foreign_files_are_refused(tmp_path):
    write_result(tmp_path / "a.json", "other", 1, {})
    with pytest.raises(ResultFormatError, match=r"holds a 'other' result .* not a Toy"):
        read_result(tmp_path / "a.json", "toy", 1, "Toy")
    write_result(tmp_path / "b.json", "toy", 3, {})
    with pytest.raises(ResultFormatError, match="written by a newer poisonmech .* up to version 2"):
        read_result(tmp_path / "b.json", "toy", 2, "Toy")
    (tmp_path / "c.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ResultFormatError, match="is not a poisonmech result file"):
        read_result(tmp_path / "c.json", "toy", 1, "Toy")
    (tmp_path / "d.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ResultFormatError, match="is not a poisonmech result file"):
        read_result(tmp_path / "d.bin", "toy", 1, "Toy")
    with pytest.raises(FileNotFoundError, match="no Toy file"):
        read_result(tmp_path / "missing.json", "toy", 1, "Toy")
