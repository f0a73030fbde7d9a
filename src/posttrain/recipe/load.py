"""Loading recipes (a YAML file, `builtin:NAME`, a dict), dotted overrides, and validation errors that name
the key path and the closest valid key."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..objective.presets import PRESETS
from .resolve import resolve
from .schema import Recipe, RecipeError



def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply dotted overrides: ["stages.0.clip.eps_high=0.28", "model=builtin:tiny"] (values parsed as YAML)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for path, value in items:
        keys = path.split(".")
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            nxt = keys[i + 1]
            if isinstance(node, list):
                node = node[_index(node, key, path)]
            else:
                node = node.setdefault(key, [] if nxt.isdigit() else {})
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, path)] = value
        else:
            node[last] = value
    return data


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _index(node: list, key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"override {path!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


BUILTIN_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def builtin_recipe(name: str) -> Path:
    """The recipe shipped in the package as `builtin:NAME` (the repository's `recipes/NAME.yaml`)."""
    path = BUILTIN_RECIPES / f"{name}.yaml"
    if not path.is_file():
        stems = sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
        close = difflib.get_close_matches(name, stems, n=1)
        hint = f" (did you mean builtin:{close[0]}?)" if close else ""
        raise RecipeError(f"no built-in recipe builtin:{name}{hint}; the built-in recipes: {', '.join(stems)}")
    return path


def recipe_data(source: str | Path | dict | Recipe) -> tuple[dict, str]:
    """The raw (unvalidated) mapping of a recipe given as a YAML path, `builtin:NAME` (a shipped recipe), a
    dict or a Recipe, and where it came from (for error messages). The mapping is the caller's to change."""
    if isinstance(source, Recipe):
        return source.model_dump(mode="json", exclude_none=True), "<recipe>"
    if isinstance(source, dict):
        return copy.deepcopy(source), "<dict>"
    origin = str(source)
    path = builtin_recipe(origin.removeprefix("builtin:")) if origin.startswith("builtin:") else Path(source)
    if not path.is_file():
        raise RecipeError(f"recipe file {origin} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping with keys {', '.join(Recipe.model_fields)}")
    return data, origin


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load, override, validate and resolve a recipe from a YAML path, `builtin:NAME` (a shipped recipe),
    a dict, or a Recipe."""
    data, origin = recipe_data(source)
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{origin}: invalid recipe\n" + explain(e, data)) from None
    return resolve(recipe)


def explain(err: ValidationError, data: dict) -> str:
    lines = []
    for item in err.errors():
        loc = [str(x) for x in item["loc"]]
        path = ".".join(loc)
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(loc[:-1], data)
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(loc[:-1] + [close[0]])!r}?" if close else ""
            lines.append(f"  {path}: unknown key{hint} (valid keys here: {', '.join(valid)})")
        else:
            msg = item["msg"]
            if "did you mean" not in msg and "choose one of" not in msg:
                msg = f"{msg} (got {item.get('input')!r})"
            lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _valid_keys(loc: list[str], data: dict) -> list[str]:
    """The field names of the config class at `loc` (e.g. ['stages', '0', 'clip'] -> ClipConfig fields)."""
    model: type[BaseModel] = Recipe
    for key in loc:
        if key.isdigit():
            continue
        field = model.model_fields.get(key)
        if field is None:
            return []
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(cand, "__args__", (cand,))
            found = [c for c in (cand, *inner) if isinstance(c, type) and issubclass(c, BaseModel)]
            if found:
                model = found[0]
                break
        else:
            return []
    return list(model.model_fields)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def method_table() -> list[dict]:
    return [p.table_row() for p in PRESETS.values()]
