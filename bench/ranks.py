"""Data parallelism on this machine: `posttrain train` on one process against `torchrun` with two, same recipe,
same global batch, the cores split between the ranks (1 rank x 2 threads, 2 ranks x 1 thread).

    python -m bench.ranks [--pairs 3] [--steps 8]

Both runs are the same computation (the 2-rank run equals the 1-rank one, tests/test_distributed.py); what differs
is how the work is spread. Measured: the mean step time after the first step, from each run's metrics.jsonl.
Prints one JSON line: per recipe and strategy, the step time of each and the speed-up (1-rank time / 2-rank
time; above 1 the ranks pay off).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import CHILD_ENV, ROOT, THREADS

RECIPES = {"sft": ("builtin:sft", []), "grpo": ("builtin:grpo", [])}


def run(recipe: str, overrides: list[str], steps: int, ranks: int, out: Path) -> float:
    """Mean seconds per step after the first (model loading and the first step's warm-up excluded)."""
    threads = str(THREADS // ranks)  # the cores split between the ranks (more threads than cores spin-wait)
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    cmd = launcher + ["-m", "posttrain", "train", recipe, "--out", str(out), "--max-steps", str(steps), "eval=null",
                      "checkpoint.every=0", *overrides]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["t_step"] for r in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    result = {"benchmark": "ranks", "cores": os.cpu_count(), "threads": THREADS, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, overrides) in RECIPES.items():
            for strategy in ("ddp", "fsdp"):
                seeding = ["stages.0.rollout.seeding=row", f"distributed.strategy={strategy}"]
                one, two = [], []
                for i in range(args.pairs):  # alternately, so drifting load hits both
                    one.append(run(recipe, overrides + seeding, args.steps, 1, Path(tmp) / f"{name}-{strategy}-1-{i}"))
                    two.append(run(recipe, overrides + seeding, args.steps, 2, Path(tmp) / f"{name}-{strategy}-2-{i}"))
                result[f"{name}_{strategy}"] = {
                    "step_s_1rank": round(statistics.median(one), 4), "step_s_2ranks": round(statistics.median(two), 4),
                    "speedup": round(statistics.median(a / b for a, b in zip(one, two)), 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
