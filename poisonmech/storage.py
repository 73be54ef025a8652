"""Atomic persistence in open formats only: JSON, safetensors and parquet.

Every write goes to a temporary file in the target's folder and is moved into place with
``os.replace``, so an interrupted run never leaves a half-written file under the real name.
Every read names the file that is missing or corrupt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic(path, w)


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt JSON file: {path} ({exc})") from exc


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
        raise ValueError(f"corrupt safetensors file: {path} ({exc})") from exc


def tensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_dataset(path: Path, ds: Dataset) -> None:
    _atomic(path, lambda tmp: pq.write_table(ds.data.table, tmp))


def load_dataset_file(path: Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return Dataset(pq.read_table(str(path)))
    except Exception as exc:
        raise ValueError(f"corrupt parquet file: {path} ({exc})") from exc


def copy_dir(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of ``src``, made beside it and renamed into place."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def publish_dir(src: Path, dst: Path) -> None:
    """Copy a finished run folder into a shared cache at ``dst`` atomically (copy, then rename);
    the first writer wins, later ones leave the published copy alone."""
    if dst.exists():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    try:
        tmp.rename(dst)
    except OSError:  # another run published it first
        shutil.rmtree(tmp, ignore_errors=True)
