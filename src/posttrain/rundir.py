"""The run directory's bookkeeping: which stages finished, what may change on a rerun, one run at a time,
stopping on a signal, `--fresh`, bad rows, and when a stage saves a checkpoint (`Checkpointer`).

Rerunning `posttrain train` with the same `--out` continues the run: the leading stages that finished are
skipped (their policies are in OUT/stages/NAME/model/), and the first unfinished one resumes from its
newest committed checkpoint (training/checkpoint.py). Everything that ran already must be run with the same
configuration: a change is refused with a field-by-field diff unless `allow_change` names the field
(shell-style patterns: `stages.0.steps`, `stages.*.optim.lr`). A stage that had not saved anything yet may
be changed freely, and `checkpoint.*` and `stages.*.log_every` always may.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import Interrupted, RunBusy
from .jsonio import dumps, write_atomic
from .models import save_pretrained
from .recipe import Recipe, RecipeError
from .training import checkpoint

log = logging.getLogger("posttrain")

ALWAYS_ALLOWED = ("checkpoint.*", "stages.*.log_every")


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c.0": 2}."""
    if isinstance(d, dict):
        items = d.items()
    elif isinstance(d, list) and d and all(isinstance(v, (dict, list)) for v in d):
        items = enumerate(d)
    else:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every field whose value differs between two nested configurations, as (key, old, new)."""
    a, b = flat(old, prefix), flat(new, prefix)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k, "<absent>")
            != b.get(k, "<absent>")]


def refuse_changes(diffs: list[tuple[str, Any, Any]], allow: tuple[str, ...], what: str) -> None:
    """Raise RecipeError listing every change not matched by `allow` (or ALWAYS_ALLOWED)."""
    patterns = tuple(allow) + ALWAYS_ALLOWED
    bad = [d for d in diffs if not any(fnmatch.fnmatchcase(d[0], p) for p in patterns)]
    if not bad:
        for key, a, b in diffs:
            log.info("changed on resume (allowed): %s: %r -> %r", key, a, b)
        return
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in bad)
    keys = " ".join(f"--allow-change {k}" for k, _, _ in bad[:3])
    raise RecipeError(f"{what} ran with another configuration; the changes:\n{lines}\nResume with the same recipe, "
                      f"or allow these changes ({keys}), or start over with --fresh")


class StageProgress:
    """Which stages of a run directory finished: OUT/progress.json plus each finished stage's policy in
    OUT/stages/NAME/model/. The leading stages that finished with the same configuration are skipped and the
    run continues from the last one's policy; a change to them (or to the model, seed, dtype, eval or
    --max-steps) is refused with its diff unless allowed."""

    def __init__(self, out: Path, cfg: Recipe, max_steps: int | None, allow: tuple[str, ...] = (), *,
                 write: bool = True):
        self.out, self.write = out, write  # write: False on the ranks other than 0, which only read
        self.path = out / "progress.json"
        run = {"model": cfg.model, "seed": cfg.seed, "dtype": cfg.dtype, "max_steps": max_steps,
               "eval": cfg.eval.model_dump(mode="json") if cfg.eval else None}
        self.configs = {s.name: stage_config(s) for s in cfg.stages}
        self.record: dict = {"run": run, "stages": {}}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            refuse_changes(changes(old.get("run", {}), run), allow, f"{out}")
            self.record = {**old, "run": run}
        self.done: dict = {}
        for i, (name, config) in enumerate(self.configs.items()):  # the leading finished stages, in recipe order
            rec = self.record["stages"].get(name)
            if rec is None or not (out / "stages" / name / "model" / "config.json").exists():
                break
            diffs = changes(yaml.safe_load(rec["config"]), yaml.safe_load(config), f"stages.{i}")
            refuse_changes(diffs, allow, f"{out}: stage {name!r}, which finished,")
            if diffs:
                log.warning("stage %s finished before these changes and is not run again (--fresh runs it anew)", name)
            rec["config"] = config
            self.done[name] = rec["result"]

    @property
    def finished(self) -> bool:
        """Every stage done and the final model and summary written: a rerun has nothing to do."""
        return (len(self.done) == len(self.configs) and bool(self.record.get("finished"))
                and (self.out / "final" / "config.json").is_file() and (self.out / "summary.json").is_file())

    def last_model(self) -> Path | None:
        """The policy the next stage starts from: the last finished stage's model (a reward model is not one)."""
        policies = [name for name, r in self.done.items() if r.get("method") != "reward_model"]
        return self.out / "stages" / policies[-1] / "model" if policies else None

    def save_eval_before(self, result: dict) -> None:
        self.record["eval_before"] = result
        self._write()

    def finish_stage(self, name: str, result: dict, model, tok, stop_ids) -> None:
        if self.write:
            save_pretrained(model, tok, self.out / "stages" / name / "model", stop_ids=stop_ids)
        self.record["stages"][name] = {"config": self.configs[name], "result": result}
        self.done[name] = result
        self._write()

    def finish_run(self) -> None:
        self.record["finished"] = True
        self._write()

    def _write(self) -> None:
        if self.write:
            write_atomic(self.path, dumps(self.record))


