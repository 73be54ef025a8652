"""Atomic persistence in open formats only: JSON, safetensors and parquet.

Every write goes to a temporary file in the target's folder and is moved into place with
``os.replace``, so an interrupted run never leaves a half-written file under the real name.
Every read names the file that is missing or corrupt.

Weight files can record their sha256 in a manifest (``sha256.json``) of the folder they belong
to (a twin's or a stage's), and be checked against it when loaded: a file edited after it was
written is refused by name instead of loading silently beside stale metrics.
"""

from __future__ import annotations

import hashlib
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


#: the manifest of recorded weight-file hashes, one per folder (keys: paths relative to it)
HASHES = "sha256.json"


class WeightsChangedError(ValueError):
    """A weight file's sha256 differs from the one recorded when it was written."""


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks (about 1 ms per MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_key(path: Path, record_in: Path) -> str:
    try:
        return Path(path).relative_to(record_in).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside {record_in}, whose {HASHES} would record its hash") from None


def recorded_hashes(record_in: Path) -> dict[str, str] | None:
    """The hashes recorded in ``record_in/sha256.json``; ``None`` when the folder has no manifest."""
    path = Path(record_in) / HASHES
    return read_json(path) if path.is_file() else None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                 record_in: Path | None = None) -> None:
    """Write ``tensors`` atomically; with ``record_in``, also record the file's sha256 in
    ``record_in/sha256.json`` (the file must lie under ``record_in``).

    The hash is computed from the finished temporary file and recorded before that file is moved
    into place, so whenever the file exists under its real name its hash is recorded (a crash
    in between leaves a recorded hash and no new file, which the next write records again).
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    key = _hash_key(path, record_in) if record_in is not None else None

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=metadata)
        if key is not None:
            write_json(Path(record_in) / HASHES, {**(recorded_hashes(record_in) or {}), key: sha256_file(tmp)})

    _atomic(path, write)


def verify_file(path: Path, record_in: Path) -> bool:
    """Check ``path`` against the sha256 recorded for it in ``record_in/sha256.json``.

    Returns ``True`` when it matches and ``False`` when no hash was recorded (a run written
    before hashes were recorded); raises :class:`WeightsChangedError` naming the file and both
    hashes when it differs, and ``FileNotFoundError`` when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    expected = (recorded_hashes(record_in) or {}).get(_hash_key(path, record_in))
    if expected is None:
        return False
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsChangedError(
            f"{path} changed after it was written: its sha256 is {actual}, but "
            f"{Path(record_in) / HASHES} recorded {expected}; the run's metrics describe the recorded weights. "
            "Restore the file or retrain (remove the run directory), or pass verify=False to load it anyway")
    return True


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
