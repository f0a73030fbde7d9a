"""The reference of every recipe key (`posttrain recipe-keys`, docs/recipe-keys.md), generated from the config
classes in recipe/schema.py: their fields, types, defaults, and each field's trailing comment as its meaning."""
from __future__ import annotations

import inspect
import re
import typing

from pydantic import BaseModel

from .recipe import Recipe


def key_reference() -> str:
    """Every recipe key, its type, default and meaning, as a Markdown table generated from the config classes
    (the meaning is each field's comment in recipe/schema.py): `posttrain recipe-keys`, and docs/recipe-keys.md."""
    rows: list[tuple[str, str, str, str]] = []

    def comments(cls) -> dict[str, str]:
        out = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): [^#]*?#\s*(.*)$", line)
            if m and not m.group(2).startswith("type:"):
                out[m.group(1)] = m.group(2).strip()
        return out

    def walk(cls, prefix: str) -> None:
        notes = comments(cls)
        for name, field in cls.model_fields.items():
            path = f"{prefix}{name}"
            inner = _config_class(field.annotation)
            if inner is not None:
                rows.append((path, inner.__name__, "", (inner.__doc__ or "").strip().split("\n")[0]))
                walk(inner, f"{path}.{'N.' if _is_list(field.annotation) else ''}")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            kind = re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(field.annotation)).replace("NoneType", "None")
            rows.append((path, kind, default, notes.get(name, "")))

    walk(Recipe, "")
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t.replace('|', 'or')} | {d.replace('|', 'or')} | {m.replace('|', 'or')} |"
              for k, t, d, m in rows]
    return "\n".join(lines) + "\n"


def _config_class(annotation):
    """The config class inside an annotation (StageConfig, Optional[LoraConfig], list[StageConfig]), or None."""
    for cand in (annotation, *typing.get_args(annotation)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) is list