def stage_config(stage) -> str:
    """A stage's resolved configuration as the YAML text progress.json and checkpoints store."""
    return yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=True)


def move_aside(out: Path) -> Path | None:
    """`--fresh`: move everything in OUT (but the lock) to OUT.prev-TIMESTAMP; returns where, None if empty."""
    entries = [p for p in out.iterdir() if p.name != ".lock"] if out.is_dir() else []
    if not entries:
        return None
    dest = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 0
    while dest.exists():
        n += 1
        dest = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    dest.mkdir(parents=True)
    for p in entries:
        shutil.move(str(p), dest / p.name)
    log.info("--fresh: moved the previous run's %s to %s", ", ".join(sorted(p.name for p in entries)), dest)
    return dest


class RunLock:
    """One run at a time per run directory: an exclusive `flock` on OUT/.lock, which holds the owner's pid.

    The kernel drops the lock when its process dies however it dies (kill -9 included), so a stale lock
    never blocks a rerun; the pid left in the file is only reported ("taking over from pid N")."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.f = None

    def __enter__(self) -> "RunLock":
        import fcntl

        f = open(self.path, "a+", encoding="utf-8")
        f.seek(0)
        holder = f.read().strip()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunBusy(f"{self.path.parent} is in use by another run ({holder or 'pid unknown'}); wait for it, "
                          "or give this run another --out") from None
        if holder:
            log.info("taking over %s from %s, which is no longer running", self.path, holder)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.f = f
        return self

    def __exit__(self, *exc) -> None:
        self.f.seek(0)
        self.f.truncate()  # an empty file: released cleanly
        self.f.close()  # closing drops the flock


class StopRequest:
    """SIGTERM and SIGINT set a flag and nothing else; the loop polls it at step boundaries, saves a
    checkpoint and stops (exit code 75). A second signal while stopping is reported and ignored, so it
    cannot tear the save; SIGKILL remains for an immediate stop (and costs at most the step since the last
    checkpoint). Installed only on the main thread (Python delivers signals there); restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: stopping at the end of this step, after saving a checkpoint", name)
        else:
            log.warning("%s received again: already stopping; the checkpoint is being saved (SIGKILL stops at "
                        "once, losing the steps since the last checkpoint)", name)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class BadRows:
    """Every bad row of a run's datasets, in OUT/bad_rows.jsonl (one JSON object per row: stage, origin, row,
    field, reason, excerpt; rewritten by each attempt). The checks `add` what they find and drop those rows;
    `verdict` then stops the run, before the model loads, when any dataset has more than its
    `data.max_bad_fraction` of bad rows, listing them (the first SHOWN per dataset in the message, all in the
    file); below it the drops are logged as warnings."""

    SHOWN = 10

    def __init__(self, out: Path, *, write: bool = True):
        self.path, self.write = out / "bad_rows.jsonl", write
        if write:
            self.path.unlink(missing_ok=True)  # an earlier attempt's list describes data this one may not read
        self.seen: dict[tuple[str, str], dict] = {}  # (stage, origin) -> rows read, bad rows, allowed share
        self.judged = 0  # bad rows already judged by `verdict`

    def add(self, stage, section, rowset, bad: list) -> Any:
        """`rowset` without its `bad` rows (BadRow list), which are recorded."""
        entry = self.seen.setdefault((stage.name, rowset.origin), {"total": rowset.total, "bad": [], "left": 0,
                                                                    "frac": section.max_bad_fraction})
        numbers = {b.row for b in bad}
        rest = rowset.without({i for i in range(len(rowset.rows)) if rowset.number(i) in numbers}) if bad else rowset
        entry["left"] = len(rest.rows)
        if bad:
            entry["bad"].extend(bad)
        if bad and self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                for b in bad:
                    f.write(dumps({"stage": stage.name, **b.to_dict()}, indent=None) + "\n")
        return rest

    def verdict(self) -> None:
        """Raise DataError naming every dataset with too many bad rows (or none left); warn about the drops."""
        from .data.loading import DataError

        failed = []
        for (stage, where), e in self.seen.items():
            bad = sorted(e["bad"], key=lambda b: b.row)
            if not bad:
                continue
            if len(bad) > e["frac"] * e["total"] or not e["left"]:
                listing = "\n".join(f"  {b}" for b in bad[: self.SHOWN])
                more = f"\n  ... and {len(bad) - self.SHOWN} more" if len(bad) > self.SHOWN else ""
                failed.append((where, f"{len(bad)} of {e['total']} rows are bad (stage {stage!r}, "
                                      f"data.max_bad_fraction={e['frac']:g}):\n{listing}{more}"))
            elif len(bad) > self.judged:
                log.warning("stage %s: dropping %d bad rows of %s (%s%s); all are listed in %s", stage, len(bad), where,
                            "; ".join(str(b) for b in bad[:3]), " ..." if len(bad) > 3 else "", self.path)
        self.judged = sum(len(e["bad"]) for e in self.seen.values())
        if failed:
            text = failed[0][1] + "".join(f"\n{w}: {t}" for w, t in failed[1:])
            raise DataError(failed[0][0], None, None, f"{text}\nEvery bad row and its reason is in {self.path}. Fix "
                            "them, or let the run drop them by raising data.max_bad_fraction")


