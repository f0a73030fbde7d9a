"""Checkpoints: everything a stage needs to continue exactly where it stopped, written atomically.

    OUT/checkpoints/<i>-<stage>-step<S>/     i: the stage's index in the recipe, S: its optimizer steps so far
      model.safetensors      the policy's weights
      optimizer.safetensors  AdamW's moments and step counts (param_groups in state.json)
      rng.safetensors        torch's CPU (and CUDA) RNG and the sampler's generator
      critic*.safetensors    PPO's value model and its optimizer (only with one)
      state.json             step and counters, the sources' state (data cursors, ReLIFT's buffer, RFT's
                             pool), the scheduler, Python's and NumPy's RNG, reward statistics, the stage's
                             resolved configuration
      COMMIT                 {"files": {name: sha256}, ...}: written last; a directory without it is no checkpoint

Save: the files go into `.tmp-<name>/`, each fsynced; the directory is fsynced, renamed to `<name>`, and
its parent fsynced; only then is COMMIT written (as COMMIT.tmp, fsynced, renamed, directory fsynced). A
kill at any point leaves no directory, a `.tmp-` one, or one without COMMIT: resume skips (and reports)
all of them, so a kill costs at most the checkpoint being written. Nothing here is loaded with pickle:
safetensors and JSON only. Mixer state (CHORD's mu, the prefix share) is a function of the step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .. import faults
from ..jsonio import dumps, fsync
from ..models import check_finite_weights
from .world import is_sharded, load_full_state

log = logging.getLogger("posttrain")

COMMIT = "COMMIT"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
REFERENCE = "reference.safetensors"  # only when the stage renews its reference (iterative DPO)
CRITIC, CRITIC_OPTIMIZER = "critic.safetensors", "critic_optimizer.safetensors"  # only with a value model (PPO)
_NAME = re.compile(r"^(\d+)-(.+)-step(\d+)$")


@dataclass(frozen=True)
class Found:
    """A committed checkpoint on disk."""

    path: Path
    stage_index: int
    stage: str
    step: int


def name_of(stage_index: int, stage: str, step: int) -> str:
    return f"{stage_index}-{stage}-step{step:07d}"


# ---- save ------------------------------------------------------------------------------------------


def save(root: Path, stage_index: int, stage: str, state, extra: dict, *, weights: dict | None = None,
         optimizer_state: dict | None = None, reference: dict | None = None) -> Path:
    """Write `state` (a TrainState) and `extra` (JSON-able) as a committed checkpoint under `root`. `weights`,
    `optimizer_state` and `reference`: the policy's, its optimizer's and a renewed reference's whole state dicts
    when the modules hold shards only (training/world.py gathers them); the files are the same either way."""
    check_finite_weights(weights if weights is not None else state.model, root)  # never a diverged model
    root.mkdir(parents=True, exist_ok=True)
    name = name_of(stage_index, stage, state.step)
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, opt_rest = _flatten_optimizer(optimizer_state or state.optimizer.state_dict())
    rng = {"torch": torch.get_rng_state(), "sampler": state.generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    body = {"stage": stage, "stage_index": stage_index, "step": state.step, "samples": state.samples,
            "tokens": state.tokens, "nonfinite": state.nonfinite, "nonfinite_streak": state.nonfinite_streak,
            "wall_s": state.wall_s, "seed": state.seed, "experience": state.experience.state_dict(),
            "scheduler": _scheduler_state(state.scheduler), "optimizer": opt_rest, "rng": _host_rng(), **extra}
    from . import lora

    if weights is not None:
        save_weights = lambda p: save_model(_Holder(weights), str(p))  # noqa: E731
    elif lora.is_lora(state.model):  # a LoRA stage saves its adapters only
        save_weights = lambda p: save_file(lora.trainable(state.model), str(p))  # noqa: E731
    else:
        save_weights = lambda p: save_model(state.model, str(p))  # noqa: E731
    writers = {"model.safetensors": save_weights,
               "optimizer.safetensors": lambda p: save_file(opt_tensors, str(p)),
               "rng.safetensors": lambda p: save_file(rng, str(p)),
               "state.json": lambda p: p.write_text(dumps(body), encoding="utf-8")}
    ref = getattr(state.experience, "renewed_reference", lambda: None)()
    if reference is not None:  # (a sharded reference's whole weights)
        writers[REFERENCE] = lambda p: save_model(_Holder(reference), str(p))
    elif ref is not None:  # the reference is not the stage's start policy any more: it must be saved too
        writers[REFERENCE] = lambda p: save_model(ref, str(p))
    critic = getattr(state.experience, "critic", None)
    if critic is not None:  # PPO's value model and its optimizer
        check_finite_weights(critic.model, root)
        c_tensors, body["critic_optimizer"] = _flatten_optimizer(critic.optimizer.state_dict())
        writers[CRITIC] = lambda p: save_model(critic.model, str(p))
        writers[CRITIC_OPTIMIZER] = lambda p: save_file(c_tensors, str(p))
    for fname in writers:
        faults.hit("save")
        writers[fname](tmp / fname)
        fsync(tmp / fname)
    fsync(tmp)
    faults.hit("save")
    if final.exists():  # an uncommitted leftover of the same name (a killed save): it is replaced
        shutil.rmtree(final)
    tmp.rename(final)
    fsync(root)
    faults.hit("save")
    marker = {"files": {f: _sha256(final / f) for f in writers}, "stage": stage, "stage_index": stage_index,
              "step": state.step}
    (final / f"{COMMIT}.tmp").write_text(json.dumps(marker, indent=1), encoding="utf-8")
    fsync(final / f"{COMMIT}.tmp")
    os.replace(final / f"{COMMIT}.tmp", final / COMMIT)
    fsync(final)
    return final


def prune(root: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` committed checkpoints (and `protect`); leftovers of interrupted saves go too. A
    commit marker is removed first, so a kill during pruning never leaves a half-deleted directory that looks
    whole. Called only after a save has committed, so nothing else is being written."""
    for p in root.iterdir():  # interrupted saves, already reported by `latest` when the run resumed
        if p != protect and (p.name.startswith(".tmp-") or _NAME.match(p.name) and not (p / COMMIT).is_file()):
            shutil.rmtree(p, ignore_errors=True)
    found = committed(root)
    for f in found[:-keep] if keep else found:
        if protect is not None and f.path == protect:
            continue
        (f.path / COMMIT).unlink(missing_ok=True)
        fsync(f.path)
        shutil.rmtree(f.path, ignore_errors=True)


