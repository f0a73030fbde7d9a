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
    "sft": (0.9467, 0.9700, 0.9400),            # +69.7 / +72.0 / +69.0; format 1 % -> 100 %; demo NLL 0.272 -> <= 0.010
    "grpo": (0.5600, 0.4967, 0.4800),           # +31.0 / +24.7 / +23.0 (16 prompts per step, lr 3e-4)
    "grpo_lora": (0.5800, 0.6700, 0.5600),      # +33.0 / +42.0 / +31.0 (LoRA r 16, lr 1.2e-3; at 2e-3 seed 0 ended
    #                                             +31.7 or -14.3, by rounding and draws: a collapse, so lr came down)
    "dapo": (0.5400, 0.4567, 0.5967),           # +29.0 / +20.7 / +34.7
    "dr_grpo": (0.4867, 0.3633, 0.3733),        # +23.7 / +11.3 / +12.3
    "sft_then_grpo": (0.9467, 0.9767, 0.9467),  # +69.7 / +72.7 / +69.7 (SFT alone +69.7 / +72.0 / +69.0)
    "luffy": (0.5900, 0.5533, 0.5167),          # +34.0 / +30.3 / +26.7
    "hpt": (0.6167, 0.6500, 0.6533),            # +36.7 / +40.0 / +40.3 (16 prompts per step); format 100 %
    "chord_mu": (0.8833, 0.8767, 0.7400),       # +63.3 / +62.7 / +49.0; format 100 %
    "relift": (0.6767, 0.6700, 0.6600),         # +42.7 / +42.0 / +41.0 (on an Intel Xeon, whose kernels round
    #                                             otherwise: +30.7 / +21.0 / +34.3, seed 3 +31.7)
    "opd": (0.7933, 0.9033, 0.8633),            # +54.3 / +65.3 / +61.3; format 100 % (from builtin:tiny-teacher;
    #                                             before the fused AdamW and one-uniform sampling: +63.7 / +63.0 / +66.0)
}
# Thresholds on the gain in points: about 8 below the worst seed; grpo's is the spine issue's +15. The seeds were
# measured on an AMD EPYC; relift's also on an Intel Xeon, where seed 0 (the test's) ended at +30.7, under the
# +33 set from the EPYC's seeds: a CPU's rounding moves a run as a seed does.
GAIN = {"grpo": 0.15, "grpo_lora": 0.20, "sft_then_grpo": 0.61, "opd": 0.46,
        "luffy": 0.19, "hpt": 0.29, "chord_mu": 0.41, "relift": 0.13}


def run(name: str, tmp_path: Path) -> tuple[dict, dict]:
    summary = train(f"builtin:{name}", out=tmp_path / name,
                    overrides={"eval.splits": ["id"], "eval.n": 300}, progress=False)
    before, after = summary["eval"]["before"]["id"], summary["eval"]["after"]["id"]
    assert before["accuracy"] == pytest.approx(BASE_ID_ACCURACY, abs=0.02)  # the shipped base, as measured
    return before, after


def test_sft_lowers_demo_nll_and_teaches_the_format(tmp_path):
    """Held-out demonstration NLL 0.272 -> <= 0.010 on every seed (threshold 0.06); format adherence 1 % ->
    100 % (threshold 90 %); `id` accuracy +69.7 / +72.0 / +69.0 points (threshold +60)."""
    before, after = run("sft", tmp_path)
    assert before["demo_nll"] > 0.2 and after["demo_nll"] < 0.06, (before, after)
    assert before["format"] < 0.05 and after["format"] > 0.9, (before, after)
    assert after["accuracy"] - before["accuracy"] >= 0.60, (before, after)


@pytest.mark.parametrize("name", ["grpo", "grpo_lora", "sft_then_grpo"])
def test_rl_recipes_raise_id_accuracy(name, tmp_path):
    """grpo (worst seed +23.0) by at least 15 points, LoRA GRPO (+31.0) by 20, sft_then_grpo (+69.7) by 61. The
    GRPO variants dapo (+20.7 at worst) and dr_grpo (+11.3) have no learning test of their own (one per
    family, within the suite's time budget): their objectives are checked against their formulas, and their
    measured gains stay in MEASURED and in their recipes' comments."""
    before, after = run(name, tmp_path)
    assert after["accuracy"] - before["accuracy"] >= GAIN[name], (before, after)


@pytest.mark.parametrize("name", ["luffy", "hpt", "chord_mu", "relift"])
def test_hybrid_recipes_end_above_the_base(name, tmp_path):
    """LUFFY, HPT, CHORD and ReLIFT (worst measured seed: +26.7, +36.7, +49.0, +21.0 points on `id`); the two
    whose SFT term covers every step's questions (HPT on the failed ones, CHORD on expert rows) also teach the
    worked format (>= 99.7 % on every seed; threshold 90 %), which GRPO alone does not (~0 %)."""
    before, after = run(name, tmp_path)
    assert after["accuracy"] - before["accuracy"] >= GAIN[name], (before, after)
    if name in ("hpt", "chord_mu"):
        assert after["format"] > 0.9, (before, after)


def test_on_policy_distillation_from_the_teacher_raises_id_accuracy_and_teaches_its_format(tmp_path):
    """OPD from builtin:tiny-teacher (94.7 %): +54.3 / +65.3 / +61.3 points on `id` (threshold +46), and the
    teacher's worked format on >= 99.7 % of answers on every seed (threshold 90 %), with no reward optimised."""
    before, after = run("opd", tmp_path)
    assert after["accuracy"] - before["accuracy"] >= GAIN["opd"], (before, after)
    assert after["format"] > 0.9, (before, after)
