"""`posttrain compare`: several recipes from the same base under a matched budget, side by side.

    DIR/study.json                what was asked (recipes, seeds, budget, evaluation); a rerun must ask the same
    DIR/base/eval.json            the base model's figures
    DIR/runs/NAME-sSEED/          recipe.yaml (the matched recipe), train/ (its run directory), eval.json,
                                  worker.log
    DIR/summary.json, report.md, report.html, *.png     (study/report.py)

Each run trains and is evaluated in its own worker process (`python -m posttrain.study.worker RUNDIR`), up
to `jobs` at a time, so a crash stays inside its run and the study goes on. A rerun of the same command
skips the runs whose eval.json exists and resumes the others (a run's finished stages are kept). A run
that failed is reported as failed, and the command exits non-zero.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..recipe import RecipeError, load_recipe, recipe_data
from .budget import Budget, match
from .evaluate import EvalSpec

log = logging.getLogger("posttrain")


@dataclass
class RunSpec:
    name: str  # NAME-sSEED
    recipe: str  # the recipe's name
    seed: int
    dir: Path
    config: dict  # the raw recipe as run: matched budget, seed, learning-curve evaluation


def recipe_name(source: str) -> str:
    return source.removeprefix("builtin:") if source.startswith("builtin:") else Path(source).stem


def plan(sources: list[str], *, out: Path, seeds: int, budget: Budget | None, spec: EvalSpec) -> tuple[str, list[RunSpec]]:
    """(base model, the runs): every recipe checked before anything runs; all must start from one model."""
    names = [recipe_name(s) for s in sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"two recipes share a name ({', '.join(names)}); give each file its own name")
    runs, models = [], set()
    for source, name in zip(sources, names):
        raw, _ = recipe_data(source)
        raw.pop("eval", None)  # the study evaluates every run the same way
        base_seed = int(raw.get("seed", 0))
        for k in range(seeds):
            cfg = match(raw, budget)
            cfg["seed"] = base_seed + k
            cfg["eval"] = {"task": spec.task, "splits": [], "every": spec.curve_every, "curve_split": spec.kl_split,
                           "curve_n": spec.curve_n, "max_new_tokens": spec.max_new_tokens}
            load_recipe(copy.deepcopy(cfg))  # a bad recipe stops the study here, before any run
            models.add(cfg["model"])
            run = f"{name}-s{cfg['seed']}"
            runs.append(RunSpec(run, name, cfg["seed"], out / "runs" / run, cfg))
    if len(models) > 1:
        raise RecipeError(f"the recipes start from different models ({', '.join(sorted(models))}); a comparison "
                          "needs one base")
    return models.pop(), runs


def _asked(sources, seeds, budget, spec) -> dict:
    return {"recipes": list(sources), "seeds": seeds, "budget": str(budget) if budget else None,
            "eval": spec.to_dict()}


def run_study(sources: list[str], *, out: str | Path, seeds: int = 1, budget: Budget | None = None, jobs: int = 1,
              spec: EvalSpec = EvalSpec(), threads: int | None = None) -> dict:
    """Run (or resume) the study and write its report; returns the summary (also DIR/summary.json)."""
    from .report import write_report
    from .summary import summarize

    out = Path(out)
    if seeds < 1 or jobs < 1:
        raise RecipeError(f"--seeds and --jobs must be >= 1 (got {seeds}, {jobs})")
    base_model, runs = plan(sources, out=out, seeds=seeds, budget=budget, spec=spec)
    out.mkdir(parents=True, exist_ok=True)
    asked = json.loads(json.dumps(_asked(sources, seeds, budget, spec)))  # as it reads back from study.json
    study_file = out / "study.json"
    if study_file.exists() and json.loads(study_file.read_text()) != {**asked, "base": base_model}:
        raise RecipeError(f"{out} holds a study of other recipes, seeds, budget or evaluation; use another --out, "
                          "or delete the directory to start again")
    study_file.write_text(json.dumps({**asked, "base": base_model}, indent=2))
    jobs_list = [_Job("base", out / "base", None, base_model)] + [_Job(r.name, r.dir, r.config, base_model)
                                                                   for r in runs]
    for j in jobs_list:
        j.prepare(spec)
    pending = [j for j in jobs_list if not j.done()]
    log.info("study %s: %d runs (%d to do), budget %s, %d seed(s), %d job(s) at a time", out, len(runs),
             len(pending), budget or "as in each recipe", seeds, jobs)
    threads = threads or (1 if jobs > 1 else None)
    t0 = time.perf_counter()
    counter = {"done": 0}

    def work(job: "_Job") -> None:
        ok = job.execute(threads)
        counter["done"] += 1
        log.info("[%d/%d] %s %s in %.0f s%s", counter["done"], len(pending), job.name, "done" if ok else "FAILED",
                 job.seconds, "" if ok else f" (see {job.dir / 'worker.log'})")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, pending))
    summary = summarize(out, base_model, runs, asked, wall_s=time.perf_counter() - t0)
    write_report(out, summary)
    return summary


class _Job:
    """One worker process: the base's evaluation, or a run's training and evaluation."""

    def __init__(self, name: str, dir: Path, config: dict | None, base: str):
        self.name, self.dir, self.config, self.base = name, dir, config, base
        self.seconds = 0.0

    def prepare(self, spec: EvalSpec) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        job = {"base": self.base, "eval": spec.to_dict(), "train": self.config is not None}
        if self.config is not None:
            path, text = self.dir / "recipe.yaml", yaml.safe_dump(self.config, sort_keys=False)
            if path.exists() and yaml.safe_load(path.read_text()) != self.config:
                raise RecipeError(f"{self.dir} was run from another version of its recipe; use another --out, or "
                                  "delete the run's directory to run it again")
            path.write_text(text)
        (self.dir / "job.json").write_text(json.dumps(job, indent=2))

    def done(self) -> bool:
        return (self.dir / "eval.json").exists()

    def execute(self, threads: int | None) -> bool:
        env = dict(os.environ)
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), POSTTRAIN_THREADS=str(threads))
        t0 = time.perf_counter()
        with open(self.dir / "worker.log", "a") as logf:
            proc = subprocess.run([sys.executable, "-m", "posttrain.study.worker", str(self.dir)], stdout=logf,
                                  stderr=subprocess.STDOUT, env=env)
        self.seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            (self.dir / "failed.json").write_text(json.dumps({"exit_code": proc.returncode}))
        else:
            (self.dir / "failed.json").unlink(missing_ok=True)
        return proc.returncode == 0