# ---- find and load ---------------------------------------------------------------------------------


def committed(root: Path) -> list[Found]:
    """Every directory under `root` with a commit marker, oldest first (by stage, then step)."""
    out = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _NAME.match(p.name)
        if m and (p / COMMIT).is_file():
            out.append(Found(p, int(m.group(1)), m.group(2), int(m.group(3))))
    return sorted(out, key=lambda f: (f.stage_index, f.step))


def latest(root: Path, stage_index: int, stage: str) -> tuple[Found | None, list[str]]:
    """The newest committed, intact checkpoint of stage `stage_index`, and what was skipped and why."""
    skipped = []
    for p in sorted(root.iterdir()) if root.is_dir() else ():
        if p.name.startswith(".tmp-"):
            skipped.append(f"{p.name}: a save that was interrupted")
        elif _NAME.match(p.name) and not (p / COMMIT).is_file():
            skipped.append(f"{p.name}: no commit marker (a save that was interrupted)")
    for f in reversed(committed(root)):
        if f.stage_index != stage_index or f.stage != stage:
            continue
        problem = verify(f.path)
        if problem is None:
            return f, skipped
        skipped.append(f"{f.path.name}: {problem}")
    return None, skipped


def verify(path: Path) -> str | None:
    """None when every file matches the commit marker's hash; else what is wrong."""
    try:
        marker = json.loads((path / COMMIT).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable commit marker ({e})"
    for fname, digest in marker.get("files", {}).items():
        if not (path / fname).is_file():
            return f"{fname} is missing"
        if _sha256(path / fname) != digest:
            return f"{fname} does not match its hash in the commit marker (damaged on disk)"
    return None


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load(path: Path, state) -> dict:
    """Restore a TrainState from the checkpoint at `path`; returns state.json (with the caller's `extra`)."""
    from . import lora

    body = read_state(path)
    adapters, file = lora.is_lora(state.model), str(path / "model.safetensors")
    weights = load_file(file) if adapters or is_sharded(state.model) else None
    if adapters:  # the adapters only: every trainable parameter, nothing else
        want = lora.trainable_names(state.model)
        _check_fit(path, want - set(weights), set(weights) - want)
    if is_sharded(state.model):  # whole tensors in, each rank keeps its shard
        load_full_state(state.model, state.optimizer, weights,
                        _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), body["optimizer"]))
    elif adapters:
        state.model.load_state_dict(weights, strict=False)
    else:
        _check_fit(path, *load_model(state.model, file, strict=False))
    if not is_sharded(state.model):
        state.optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                             body["optimizer"]))
    state.scheduler.load_state_dict(body["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    state.generator.set_state(rng["sampler"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    _set_host_rng(body["rng"])
    state.experience.load_state_dict(body["experience"])
    ref = getattr(state.experience, "renewed_reference", lambda: None)()
    if ref is not None and (path / REFERENCE).is_file():
        if is_sharded(ref):
            load_full_state(ref, None, load_file(str(path / REFERENCE)), None)
        else:
            load_model(ref, str(path / REFERENCE))
    critic = getattr(state.experience, "critic", None)
    if critic is not None:
        load_model(critic.model, str(path / CRITIC))
        critic.optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / CRITIC_OPTIMIZER)),
                                                              body["critic_optimizer"]))
    for key in ("step", "samples", "tokens", "nonfinite", "nonfinite_streak", "wall_s"):
        setattr(state, key, body[key])
    return body


# ---- pieces ----------------------------------------------------------------------------------------


def _check_fit(path: Path, missing, unexpected) -> None:
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}")


class _Holder(torch.nn.Module):
    """A state dict dressed as a module, for safetensors' `save_model` (which writes tied weights once)."""

    def __init__(self, weights: dict):
        super().__init__()
        self._weights = weights

    def state_dict(self, *args, **kwargs):
        return self._weights


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors by "state/<param>/<key>", the JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state/{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, pid, k = key.split("/", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in rest["scalars"].items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}  # betas
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _scheduler_state(scheduler) -> dict:
    return scheduler.state_dict()  # LambdaLR's lambdas are functions of the recipe: saved as None, rebuilt from it


def _host_rng() -> dict:
    out = {"python": _jsonable(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover - numpy comes with transformers
        pass
    return out


def _set_host_rng(d: dict) -> None:
    random.setstate(_tupled(d["python"]))
    if "numpy" in d:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = d["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
