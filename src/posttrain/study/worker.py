"""One study job in its own process: `python -m posttrain.study.worker RUNDIR`.

RUNDIR/job.json says what to do: train RUNDIR/recipe.yaml into RUNDIR/train (resuming its finished stages),
then evaluate the result against the base; or, for the base itself, only evaluate. The evaluation is
written to RUNDIR/eval.json last, through a temporary file: its presence means the job finished.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import yaml


def main(argv: list[str] | None = None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("POSTTRAIN_THREADS"):
        torch.set_num_threads(int(os.environ["POSTTRAIN_THREADS"]))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from .evaluate import EvalSpec, evaluate_dir

    job = json.loads((run_dir / "job.json").read_text())
    spec = EvalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["eval"].items()})
    model_dir = job["base"]
    if job["train"]:
        from ..run import train

        cfg = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        summary = train(cfg, out=run_dir / "train", progress=False)
        model_dir = summary["out"] + "/final"
    result = evaluate_dir(model_dir, job["base"], spec)
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, run_dir / "eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
