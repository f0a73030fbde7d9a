"""A run: recipe -> stages -> run directory. `posttrain.train(...)` and `posttrain train` both land here.

Run directory (DESIGN.md §3): config.yaml (fully resolved), metrics.jsonl, tb/ (TensorBoard),
summary.json, final/ (model + tokenizer + chat template + generation config), run.log, progress.json and
stages/NAME/ (each finished stage's policy in model/, and data it made, e.g. verified.jsonl).
Each stage starts from the previous stage's policy; its reference model is the policy at its start.
A failed stage leaves the finished stages' outputs intact; rerunning the same command on the same
directory skips them (step-level resume inside a stage is the checkpoint's job).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from .data import detect_format, encode_dataset, load_rows, validate
from .data.loading import RowSet
from .errors import RunBusy
from .jsonio import dumps
from .models import choose_dtype, load_policy, pick_device, save_pretrained, stop_token_ids
from .objective.presets import PRESETS, get_preset
from .recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_data
from .training.loop import new_state, run_stage
from .training.metrics import JsonlSink, Progress, Sinks, TensorBoardSink

log = logging.getLogger("posttrain")

DEMO_FORMATS = ("messages", "prompt_completion", "text")
RL_FORMATS = ("prompt_answer", "prompt_only")
IN_MEMORY = "<in-memory>"
VERIFIED_FILE = "verified.jsonl"  # what a rejection-sampling stage writes for later stages (data.from_stage)


def train(recipe: str | Path | dict | Recipe, *, out: str | Path | None = None, max_steps: int | None = None,
          data: Any = None, rewards: Sequence[Callable] | dict[str, Sequence[Callable]] | None = None,
          overrides: list[str] | dict[str, Any] | None = None, progress: bool | None = None) -> dict:
    """Run a recipe and return its summary (also written to OUT/summary.json).

    data: rows for every stage (list of dicts, `datasets.Dataset`, or a path), or {stage_name: rows}.
    rewards: reward callables with the TRL signature for every RL stage, or {stage_name: [callables]};
    they replace the recipe's `rewards` for those stages.
    overrides: dotted keys, e.g. {"stages.0.steps": 5} or ["stages.0.clip.eps_high=0.28"].
    """
    raw, _ = recipe_data(recipe)
    data_map = _per_stage(data, raw)
    reward_map = _per_stage(rewards, raw)
    for i, st in enumerate(raw.get("stages", [])):
        key = st.get("name") or st.get("method")
        if key in data_map and not (st.get("data") or {}).get("from_stage"):
            st.setdefault("data", {})["path"] = IN_MEMORY if not isinstance(data_map[key], (str, Path)) \
                else str(data_map[key])
            st["data"].pop("task", None)
        preset = PRESETS.get(st.get("method"))
        if key in reward_map and (preset is None or preset.needs_rewards):  # SFT stages take no rewards
            st["rewards"] = [{"fn": f"<callable:{j}>", "name": getattr(f, "__name__", f"reward_{j}")}
                             for j, f in enumerate(reward_map[key])]
    cfg = load_recipe(raw, overrides)
    return Run(cfg, out=out, max_steps=max_steps, data=data_map, rewards=reward_map, progress=progress).execute()


def _per_stage(value, raw: dict) -> dict:
    if value is None:
        return {}
    names = [s.get("name") or s.get("method") for s in raw.get("stages", [])]
    if isinstance(value, dict) and set(value) <= set(names) and value:
        return dict(value)
    return {n: value for n in names}


class Run:
    def __init__(self, cfg: Recipe, *, out=None, max_steps=None, data=None, rewards=None, progress=None):
        self.cfg = cfg
        self.out = Path(out) if out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        self.max_steps = max_steps
        self.data = data or {}
        self.rewards = rewards or {}
        self.progress = progress

    def execute(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        with RunLock(self.out):
            handler = logging.FileHandler(self.out / "run.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            try:
                return self._execute()
            finally:
                log.removeHandler(handler)
                handler.close()

    def _execute(self) -> dict:
        cfg = self.cfg
        progress = StageProgress(self.out, cfg, self.max_steps)
        (self.out / "config.yaml").write_text(dump_recipe(cfg))
        torch.manual_seed(cfg.seed)
        device = pick_device(cfg.device)
        # Everything that can be checked without the model is checked before it loads.
        stage_data = [self._load_stage_data(s) for s in cfg.stages]
        resume_from = progress.last_model()
        model, tok = load_policy(str(resume_from) if resume_from else cfg.model,
                                 dtype=choose_dtype(cfg.dtype, device), device=device)
        stop_ids = stop_token_ids(tok, model)
        pad_id = tok.pad_token_id
        summary: dict[str, Any] = {"model": cfg.model, "out": str(self.out), "device": device,
                                   "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                                   "stages": {}}
        log.info("model %s on %s (%s)", cfg.model, device, summary["dtype"])
        if progress.done:
            log.info("resuming %s: stages %s finished, skipped", self.out, ", ".join(progress.done))
        sinks = Sinks(JsonlSink(self.out / "metrics.jsonl", keep=lambda r: r.get("stage") in progress.done),
                      TensorBoardSink(self.out / "tb"))
        t_run = time.perf_counter()
        hooks = EvalHooks(cfg, tok, stop_ids, pad_id, device)
        curve = CurveHook(hooks, self.out / "curve.jsonl", keep=lambda r: r.get("stage") in progress.done)
        try:
            if hooks.active:
                if "eval_before" not in progress.record:
                    progress.save_eval_before(hooks.evaluate(model))
                summary["eval"] = {"before": progress.record["eval_before"]}
            global_step = 0
            for i, (stage, sd) in enumerate(zip(cfg.stages, stage_data)):
                if stage.name in progress.done:
                    result = progress.done[stage.name]
                    summary["stages"][stage.name] = result
                    global_step += result["steps"]
                    curve.end_stage(result)
                    continue
                t0 = time.perf_counter()
                if curve.every and i == 0:
                    curve.point(model, stage.name, 0, 0, 0, 0.0)  # the base
                result = self._run_stage(i, stage, sd, model, tok, stop_ids, pad_id, device, sinks, global_step,
                                         on_step=curve.on_step(stage.name, t0))
                global_step += result["steps"]
                result["wall_s"] = round(time.perf_counter() - t0, 3)
                curve.end_stage(result, model)
                if hooks.active:
                    result["eval"] = hooks.evaluate(model)
                summary["stages"][stage.name] = result
                progress.finish_stage(stage.name, result, model, tok, stop_ids)
            if hooks.active:
                summary["eval"]["after"] = summary["stages"][cfg.stages[-1].name]["eval"]
            save_pretrained(model, tok, self.out / "final", stop_ids=stop_ids)
        finally:
            sinks.close()
            curve.close()
        summary["wall_s"] = round(time.perf_counter() - t_run, 3)
        (self.out / "summary.json").write_text(dumps(summary))
        log.info("run finished in %.1fs: %s", summary["wall_s"], self.out)
        return summary

    def _rowset(self, stage, d) -> RowSet | None:
        """The rows `d` (a stage's `data` or `demos` section) names; None for data an earlier stage makes."""
        if d.task:
            from .tasks import get_task

            rows = get_task(d.task).rows(d.split)
            rowset = RowSet(rows, f"task:{d.task}/{d.split}")
        elif d.from_stage:
            return None
        elif d.path == IN_MEMORY or (d.path is None and stage.name in self.data and d is stage.data):
            rowset = load_rows(self.data[stage.name], split=d.split)
        elif d.path:
            rowset = load_rows(d.path, split=d.split)
        else:
            raise RecipeError(f"stage {stage.name!r}: set data.path (a file, directory or hub id), data.task or "
                              "data.from_stage")
        if d.limit:
            rowset = RowSet(rowset.rows[: d.limit], rowset.origin)
        return rowset

    def _load_stage_data(self, stage) -> "StageData":
        preset = get_preset(stage.method)
        sd = StageData(self._rowset(stage, stage.data), None, None, None)
        if sd.rows is not None:
            sd.fmt = self._check_rows(stage, sd.rows, stage.data.format, preset.data)
        if stage.demos is not None:
            sd.demos = self._rowset(stage, stage.demos)
            if sd.demos is not None:
                sd.demos_fmt = self._check_rows(stage, sd.demos, stage.demos.format, "demonstrations")
        if sd.rows is not None and (preset.needs_demonstrations or _reads_row_demos(preset, stage)):
            self._check_paired(stage, sd)
        return sd

    def _check_rows(self, stage, rowset: RowSet, fmt: str, kind: str) -> str:
        allowed = DEMO_FORMATS if kind == "demonstrations" else RL_FORMATS
        fmt = detect_format(rowset, allowed) if fmt == "auto" else fmt
        if fmt not in allowed:
            raise RecipeError(f"stage {stage.name!r}: method {stage.method!r} reads {', '.join(allowed)} data "
                              f"here, not {fmt!r} ({rowset.origin})")
        validate(rowset, fmt)
        return fmt

    def _check_paired(self, stage, sd: "StageData") -> None:
        from .training.sources import PairedDemos

        if sd.demos is not None and get_preset(stage.method).needs_demonstrations and sd.demos_fmt != \
                "prompt_completion":
            raise RecipeError(f"stage {stage.name!r}: demonstrations paired with prompts are matched by prompt, so "
                              f"`demos` needs prompt + completion rows, not {sd.demos_fmt!r} ({sd.demos.origin})")
        paired = PairedDemos(None, sd.demos if get_preset(stage.method).needs_demonstrations else None,
                             sd.demos_fmt)
        paired.check(sd.rows, stage.method)

    def _scorer(self, stage):
        from .rewards import RewardScorer, RewardSpec

        specs = []
        for r in stage.rewards:
            fn: Any = r.fn
            if fn.startswith("<callable:"):
                fn = self.rewards[stage.name][int(fn[len("<callable:"):-1])]
            elif stage.data.task and ":" not in fn:
                from .tasks import get_task

                fn = get_task(stage.data.task).rewards.get(fn, fn)
            specs.append(RewardSpec(fn=fn, weight=r.weight, kwargs=dict(r.kwargs), name=r.name))
        return RewardScorer(specs, timeout_s=stage.reward_timeout_s)

    def _resolve_late(self, stage, sd: "StageData") -> None:
        """Data made by an earlier stage of this run (`from_stage`) exists only now: load and check it."""
        for attr, section, kind in (("rows", stage.data, get_preset(stage.method).data), ("demos", stage.demos,
                                                                                          "demonstrations")):
            if section is not None and section.from_stage:
                path = self.out / "stages" / section.from_stage / VERIFIED_FILE
                rowset = load_rows(str(path))
                if section.limit:
                    rowset = RowSet(rowset.rows[: section.limit], rowset.origin)
                setattr(sd, attr, rowset)
                setattr(sd, "fmt" if attr == "rows" else "demos_fmt",
                        self._check_rows(stage, rowset, section.format, kind))
                preset = get_preset(stage.method)
                if preset.needs_demonstrations or _reads_row_demos(preset, stage):
                    self._check_paired(stage, sd)

    def _run_stage(self, i, stage, sd: "StageData", model, tok, stop_ids, pad_id, device, sinks,
                   global_step, on_step=None) -> dict:
        from .training.experience import Experience
        from .training.sources import Demonstrations, PairedDemos

        preset = get_preset(stage.method)
        self._resolve_late(stage, sd)
        seed = self.cfg.seed + 7919 * i
        ref_model = None
        if stage.kl.beta:  # the reference is the policy at this stage's start
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        n_steps = min(stage.steps, self.max_steps) if self.max_steps else stage.steps
        progress = Progress(n_steps, stage.name, stage.log_every, tty=self.progress)
        sink = _StageSink(Sinks(sinks, progress), global_step)
        result: dict[str, Any] = {"name": stage.name, "method": stage.method, "format": sd.fmt,
                                  "rows": len(sd.rows.rows)}
        kw: dict[str, Any] = dict(pad_id=pad_id, stop_ids=stop_ids, device=device, seed=seed, ref_model=ref_model,
                                  total_steps=n_steps)
        if preset.data == "demonstrations" or "demonstrations" in preset.sources:
            demos_rows, fmt = (sd.demos, sd.demos_fmt) if sd.demos is not None else (sd.rows, sd.fmt)
            if preset.data != "demonstrations" and sd.demos is None:
                fmt = "prompt_answer"  # the rows' own completion / solution column
            kw["demos"] = Demonstrations(self._encode(stage, demos_rows, fmt, tok, result), seed + 1,
                                         stage.data.shuffle)
        if preset.needs_demonstrations:
            kw["paired"] = PairedDemos(tok, sd.demos, sd.demos_fmt)
        if "verified" in preset.sources:
            kw["on_data"] = self._data_writer(stage)
        try:
            if preset.data == "demonstrations":
                experience = Experience(stage, tok, **kw)
                state = new_state(model, stage, seed, experience)
                last = run_stage(state, stage, device=device, sink=sink, max_steps=self.max_steps, on_step=on_step)
            else:
                with self._scorer(stage) as scorer:
                    experience = Experience(stage, tok, rows=sd.rows.rows, scorer=scorer, **kw)
                    state = new_state(model, stage, seed, experience)
                    last = run_stage(state, stage, device=device, sink=sink, max_steps=self.max_steps,
                                     on_step=on_step)
                    result["reward_errors"] = sink.reward_errors
        finally:
            progress.close()
        result.update(steps=state.step, samples=state.samples, tokens=state.tokens)
        result["final"] = {k: v for k, v in last.items() if k not in ("stage", "step", "global_step")}
        return result

    def _encode(self, stage, rowset: RowSet, fmt: str, tok, result: dict) -> list:
        examples, dropped = encode_dataset(rowset, fmt, tok, max_len=stage.data.max_len,
                                           on_overlong=stage.data.on_overlong)
        if dropped:
            log.warning("stage %s: dropped %d rows longer than data.max_len=%d (first rows: %s)",
                        stage.name, len(dropped), stage.data.max_len, dropped[:10])
        if not examples:
            raise RecipeError(f"stage {stage.name!r}: no rows left after dropping over-long ones; raise data.max_len")
        result["dropped_overlong"] = len(dropped)
        return examples

    def _data_writer(self, stage):
        """Where a stage's generated data goes: OUT/stages/NAME/verified.jsonl (every round appended)."""
        path = self.out / "stages" / stage.name / VERIFIED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

        def write(round_: int, rows: list[dict]) -> None:
            with open(path, "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({**r, "round": round_}, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
            log.info("stage %s round %d: %d verified samples -> %s", stage.name, round_, len(rows), path)

        return write


@dataclass
class StageData:
    rows: RowSet | None
    fmt: str | None
    demos: RowSet | None
    demos_fmt: str | None


def _reads_row_demos(preset, stage) -> bool:
    """CHORD-style stages without a `demos:` dataset read their demonstrations from the prompt rows."""
    return "demonstrations" in preset.sources and preset.data != "demonstrations" and stage.demos is None


class StageProgress:
    """Which stages of a run directory finished: OUT/progress.json plus each finished stage's policy in
    OUT/stages/NAME/model/. Rerunning on the same directory skips the leading stages that finished with the
    same configuration and continues from the last one's policy (a stage that failed may be changed before
    the rerun); a different model or seed, or a finished stage whose configuration changed, is refused."""

    def __init__(self, out: Path, cfg: Recipe, max_steps: int | None):
        self.out = out
        self.path = out / "progress.json"
        run = {"model": cfg.model, "seed": cfg.seed, "dtype": cfg.dtype, "max_steps": max_steps,
               "eval": cfg.eval.model_dump(mode="json") if cfg.eval else None}
        configs = {s.name: yaml.safe_dump(s.model_dump(mode="json"), sort_keys=True) for s in cfg.stages}
        self.record: dict = {"run": run, "stages": {}}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("run") != run:
                raise RecipeError(f"{out} holds a run with another model, seed, dtype, eval or --max-steps; use "
                                  "another --out, or delete the directory to start again")
            self.record = old
        self.done: dict = {}
        for name, config in configs.items():  # the leading finished stages, in recipe order
            rec = self.record["stages"].get(name)
            if rec is None or not (out / "stages" / name / "model" / "config.json").exists():
                break
            if rec["config"] != config:
                raise RecipeError(f"{out}: stage {name!r} finished with another configuration; use another "
                                  "--out, or delete the directory to start again")
            self.done[name] = rec["result"]
        self.configs = configs

    def last_model(self) -> Path | None:
        return self.out / "stages" / list(self.done)[-1] / "model" if self.done else None

    def save_eval_before(self, result: dict) -> None:
        self.record["eval_before"] = result
        self._write()

    def finish_stage(self, name: str, result: dict, model, tok, stop_ids) -> None:
        save_pretrained(model, tok, self.out / "stages" / name / "model", stop_ids=stop_ids)
        self.record["stages"][name] = {"config": self.configs[name], "result": result}
        self.done[name] = result
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(dumps(self.record))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


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


class _StageSink:
    """Adds the run-wide `global_step` and sums the reward errors of a stage."""

    def __init__(self, inner, offset: int):
        self.inner, self.offset, self.reward_errors = inner, offset, 0

    def write(self, record: dict) -> None:
        record["global_step"] = self.offset + record["step"]
        self.reward_errors += int(record.get("reward_errors", 0))
        self.inner.write(record)


class EvalHooks:
    """Evaluation before the first stage and after each stage, when the recipe has an `eval` section."""

    def __init__(self, cfg: Recipe, tok, stop_ids, pad_id, device):
        self.cfg, self.tok, self.stop_ids, self.pad_id, self.device = cfg.eval, tok, stop_ids, pad_id, device
        self.active = cfg.eval is not None

    def evaluate(self, model) -> dict:
        from .eval.task_eval import evaluate_task

        e = self.cfg
        return {split: evaluate_task(model, self.tok, e.task, split, n=e.n, max_new_tokens=e.max_new_tokens,
                                     samples=e.samples, temperature=e.temperature, stop_ids=self.stop_ids,
                                     pad_id=self.pad_id) for split in e.splits}

    def curve_point(self, model) -> dict:
        """Greedy accuracy and format on the curve split (a point of the learning curve)."""
        from .eval.task_eval import evaluate_task

        e = self.cfg
        r = evaluate_task(model, self.tok, e.task, e.curve_split, n=e.curve_n, max_new_tokens=e.max_new_tokens,
                          stop_ids=self.stop_ids, pad_id=self.pad_id)
        return {k: r[k] for k in ("accuracy", "format") if k in r}


class CurveHook:
    """`every` steps of each stage, one learning-curve point in OUT/curve.jsonl, with the run's cumulative
    samples, trained tokens and wall time (all stages so far) so curves of different methods share axes."""

    def __init__(self, hooks: EvalHooks, path: Path, keep):
        self.hooks = hooks
        self.every = hooks.cfg.every if hooks.active else 0
        self.sink = JsonlSink(path, keep=keep) if self.every else None
        self.offset = {"samples": 0, "tokens": 0, "wall_s": 0.0, "global_step": 0}

    def point(self, model, stage: str, step: int, samples: int, tokens: int, wall_s: float) -> None:
        o = self.offset
        self.sink.write({"stage": stage, "step": step, "global_step": o["global_step"] + step,
                         "samples": o["samples"] + samples, "tokens": o["tokens"] + tokens,
                         "wall_s": round(o["wall_s"] + wall_s, 3), self.hooks.cfg.curve_split:
                         self.hooks.curve_point(model)})

    def on_step(self, stage: str, t0: float):
        if not self.every:
            return None

        def hook(state, record) -> bool:
            if state.step % self.every == 0:
                self.point(state.model, stage, state.step, state.samples, state.tokens, time.perf_counter() - t0)
            return False

        return hook

    def end_stage(self, result: dict, model=None) -> None:
        """Move the offsets past a finished stage (given the model: first its last point, when `every` skipped it)."""
        if model is not None and self.every and result["steps"] % self.every:
            self.point(model, result.get("name", ""), result["steps"], result["samples"], result["tokens"],
                       result["wall_s"])
        for key, value in (("samples", result["samples"]), ("tokens", result["tokens"]),
                           ("wall_s", result["wall_s"]), ("global_step", result["steps"])):
            self.offset[key] += value

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
