"""The `posttrain` command: train, eval, methods, tasks, demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("posttrain")


def _setup_logging(verbose: bool = False) -> None:
    level, fmt = logging.DEBUG if verbose else logging.INFO, "%(levelname)s %(message)s"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: rank 0 talks, the others only warn
        rank = int(os.environ.get("RANK", "0"))
        fmt = f"[rank {rank}] {fmt}"
        if rank:
            level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the training progress


def cmd_methods(args) -> int:
    from .recipe import method_table

    rows = method_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ("name", "sources", "advantage", "weight", "mask", "aggregation", "mix", "regularizers")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    print("\nweight w = sg(p / D): one (D = p), ratio (D = q, old policy), prob (D = 1), shaped (LUFFY), "
          "phi (CHORD), ...;\nper-stream entries name the stream (demo, rollout, prefix); `posttrain methods "
          "--json` lists every default and its reference.")
    return 0


def cmd_train(args) -> int:
    from . import train

    summary = train(args.recipe, out=args.out, max_steps=args.max_steps, overrides=args.overrides,
                    save_every=args.save_every, fresh=args.fresh, allow_change=args.allow_change or ())
    print(json.dumps({"out": summary["out"], "wall_s": summary["wall_s"],
                      "stages": {k: v.get("final", {}) for k, v in summary["stages"].items()}}, indent=2,
                     default=str))
    return 0


def cmd_eval(args) -> int:
    from .eval.cli_eval import run_eval

    result = run_eval(args)
    if args.json:
        print(json.dumps(result))
    else:
        for split, res in result.items() if "accuracy" not in result else [("", result)]:
            label = f"[{split}] " if split else ""
            print(label + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return 0


def cmd_recipe_keys(args) -> int:
    from .recipe_keys import key_reference

    print(key_reference(), end="")
    return 0


def cmd_tasks(args) -> int:
    from .tasks import TASKS

    rows = [{"name": t.name, "description": t.description, "splits": list(t.splits),
             "rewards": list(t.rewards), "primary": t.primary} for t in TASKS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']}: {r['description']}\n  splits: {', '.join(r['splits'])}; "
                  f"rewards: {', '.join(r['rewards'])} (primary: {r['primary']})")
    return 0


def cmd_compare(args) -> int:
    from .study.budget import Budget
    from .study.compare import run_study
    from .study.evaluate import EvalSpec

    budget = Budget.parse(args.budget) if args.budget else None
    spec = EvalSpec(task=args.task, n=args.n, samples=args.samples, max_new_tokens=args.max_new_tokens,
                    kl_n=args.kl_n, curve_every=args.curve_every)
    if args.splits:
        spec = EvalSpec(**{**spec.to_dict(), "splits": tuple(args.splits)})
    summary = run_study(args.recipes, out=args.out, seeds=args.seeds, budget=budget, jobs=args.jobs, spec=spec)
    print("\n".join(f"- {f['text']}" for f in summary["findings"]))
    print(f"\nreport: {args.out}/report.html (also report.md, summary.json, *.png)")
    failed = [r["name"] for r in summary["runs"] if r.get("status") != "done"]
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, quick=args.quick, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-train language models: SFT, RL and hybrids "
                                "as presets of one policy-gradient estimator.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a recipe", description="Run a recipe (YAML). Writes config.yaml, "
                       "metrics.jsonl, tb/, checkpoints/, summary.json and final/ into the run directory. Rerunning "
                       "the same command on the same --out resumes it exactly from its newest checkpoint. Exit codes: "
                       "0 done, 1 run failed, 2 bad recipe or data, 75 stopped by SIGTERM/SIGINT after saving a "
                       "checkpoint (rerun to resume).")
    t.add_argument("recipe", help="path to a recipe YAML file, or builtin:NAME for a shipped one "
                   "(builtin:sft, builtin:grpo, builtin:sft_then_grpo, ...; the repository's recipes/)")
    t.add_argument("--out", help="run directory (default runs/run-TIMESTAMP)")
    t.add_argument("--max-steps", type=int, help="cap every stage at N optimizer steps (smoke runs)")
    t.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N optimizer steps (overrides the "
                   "recipe's checkpoint.every; 0: only when stopped by a signal)")
    t.add_argument("--fresh", action="store_true", help="start over: move what --out holds to OUT.prev-TIMESTAMP")
    t.add_argument("--allow-change", action="append", metavar="KEY", help="a recipe field that may differ from "
                   "the run being resumed (e.g. stages.0.steps; shell patterns like 'stages.*.optim.lr'); "
                   "repeatable")
    t.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides, e.g. stages.0.optim.lr=1e-5 stages.0.clip.eps_high=0.28")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model", description="Greedy accuracy, pass@k (unbiased estimator "
                       "over K samples) and mean response length on a dataset or a built-in task.")
    e.add_argument("--model", required=True, help="model directory, hub id, or builtin:tiny")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL / Parquet / dataset dir with prompt + answer columns")
    src.add_argument("--task", help="a built-in task (see `posttrain tasks`)")
    e.add_argument("--split", action="append", help="task split(s) to evaluate (default: id); repeatable")
    e.add_argument("--reward", help="verifier, required with --data: exact (the whole answer, or the marked one), "
                   "numeric (the last number), math, code, or module:function; with --task, the task's primary "
                   "reward")
    e.add_argument("--answer-column", help="with --data: the column holding the reference answer (default: answer), "
                   "e.g. completion")
    e.add_argument("--save-samples", metavar="FILE", help="with --data: write every greedy completion with its "
                   "prompt, columns and reward to FILE (JSON lines)")
    e.add_argument("--threshold", type=float, default=1.0, help="a completion is correct when the verifier's reward "
                   "reaches this (default 1.0); reward_mean is reported beside accuracy")
    e.add_argument("--n", type=int, default=None, help="evaluate the first N rows (default: all for --data, "
                   "300 for --task)")
    e.add_argument("--samples", type=int, default=0, help="K samples per prompt for pass@k (default 0: greedy only)")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples")
    e.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per answer")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--reward-timeout", type=float, default=30.0, help="seconds per verifier call (--data)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("methods", help="list the method presets and their components")
    m.add_argument("--json", action="store_true", help="print a JSON list with every component and default")
    m.set_defaults(fn=cmd_methods)

    rk = sub.add_parser("recipe-keys", help="every recipe key with its type, default and meaning (Markdown)")
    rk.set_defaults(fn=cmd_recipe_keys)

    k = sub.add_parser("tasks", help="list the built-in tasks")
    k.add_argument("--json", action="store_true", help="print a JSON list")
    k.set_defaults(fn=cmd_tasks)

    c = sub.add_parser("compare", help="run several recipes under a matched budget and report them side by side",
                       description="Run each recipe from the same base under a matched budget (and several seeds), "
                       "evaluate every run alike on held-out data, and write DIR/report.html, report.md, "
                       "summary.json and the plots. Rerunning the same command skips the finished runs.")
    c.add_argument("recipes", nargs="+", help="recipe files or builtin:NAME (all must start from the same model)")
    c.add_argument("--out", required=True, help="study directory")
    c.add_argument("--seeds", type=int, default=1, help="seeds per recipe (the recipe's seed, +1, +2, ...)")
    c.add_argument("--budget", help="steps=K, samples=K or tokens=K per run (default: each recipe as written)")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (one thread each "
                   "when > 1)")
    c.add_argument("--task", default="arith", help="built-in task to evaluate on (default arith)")
    c.add_argument("--splits", nargs="+", help="question splits, in-distribution first (default: id ood ood_phrasing)")
    c.add_argument("--n", type=int, default=200, help="prompts per split (default 200)")
    c.add_argument("--samples", type=int, default=4, help="samples per prompt for pass@k and maj@k (default 4)")
    c.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per answer (default 48)")
    c.add_argument("--kl-n", type=int, default=64, help="held-out prompts for KL to the base (default 64)")
    c.add_argument("--curve-every", type=int, default=25, help="learning-curve points every N steps (default 25)")
    c.set_defaults(fn=cmd_compare)

    d = sub.add_parser("demo", help="the built-in study: SFT, DFT, GRPO, SFT->GRPO, LUFFY, HPT, CHORD, ReLIFT, "
                       "SFT->DPO and on-policy distillation on builtin:tiny under one matched budget",
                       description="Train the shipped tiny model with ten "
                       "methods under one matched budget of training samples (three seeds each), evaluate every run "
                       "alike on held-out data and write the report (`posttrain compare` with fixed settings).")
    d.add_argument("--out", default="runs/demo", help="directory for the runs and the report (a subfolder full/ "
                   "or quick/)")
    d.add_argument("--quick", action="store_true", help="a much smaller budget and evaluation, one seed (minutes)")
    d.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the CPU count)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow the options (`train r.yaml --out d a.b=1`), which plain argparse cannot split.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "train"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _setup_logging(args.verbose)
    from .data.loading import DataError
    from .errors import EXIT_INTERRUPTED, Interrupted, NonFiniteError, RewardFailure, RunBusy
    from .eval.cli_eval import EvalError
    from .recipe import RecipeError

    try:
        return args.fn(args)
    except (RecipeError, DataError, EvalError, FileNotFoundError) as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, RewardFailure, RunBusy) as e:  # a diverged run, failing rewards, a busy --out
        print(f"posttrain: run failed: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"posttrain: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        from .training.world import close_world

        close_world()


if __name__ == "__main__":
    sys.exit(main())
