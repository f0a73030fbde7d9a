"""Learning on the built-in `arith` task from the shipped base model, through the shipped recipes.

Each test runs a recipe from `recipes/` as committed (steps, batch, learning rate, seed 0), evaluating only
the `id` split (300 prompts, greedy, 48 new tokens) before and after, and reads `summary.json`'s
`eval.before` / `eval.after`. A run is deterministic on one machine, but another CPU's kernels round
differently and the trajectory drifts, so thresholds are set below the worst of three recipe seeds (MEASURED,
a 2-core machine, two single-threaded runs at a time) with a margin of about one standard error of the
difference (~3 points at n=300), not from the seed-0 run alone.
"""
import json
from pathlib import Path

import pytest

from posttrain.run import train

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASE_ID_ACCURACY = 0.2767  # builtin:tiny, greedy, first 300 `id` prompts

# Greedy `id` accuracy after each recipe, seeds 0 / 1 / 2 (the recipe with `seed=S`); wall time ~70 s per RL run.
MEASURED = {
    "grpo": (0.4167, 0.3700, 0.4633),           # +14.0 / +9.3 / +18.7 points
    "dapo": (0.4467, 0.4100, 0.3700),           # +16.7 / +13.3 / +9.3
    "dr_grpo": (0.3000, 0.3367, 0.3733),        # +2.3 / +6.0 / +9.7; sampled reward +6.0 / +8.4 / +9.2
    "sft": (0.4233, 0.3333, 0.4233),            # format 0 % -> 100 / 100 / 99.7 %; demo NLL 0.240 -> 0.100 / 0.108 / 0.097
    "sft_then_grpo": (0.4733, 0.3767, 0.4300),  # +19.7 / +10.0 / +15.3
}


def run(name: str, tmp_path: Path) -> tuple[dict, dict]:
    summary = train(RECIPES / f"{name}.yaml", out=tmp_path / name,
                    overrides={"eval.splits": ["id"], "eval.n": 300}, progress=False)
    before, after = summary["eval"]["before"]["id"], summary["eval"]["after"]["id"]
    assert before["accuracy"] == pytest.approx(BASE_ID_ACCURACY, abs=0.02)  # the shipped base, as measured
    return before, after


def sampled_reward_rise(run_dir: Path, window: int = 20) -> float:
    """Mean training reward of the last `window` steps minus the first `window` (64 samples a step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    return sum(rewards[-window:]) / window - sum(rewards[:window]) / window


def test_grpo_raises_id_accuracy(tmp_path):
    """Worst measured seed +9.3 points; threshold +5. The issue's target of +15 is not reached by this recipe
    on every seed (mean +14.0): see the recipe's comment."""
    before, after = run("grpo", tmp_path)
    assert after["accuracy"] - before["accuracy"] >= 0.05, (before, after)


def test_dapo_raises_id_accuracy(tmp_path):
    """Worst measured seed +9.3 points; threshold +5."""
    before, after = run("dapo", tmp_path)
    assert after["accuracy"] - before["accuracy"] >= 0.05, (before, after)


def test_dr_grpo_raises_sampled_reward_and_keeps_id_accuracy(tmp_path):
    """Dr. GRPO learns more slowly here than GRPO (greedy +2.3 / +6.0 / +9.7 points: without the std
    normaliser a group with one success out of eight carries a small advantage). What every seed shows is the
    sampled training reward rising (+6.0 to +9.2 points over 1280 samples a window; threshold +3) with greedy
    accuracy not falling (threshold: at most 1 point below the base)."""
    before, after = run("dr_grpo", tmp_path)
    assert sampled_reward_rise(tmp_path / "dr_grpo") >= 0.03
    assert after["accuracy"] >= before["accuracy"] - 0.01, (before, after)


def test_sft_then_grpo_ends_above_the_base(tmp_path):
    """Worst measured seed +10.0 points; threshold +5."""
    before, after = run("sft_then_grpo", tmp_path)
    assert after["accuracy"] - before["accuracy"] >= 0.05, (before, after)


def test_sft_lowers_demo_nll_and_teaches_the_format(tmp_path):
    """Held-out demonstration NLL 0.240 -> <= 0.108 on every seed (threshold 0.15); format adherence
    0 % -> >= 99.7 % (threshold 90 %)."""
    before, after = run("sft", tmp_path)
    assert before["demo_nll"] > 0.2 and after["demo_nll"] < 0.15, (before, after)
    assert before["format"] < 0.05 and after["format"] > 0.9, (before, after)
