"""`posttrain demo`: the shipped tiny model trained with SFT, GRPO and SFT->GRPO on the built-in task,
evaluated before and after on the in-distribution and out-of-distribution splits.

Every number in the table comes from the runs made here; nothing is read from a file written earlier.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .models import load_policy, stop_token_ids
from .recipe import load_recipe

log = logging.getLogger("posttrain")

DEMO_RUNS = ("sft", "grpo", "sft_then_grpo")
SPLITS = ("id", "ood")


def _evaluate(model_dir: str, n: int, max_new_tokens: int) -> dict:
    from .eval.task_eval import evaluate_task

    model, tok = load_policy(model_dir)
    stop_ids = stop_token_ids(tok, model)
    return {s: evaluate_task(model, tok, "arith", s, n=n, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                             pad_id=tok.pad_token_id) for s in SPLITS}


def _quick(recipe) -> dict:
    """A much shorter run of the same recipe (for smoke tests): few steps, small batches."""
    data = recipe.model_dump(mode="json")
    for st in data["stages"]:
        st["steps"] = 2
        st["batch"]["size"] = 4
        st["rollout"]["group_size"] = 4
        st["rollout"]["max_new_tokens"] = 16
    data.pop("eval", None)
    return data


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> int:
    from .run import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, max_new = (20, 16) if quick else (300, 48)
    t0 = time.perf_counter()
    log.info("evaluating the base model builtin:tiny on %s (%d prompts each)", ", ".join(SPLITS), n)
    base = _evaluate("builtin:tiny", n, max_new)
    results = {"base": {"eval": base, "wall_s": 0.0}}
    for name in DEMO_RUNS:
        recipe = load_recipe(f"builtin:{name}")
        data = _quick(recipe) if quick else recipe.model_dump(mode="json")
        data.pop("eval", None)  # evaluated below, once per run, against the same base numbers
        log.info("training %s", name)
        t = time.perf_counter()
        summary = train(data, out=out / name)
        wall = time.perf_counter() - t
        results[name] = {"eval": _evaluate(summary["out"] + "/final", n, max_new), "wall_s": wall,
                         "steps": {k: v["steps"] for k, v in summary["stages"].items()}}
    table = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text("# posttrain demo\n\n" + table + "\n")
    print(table)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f}s; runs and report in {out}")
    return 0


def format_table(results: dict) -> str:
    """Markdown table: accuracy and format adherence per split, with the change from the base model."""
    base = results["base"]["eval"]
    head = ["run", "id acc", "ood acc", "id format", "ood format", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name]
        for metric in ("accuracy", "format"):
            for split in SPLITS:
                v = r["eval"][split].get(metric, float("nan"))
                b = base[split].get(metric, float("nan"))
                cells.append(f"{100 * v:.1f}%" if name == "base" else f"{100 * v:.1f}% ({100 * (v - b):+.1f})")
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nGreedy decoding on {base['id']['n']} `id` and {base['ood']['n']} `ood` prompts of the built-in "
                 "`arith` task; in brackets the change from the base model in points. One seed per run.")
    return "\n".join(lines)
