"""The `posttrain` command: train, eval, methods, tasks, demo."""
from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("posttrain")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
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

    summary = train(args.recipe, out=args.out, max_steps=args.max_steps, overrides=args.overrides)
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-train language models: SFT, RL and hybrids "
                                "as presets of one policy-gradient estimator.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a recipe", description="Run a recipe (YAML). Writes config.yaml, "
                       "metrics.jsonl, tb/, summary.json and final/ into the run directory.")
    t.add_argument("recipe", help="path to a recipe YAML file, or builtin:NAME for a shipped one "
                   "(builtin:sft, builtin:grpo, builtin:sft_then_grpo, ...; the repository's recipes/)")
    t.add_argument("--out", help="run directory (default runs/run-TIMESTAMP)")
    t.add_argument("--max-steps", type=int, help="cap every stage at N optimizer steps (smoke runs)")
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
    e.add_argument("--reward", help="verifier for --data: builtin name (exact, numeric, math) or module:function "
                   "(default: math); with --task, the task's primary reward")
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

    k = sub.add_parser("tasks", help="list the built-in tasks")
    k.add_argument("--json", action="store_true", help="print a JSON list")
    k.set_defaults(fn=cmd_tasks)

    d = sub.add_parser("demo", help="train builtin:tiny with SFT, GRPO and SFT->GRPO and compare")
    d.add_argument("--out", default="runs/demo", help="directory for the runs and the table")
    d.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
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
    from .recipe import RecipeError

    try:
        return args.fn(args)
    except (RecipeError, DataError, FileNotFoundError) as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
