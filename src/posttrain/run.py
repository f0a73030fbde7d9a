"""A run: recipe -> stages -> run directory. `posttrain.train(...)` and `posttrain train` both land here.

Run directory (DESIGN.md §3): config.yaml (fully resolved), metrics.jsonl, tb/ (TensorBoard),
summary.json, final/ (model + tokenizer + chat template + generation config), run.log.
Each stage starts from the previous stage's policy; its reference model is the policy at its start.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import detect_format, encode_dataset, load_rows, validate
from .data.loading import RowSet
from .models import choose_dtype, load_policy, pick_device, save_pretrained, stop_token_ids
from .objective.presets import get_preset
from .recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_data
from .training.loop import new_state, run_stage
from .training.metrics import JsonlSink, Progress, Sinks, TensorBoardSink
from .training.rollouts import RolloutMaker

log = logging.getLogger("posttrain")

DEMO_FORMATS = ("messages", "prompt_completion", "text")
RL_FORMATS = ("prompt_answer", "prompt_only")
IN_MEMORY = "<in-memory>"


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
        if key in data_map:
            st.setdefault("data", {})["path"] = IN_MEMORY if not isinstance(data_map[key], (str, Path)) \
                else str(data_map[key])
            st["data"].pop("task", None)
        if key in reward_map:
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
        (self.out / "config.yaml").write_text(dump_recipe(cfg))
        torch.manual_seed(cfg.seed)
        device = pick_device(cfg.device)
        # Everything that can be checked without the model is checked before it loads.
        stage_rows = [self._load_stage_rows(s) for s in cfg.stages]
        model, tok = load_policy(cfg.model, dtype=choose_dtype(cfg.dtype, device), device=device)
        stop_ids = stop_token_ids(tok, model)
        pad_id = tok.pad_token_id
        summary: dict[str, Any] = {"model": cfg.model, "out": str(self.out), "device": device,
                                   "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                                   "stages": {}}
        log.info("model %s on %s (%s)", cfg.model, device, summary["dtype"])
        sinks = Sinks(JsonlSink(self.out / "metrics.jsonl"), TensorBoardSink(self.out / "tb"))
        t_run = time.perf_counter()
        try:
            hooks = EvalHooks(cfg, tok, stop_ids, pad_id, device)
            summary["eval"] = {"before": hooks.evaluate(model)} if hooks.active else {}
            global_step = 0
            for i, (stage, (rowset, fmt)) in enumerate(zip(cfg.stages, stage_rows)):
                t0 = time.perf_counter()
                result = self._run_stage(i, stage, rowset, fmt, model, tok, stop_ids, pad_id, device, sinks,
                                         global_step)
                global_step += result["steps"]
                result["wall_s"] = round(time.perf_counter() - t0, 3)
                if hooks.active:
                    result["eval"] = hooks.evaluate(model)
                summary["stages"][stage.name] = result
            if hooks.active:
                summary["eval"]["after"] = summary["stages"][cfg.stages[-1].name]["eval"]
            save_pretrained(model, tok, self.out / "final", stop_ids=stop_ids)
        finally:
            sinks.close()
        summary["wall_s"] = round(time.perf_counter() - t_run, 3)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
        log.info("run finished in %.1fs: %s", summary["wall_s"], self.out)
        return summary

    def _load_stage_rows(self, stage) -> tuple[RowSet, str]:
        preset = get_preset(stage.method)
        if stage.data.task:
            from .tasks import get_task

            rows = get_task(stage.data.task).rows(stage.data.split)
            rowset = RowSet(rows, f"task:{stage.data.task}/{stage.data.split}")
        elif stage.data.path == IN_MEMORY or (stage.data.path is None and stage.name in self.data):
            rowset = load_rows(self.data[stage.name], split=stage.data.split)
        elif stage.data.path:
            rowset = load_rows(stage.data.path, split=stage.data.split)
        else:
            raise RecipeError(f"stage {stage.name!r}: set data.path (a file, directory or hub id) or data.task")
        if stage.data.limit:
            rowset = RowSet(rowset.rows[: stage.data.limit], rowset.origin)
        allowed = DEMO_FORMATS if preset.data == "demonstrations" else RL_FORMATS
        fmt = detect_format(rowset, allowed) if stage.data.format == "auto" else stage.data.format
        if fmt not in allowed:
            raise RecipeError(f"stage {stage.name!r}: method {stage.method!r} reads {', '.join(allowed)} data, "
                              f"not {fmt!r}")
        validate(rowset, fmt)
        return rowset, fmt

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

    def _run_stage(self, i, stage, rowset, fmt, model, tok, stop_ids, pad_id, device, sinks, global_step) -> dict:
        preset = get_preset(stage.method)
        seed = self.cfg.seed + 7919 * i
        ref_model = None
        if stage.kl.beta:  # the reference is the policy at this stage's start
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        n_steps = min(stage.steps, self.max_steps) if self.max_steps else stage.steps
        progress = Progress(n_steps, stage.name, stage.log_every, tty=self.progress)
        sink = _StageSink(Sinks(sinks, progress), global_step)
        result: dict[str, Any] = {"method": stage.method, "format": fmt, "rows": len(rowset.rows)}
        try:
            if preset.data == "demonstrations":
                examples, dropped = encode_dataset(rowset, fmt, tok, max_len=stage.data.max_len,
                                                   on_overlong=stage.data.on_overlong)
                if dropped:
                    log.warning("stage %s: dropped %d rows longer than data.max_len=%d (first rows: %s)",
                                stage.name, len(dropped), stage.data.max_len, dropped[:10])
                if not examples:
                    raise RecipeError(f"stage {stage.name!r}: no rows left after dropping over-long ones; "
                                      "raise data.max_len")
                result["dropped_overlong"] = len(dropped)
                state = new_state(model, stage, seed, len(examples))
                last = run_stage(state, stage, examples=examples, pad_id=pad_id, device=device, sink=sink,
                                 max_steps=self.max_steps)
            else:
                with self._scorer(stage) as scorer:
                    maker = RolloutMaker(stage, tok, scorer, stop_ids=stop_ids, pad_id=pad_id, device=device,
                                         ref_model=ref_model)
                    state = new_state(model, stage, seed, len(rowset.rows))
                    last = run_stage(state, stage, rows=rowset.rows, maker=maker, pad_id=pad_id, device=device,
                                     sink=sink, max_steps=self.max_steps)
                    result["reward_errors"] = sink.reward_errors
        finally:
            progress.close()
        result["steps"] = state.step
        result["final"] = {k: v for k, v in last.items() if k not in ("stage", "step", "global_step")}
        return result


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


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)
