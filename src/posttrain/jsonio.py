"""Strict JSON for every file a run or a study writes: no bare NaN or Infinity, which many readers reject."""
from __future__ import annotations

import json
import math


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
