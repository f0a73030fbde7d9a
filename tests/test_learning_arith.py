"""Learning on the built-in `arith` task from the shipped base model, through the shipped recipes.

Each test runs a shipped recipe (`builtin:NAME`, the repository's `recipes/`) as committed (steps, batch,
learning rate, seed 0), evaluating only the `id` split (300 prompts, greedy, 48 new tokens) before and after,
and reads `summary.json`'s `eval.before` / `eval.after`. A run is deterministic on one machine, but another
CPU's kernels round differently and the trajectory drifts, so thresholds are set below the worst of three
recipe seeds (MEASURED, a 2-core machine, two single-threaded runs at a time) with a margin of about two
standard errors of the difference (~8 points at n=300 with drift), not from the seed-0 run alone. One test
per method family: SFT, the GRPO family (grpo, and grpo with LoRA adapters), SFT then GRPO, the four
hybrids, and on-policy distillation. (Preference methods: tests/test_learning_preference.py.)
"""
from pathlib import Path

import pytest

from posttrain.run import train

pytestmark = pytest.mark.slow

BASE_ID_ACCURACY = 0.25  # builtin:tiny, greedy, first 300 `id` prompts (BUILD.json: 27.8 % of 500)

# Greedy `id` accuracy after each recipe, seeds 0 / 1 / 2 (the recipe with `seed=S`); each recipe's comment
# says how its settings were chosen and what the alternatives measured.
MEASURED = {
    "sft": (0.8167, 0.8900, 0.8600),            # +52.7 / +60.0 / +57.0; format 0.3 % -> 100 %; demo NLL 0.249 -> <= 0.021
    "grpo": (0.7467, 0.8000, 0.7867),           # +45.7 / +51.0 / +49.7 (16 prompts per step)
    "grpo_lora": (0.7400, 0.8233, 0.7733),      # +45.0 / +53.3 / +48.3 (LoRA r 16, lr 2e-3)
    "dapo": (0.8100, 0.4933, 0.8367),           # +52.0 / +20.3 / +54.7
    "dr_grpo": (0.3900, 0.4300, 0.5833),        # +10.0 / +14.0 / +29.3
    "sft_then_grpo": (0.7433, 0.7933, 0.7733),  # +45.3 / +50.3 / +48.3
    "luffy": (0.4167, 0.4300, 0.4067),          # +12.7 / +14.0 / +11.7
    "hpt": (0.4433, 0.5233, 0.4533),            # +15.3 / +23.3 / +16.3 (16 prompts per step); format 100 %
    "chord_mu": (0.8200, 0.6467, 0.4633),       # +53.0 / +35.7 / +17.3; format 100 / 100 / 98 %
    "relift": (0.5667, 0.5633, 0.4267),         # +27.7 / +27.3 / +13.7
    "opd": (0.7133, 0.7333, 0.7233),            # +42.3 / +44.3 / +43.3; format 100 % (from builtin:tiny-teacher)
}
# Thresholds on the gain in points: about 8 below the worst seed, and never below +2 (the recipe must end
# above the base); grpo's is the spine issue's +15 with room to spare.
GAIN = {"grpo": 0.35, "grpo_lora": 0.35, "sft_then_grpo": 0.35, "opd": 0.34,
        "luffy": 0.04, "hpt": 0.08, "chord_mu": 0.09, "relift": 0.06}


def run(name: str, tmp_path: Path) -> tuple[dict, dict]:
    summary = train(f"builtin:{name}", out=tmp_path / name,
                    overrides={"eval.splits": ["id"], "eval.n": 300}, progress=False)
    before, after = summary["eval"]["before"]["id"], summary["eval"]["after"]["id"]
    assert before["accuracy"] == pytest.approx(BASE_ID_ACCURACY, abs=0.02)  # the shipped base, as measured
    return before, after


def test_sft_lowers_demo_nll_and_teaches_the_format(tmp_path):
    """Held-out demonstration NLL 0.249 -> <= 0.021 on every seed (threshold 0.06); format adherence 0.3 % ->
    100 % (threshold 90 %); `id` accuracy +52.7 / +60.0 / +57.0 points (threshold +40)."""
    before, after = run("sft", tmp_path)
    assert before["demo_nll"] > 0.2 and after["demo_nll"] < 0.06, (before, after)
    assert before["format"] < 0.05 and after["format"] > 0.9, (before, after)
    assert after["accuracy"] - before["accuracy"] >= 0.40, (before, after)


@pytest.mark.parametrize("name", ["grpo", "grpo_lora", "sft_then_grpo"])
def test_rl_recipes_raise_id_accuracy(name, tmp_path):
    """grpo (worst seed +45.7) by at least 35 points, LoRA GRPO (+45.0) and sft_then_grpo (+45.3) too. The
    GRPO variants dapo (+20.3 at worst) and dr_grpo (+10.0) have no learning test of their own (one per
    family, within the suite's time budget): their objectives are checked against their formulas, and their
    measured gains stay in MEASURED and in their recipes' comments."""
    before, after = run(name, tmp_path)
    assert after["accuracy"] - before["accuracy"] >= GAIN[name], (before, after)


@pytest.mark.parametrize("name", ["luffy", "hpt", "chord_mu", "relift"])
def test_hybrid_recipes_end_above_the_base(name, tmp_path):
    """LUFFY, HPT, CHORD and ReLIFT (worst measured seed: +11.7, +15.3, +17.3, +13.7 points on `id`); the two
    whose SFT term covers every step's questions (HPT on the failed ones, CHORD on expert rows) also teach the
    worked format (>= 98 % on every seed; threshold 90 %), which GRPO alone does not (~0 %)."""
    before, after = run(name, tmp_path)
    assert after["accuracy"] - before["accuracy"] >= GAIN[name], (before, after)
    if name in ("hpt", "chord_mu"):
        assert after["format"] > 0.9, (before, after)


def test_on_policy_distillation_from_the_teacher_raises_id_accuracy_and_teaches_its_format(tmp_path):
    """OPD from builtin:tiny-teacher (81.7 %): +42.3 / +44.3 / +43.3 points on `id` (threshold +34), and the
    teacher's worked format on 100 % of answers on every seed (threshold 90 %), with no reward optimised."""
    before, after = run("opd", tmp_path)
    assert after["accuracy"] - before["accuracy"] >= GAIN["opd"], (before, after)
    assert after["format"] > 0.9, (before, after)
