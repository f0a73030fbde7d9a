"""Strict JSON for every file a run or a study writes (no bare NaN or Infinity, which many readers reject),
and atomic writes: a file holds its old content or its new, never a mix, whenever the process dies."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def strict(x):
    """NaN and infinities become None, tuples lists, tensors and arrays their lists, other objects their str."""
    if isinstance(x, dict):
        return {str(k): strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (int, str, bool)):
        return x
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and scalars
        return strict(x.tolist())
    return str(x)


def dumps(obj, indent: int | None = 2) -> str:
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its directory is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file, fsync it, rename it over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)
