"""What every result shares: ``to_frame`` / ``plot`` / ``save`` / ``load``, and a file format
whose name and version are checked on load.

A result file is either a safetensors file (tensors, with the JSON metadata under the
``"poisonmech"`` key) or a JSON file (no tensors). Its ``"format"`` is ``"poisonmech.<kind>/<version>"``:
loading a file of another kind, a file that is not poisonmech's, or one written by a newer
version is a clear error naming both, never a silently wrong object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from poisonmech.storage import load_tensors, read_json, save_tensors, tensors_metadata, write_json

META_KEY = "poisonmech"


class ResultFormatError(ValueError):
    """A result file of another kind, of a newer version, or not a poisonmech file."""


def format_tag(kind: str, version: int) -> str:
    return f"poisonmech.{kind}/{int(version)}"


def _parse(tag: Any) -> tuple[str | None, int | None]:
    if not isinstance(tag, str) or not tag.startswith("poisonmech.") or "/" not in tag:
        return None, None
    name, _, ver = tag[len("poisonmech."):].rpartition("/")
    try:
        return name, int(ver)
    except ValueError:
        return name, None


def check_format(meta: Any, kind: str, version: int, path: Path | str, what: str) -> dict[str, Any]:
    """``meta`` if its format is ``kind`` at a version <= ``version``; else :class:`ResultFormatError`."""
    tag = meta.get("format") if isinstance(meta, dict) else None
    name, ver = _parse(tag)
    if name is None or ver is None:
        raise ResultFormatError(f"{path} is not a poisonmech result file (format {tag!r}); expected a {what} "
                                f"({format_tag(kind, version)!r})")
    if name != kind:
        raise ResultFormatError(f"{path} holds a {name!r} result ({tag!r}), not a {what} ({format_tag(kind, version)!r})")
    if ver > version:
        raise ResultFormatError(f"{path} was written by a newer poisonmech ({tag!r}); this version reads {what} files "
                                f"up to version {version}: upgrade poisonmech to load it")
    return meta


def write_result(path: str | Path, kind: str, version: int, meta: dict[str, Any],
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``meta`` (JSON types) and ``tensors`` atomically; the format tag is added."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": format_tag(kind, version), **meta}
    if tensors:
        save_tensors(path, tensors, metadata={META_KEY: json.dumps(meta, allow_nan=True)})
    else:
        write_json(path, meta)
    return path


def read_result(path: str | Path, kind: str, version: int, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a file written by :func:`write_result`, its format checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":
        try:
            meta = read_json(path)
        except ValueError as e:
            raise ResultFormatError(f"{path} is not a poisonmech result file ({e})") from None
        return check_format(meta, kind, version, path, what), {}
    try:
        raw = tensors_metadata(path).get(META_KEY)
    except Exception as e:  # safetensors' own error types for a file that is not safetensors
        raise ResultFormatError(f"{path} is not a poisonmech result file ({type(e).__name__}: {e})") from None
    meta = json.loads(raw) if raw else {}
    check_format(meta, kind, version, path, what)
    return meta, load_tensors(path)


class Result:
    """Mixin of every result class: ``kind`` / ``version`` name its file format.

    Subclasses implement ``to_frame()`` (tidy pandas), ``plot()`` (a plotly Figure),
    ``save(path)`` and ``load(path)`` (the last two with :func:`write_result` /
    :func:`read_result`, so the format is checked).
    """

    kind: ClassVar[str]
    version: ClassVar[int] = 1

    @classmethod
    def _write(cls, path, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Path:
        return write_result(path, cls.kind, cls.version, meta, tensors)

    @classmethod
    def _read(cls, path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return read_result(path, cls.kind, cls.version, cls.__name__)


__all__ = ["META_KEY", "Result", "ResultFormatError", "check_format", "format_tag", "read_result", "write_result"]
