"""Measure the shipped recipes as shipped on the built-in base, over several seeds: the numbers behind README's
"What the shipped recipes measure" table, the learning tests' MEASURED tables and thresholds, and each recipe's
comments. Run it after the base (scripts/build_tiny.py) or the teacher (scripts/build_teacher.py) changes.

    python scripts/measure_recipes.py --out runs/measure               # every shipped recipe, seeds 0 / 1 / 2
    python scripts/measure_recipes.py --out runs/measure sft grpo      # some of them

It is `posttrain compare` with each recipe as written (no budget matching), greedy accuracy on the first 300
prompts of each split, two runs at a time with one thread each (how the learning tests' thresholds were
measured), no learning curves; rerunning the command skips the finished runs. It then prints, per recipe, the
README table's row and the learning tests' MEASURED entry, from the study's summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.recipe import BUILTIN_RECIPES  # noqa: E402
from posttrain.study.compare import run_study  # noqa: E402
from posttrain.study.evaluate import EvalSpec  # noqa: E402

SPLITS = ("id", "ood", "ood_phrasing")
SPEC = EvalSpec(splits=SPLITS, n=300, samples=0, curve_every=10**9)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def rows(summary: dict) -> list[str]:
    """One README table row per recipe: id gain per seed, format per seed, means of the ood splits and of the
    plain NLL drift, and the range of wall times."""
    base = summary["base"]
    by_recipe: dict[str, list[dict]] = {}
    for r in summary["runs"]:
        if r.get("status") == "done":
            by_recipe.setdefault(r["recipe"], []).append(r)
    out = [f"base: id {_pct(base.get('accuracy/id'))} %, ood_phrasing {_pct(base.get('accuracy/ood_phrasing'))} %, "
           f"ood {_pct(base.get('accuracy/ood'))} %, plain NLL {base.get('plain_nll', float('nan')):.3f}", "",
           "| recipe | `id` gain, points | format adherence % | `ood_phrasing` % (mean) | `ood` % (mean) "
           "| `plain` NLL drift (mean) | wall time |", "|---|---|---|---|---|---|---|"]
    for name, runs in by_recipe.items():
        runs.sort(key=lambda r: r["seed"])
        mean = lambda k: sum(r[k] for r in runs) / len(runs)  # noqa: E731
        gains = " / ".join(f"{100 * r['id_gain']:+.1f}" for r in runs)
        fmt = " / ".join(f"{100 * r['format/id']:.0f}" for r in runs)
        walls = sorted(round(r["wall_s"]) for r in runs if r.get("wall_s") is not None)
        wall = f"{walls[0]}-{walls[-1]} s" if walls else "—"
        out.append(f"| {name} | {gains} | {fmt} | {_pct(mean('accuracy/ood_phrasing'))} | "
                   f"{_pct(mean('accuracy/ood'))} | {mean('plain_nll_drift'):+.3f} | {wall} |")
    out += ["", "MEASURED = {"]
    for name, runs in by_recipe.items():
        accs = ", ".join(f"{r['id_accuracy']:.4f}" for r in runs)
        out.append(f'    "{name}": ({accs}),')
    return out + ["}"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="*", help="shipped recipe names (default: all of recipes/)")
    ap.add_argument("--out", required=True, help="the study directory (rerun to resume)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    names = a.recipes or sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))
    summary = run_study([f"builtin:{n}" for n in names], out=a.out, seeds=a.seeds, jobs=a.jobs, spec=SPEC)
    print("\n".join(rows(json.loads(json.dumps(summary)))))


if __name__ == "__main__":
    main()