class Checkpointer:
    """The loop's `on_boundary` hook: a checkpoint every `checkpoint.every` steps, and on a stop signal a
    checkpoint and then `Interrupted` (the run exits with code 75; rerunning it resumes here)."""

    def __init__(self, run, index: int, stage, sink, t0: float, start: int):
        self.run, self.index, self.stage, self.sink, self.t0 = run, index, stage, sink, t0
        self.every, self.keep = run.cfg.checkpoint.every, run.cfg.checkpoint.keep
        self.root = run.out / "checkpoints"
        self.prev = start  # the step at the previous boundary (a batch may hold several optimizer steps)
        self.snapshot = None

    def __call__(self, state) -> None:
        stop = self.run.stop
        due = self.every and state.step // self.every > self.prev // self.every
        self.prev = state.step
        stopping = self.run.world.agree(stop.requested)  # every rank stops at the same step
        if due or stopping:
            self.save(state)
            stopping = self.run.world.agree(stop.requested)  # (a signal may arrive during the save)
        if stopping and not stop.requested:  # another rank received the signal
            stop.signum = signal.SIGTERM
        if stopping:
            raise Interrupted(f"stopped by {stop.name()} at step {state.step} of stage {self.stage.name!r}; checkpoint "
                              f"saved in {self.root}: rerun the same command to resume", stop.signum)
        if self.snapshot is not None:
            self.mark(state)

    def mark(self, state) -> None:
        """Remember what making the next step's experience changes (sources, sampler RNG, torch RNG), so a step
        that fails while making it can still be saved as the state before it (`save_before_step`)."""
        self.snapshot = (copy.deepcopy(state.experience.state_dict()), state.generator.get_state(),
                         torch.get_rng_state())

    def save_before_step(self, state) -> None:
        """The checkpoint of the last finished step, when the next one failed before its update."""
        experience, generator, rng = self.snapshot
        state.experience.load_state_dict(experience)
        state.generator.set_state(generator)
        torch.set_rng_state(rng)
        if state.step:
            self.save(state)

    def save(self, state) -> None:
        from .training import lora
        from .training.world import full_optimizer_state, full_state_dict, is_sharded

        whole = {}
        if is_sharded(state.model):  # every rank takes part in gathering the shards
            weights = full_state_dict(state.model)
            if lora.is_lora(state.model):  # a LoRA stage's checkpoint holds its adapters only
                weights = {n: weights[n] for n in lora.trainable_names(state.model)}
            whole = {"weights": weights, "optimizer_state": full_optimizer_state(state.model, state.optimizer)}
        ref = getattr(state.experience, "renewed_reference", lambda: None)()
        if ref is not None and is_sharded(ref):
            whole["reference"] = full_state_dict(ref)
        if not self.run.world.is_main:  # one copy of the replicated state: rank 0's
            return
        extra = {"config": stage_config(self.stage), "reward_errors": self.sink.reward_errors,
                 "stage_wall_s": time.perf_counter() - self.t0}
        path = checkpoint.save(self.root, self.index, self.stage.name, state, extra, **whole)
        checkpoint.prune(self.root, self.keep, protect=path)
        log.info("checkpoint: %s", path)
