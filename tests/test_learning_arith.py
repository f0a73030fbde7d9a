"""Learning on the built-in `arith` task from the shipped base model, through the shipped recipes.

Each test runs a shipped recipe (`builtin:NAME`, the repository's `recipes/`) as committed (steps, batch,
learning rate, seed 0), evaluating only the `id` split (300 prompts, greedy, 48 new tokens) before and after,
and reads `summary.json`'s `eval.before` / `eval.after`. A run is deterministic on one machine, but another
CPU's kernels round differently and the trajectory drifts, so thresholds are set below the worst of three
recipe seeds (MEASURED, a 2-core machine, two single-threaded runs at a time) with a margin of about two
standard errors of the difference, not from the seed-0 run alone.
"""
from pathlib import Path

import pytest

from posttrain.run import train

pytestmark = pytest.mark.slow

BASE_ID_ACCURACY = 0.26  # builtin:tiny, greedy, first 300 `id` prompts

# Greedy `id` accuracy after each recipe, seeds 0 / 1 / 2 (the recipe with `seed=S`); wall time 60-120 s per
# RL run. The RL thresholds (+24 points) sit about two standard errors of the difference (~4 points at n=300)
# below the worst seed, and above the issue's +15.
MEASURED = {
    "grpo": (0.5900, 0.5800, 0.5833),           # +33.0 / +32.0 / +32.3 points
    "dapo": (0.5767, 0.6000, 0.6167),           # +31.7 / +34.0 / +35.7
    "dr_grpo": (0.5967, 0.6100, 0.5933),        # +33.7 / +35.0 / +33.3
    "sft": (0.5733, 0.5833, 0.5733),            # format 8.3 % -> 100 % (all seeds); demo NLL 0.363 -> 0.108 / 0.103 / 0.105
    "sft_then_grpo": (0.6033, 0.6300, 0.5833),  # +34.3 / +37.0 / +32.3
    # hybrids (recipes as shipped; each recipe's comment has the numbers)
    "luffy": (0.5733, 0.5733, 0.5333),          # +31.3 / +31.3 / +27.3; format 13 / 24 / 9 %
    "hpt": (0.4567, 0.4633, 0.4833),            # +19.7 / +20.3 / +22.3; format 100 / 100 / 99 %
    "chord_mu": (0.5333, 0.5200, 0.5100),       # +27.3 / +26.0 / +25.0; format 98 / 99 / 99 %
    "relift": (0.5633, 0.5933, 0.5800),         # +30.3 / +33.3 / +32.0; format 21 / 11 / 10 %
}
RL_GAIN = 0.24
# Hybrid thresholds: about 8 points (two standard errors of the difference, plus drift) below the worst seed.
HYBRID_GAIN = {"luffy": 0.19, "hpt": 0.12, "chord_mu": 0.17, "relift": 0.22}


def run(name: str, tmp_path: Path) -> tuple[dict, dict]:
    summary = train(f"builtin:{name}", out=tmp_path / name,
                    overrides={"eval.splits": ["id"], "eval.n": 300}, progress=False)
    before, after = summary["eval"]["before"]["id"], summary["eval"]["after"]["id"]
    assert before["accuracy"] == pytest.approx(BASE_ID_ACCURACY, abs=0.02)  # the shipped base, as measured
    return before, after


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "sft_then_grpo"])
def test_rl_recipes_raise_id_accuracy_by_15_points(name, tmp_path):
    """Worst measured seed: grpo +32.0, dapo +31.7, dr_grpo +33.3, sft_then_grpo +32.3 points; threshold +24."""
    before, after = run(name, tmp_path)
    assert after["accuracy"] - before["accuracy"] >= RL_GAIN, (before, after)


def test_sft_lowers_demo_nll_and_teaches_the_format(tmp_path):
    """Held-out demonstration NLL 0.363 -> <= 0.108 on every seed (threshold 0.15); format adherence
    8.3 % -> 100 % (threshold 90 %)."""
    before, after = run("sft", tmp_path)
    assert before["demo_nll"] > 0.3 and after["demo_nll"] < 0.15, (before, after)
    assert before["format"] < 0.2 and after["format"] > 0.9, (before, after)


@pytest.mark.parametrize("name", sorted(HYBRID_GAIN))
def test_hybrid_recipes_end_above_the_base(name, tmp_path):
    """LUFFY, HPT, CHORD and ReLIFT (worst measured seed: +27.3, +19.7, +25.0, +30.3 points on `id`); the two
    whose SFT term covers every step's questions (HPT on the failed ones, CHORD on expert rows) also teach the
    worked format (>= 98 % on every seed; threshold 90 %), which GRPO alone does not."""
    before, after = run(name, tmp_path)
    assert after["accuracy"] - before["accuracy"] >= HYBRID_GAIN[name], (before, after)
    if name in ("hpt", "chord_mu"):
        assert after["format"] > 0.9, (before, after)
