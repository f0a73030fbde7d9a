"""Evaluation during a run: before the first stage and after each (a built-in task, or the user's data and
verifier), and the learning curve every N steps (OUT/curve.jsonl)."""
from __future__ import annotations

import time
from pathlib import Path

from .recipe import Recipe
from .training.metrics import JsonlSink


class EvalHooks:
    """Evaluation before the first stage and after each stage, when the recipe has an `eval` section."""

    def __init__(self, cfg: Recipe, tok, stop_ids, pad_id, device, active: bool = True):
        self.cfg, self.tok, self.stop_ids, self.pad_id, self.device = cfg.eval, tok, stop_ids, pad_id, device
        self.active = cfg.eval is not None and active  # (off on the ranks other than 0)
        self.rows = None
        if self.active and self.cfg.data is not None:  # the user's rows, checked once (before any training)
            from .eval.task_eval import load_eval_rows

            self.rows = load_eval_rows(self.cfg.data, tok, answer_column=self.cfg.answer_column, origin=cfg.model)

    def _on_data(self, model, n: int, samples: int) -> dict:
        from .eval.task_eval import evaluate_data

        e = self.cfg
        return evaluate_data(model, self.tok, self.rows[:n], e.reward, threshold=e.threshold,
                             max_new_tokens=e.max_new_tokens, samples=samples, temperature=e.temperature,
                             stop_ids=self.stop_ids, pad_id=self.pad_id)

    def evaluate(self, model) -> dict:
        from .eval.task_eval import evaluate_task

        e = self.cfg
        if self.rows is not None:
            return {"data": self._on_data(model, e.n, e.samples)}
        return {split: evaluate_task(model, self.tok, e.task, split, n=e.n, max_new_tokens=e.max_new_tokens,
                                     samples=e.samples, temperature=e.temperature, stop_ids=self.stop_ids,
                                     pad_id=self.pad_id) for split in e.splits}

    def curve_point(self, model) -> dict:
        """Greedy accuracy and format on the curve split (a point of the learning curve)."""
        from .eval.task_eval import evaluate_task

        e = self.cfg
        r = self._on_data(model, e.curve_n, 0) if self.rows is not None else evaluate_task(
            model, self.tok, e.task, e.curve_split, n=e.curve_n, max_new_tokens=e.max_new_tokens,
            stop_ids=self.stop_ids, pad_id=self.pad_id)
        return {k: r[k] for k in ("accuracy", "format", "reward_mean") if k in r}


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
                         "wall_s": round(o["wall_s"] + wall_s, 3),
                         "data" if self.hooks.rows is not None else self.hooks.cfg.curve_split:
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
