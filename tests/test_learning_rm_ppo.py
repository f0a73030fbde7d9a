"""Learning with a reward model and with PPO's critic, on the built-in task from the shipped base (slow).

As in test_learning_arith.py: the shipped recipes as committed, thresholds below the worst of three seeds
(MEASURED: a 2-core machine, two single-threaded runs at a time) with a margin, never from seed 0 alone.
"""
import json

import pytest

from posttrain.recipe import load_recipe, recipe_data
from posttrain.run import train
from test_learning_arith import BASE_ID_ACCURACY  # the shipped base, measured once

pytestmark = pytest.mark.slow

# builtin:ppo (the verifier's reward), greedy `id` accuracy after 150 steps, seeds 0 / 1 / 2
PPO_MEASURED = (0.4433, 0.4000, 0.5467)  # +19.3 / +15.0 / +29.7 points
# builtin:ppo_rm_ensemble (the worst case of the five shipped reward models, KL beta 0.1), greedy `id` after 150
# steps, seeds 0 / 1 / 2 / 3
ENSEMBLE_MEASURED = (0.3333, 0.3300, 0.3067, 0.2933)  # +8.3 / +8.0 / +5.7 / +4.3 points
# the reward-model stage of builtin:rm_then_ppo: pairwise accuracy on the 200 held-out rm_dev pairs, seeds 0 / 1 / 2
RM_MEASURED = (0.730, 0.740, 0.765)


def test_ppo_with_the_verifier_raises_id_accuracy(tmp_path):
    """PPO with a value model (worst seed +15.0 points; threshold +7: it must end clearly above the base)."""
    summary = train("builtin:ppo", out=tmp_path / "ppo", overrides={"eval.splits": ["id"]}, progress=False)
    before, after = summary["eval"]["before"]["id"], summary["eval"]["after"]["id"]
    assert before["accuracy"] == pytest.approx(BASE_ID_ACCURACY, abs=0.02)
    assert after["accuracy"] - before["accuracy"] >= 0.07, (before, after)
    assert "value_clipfrac" in summary["stages"]["ppo"]["final"]
    # The critic tracks the return's level as the policy improves: over the last 10 steps its mean value is within
    # 0.15 of the mean reward (measured 0.071 / 0.068 / 0.101 on seeds 0 / 1 / 2), having risen from the first 10
    # steps by more than 0.15 (+0.334 / +0.235 / +0.436). Its token-mean MSE is no test: most tokens come before
    # anything that predicts the outcome, so it stays near the reward's variance (last 10 steps: 0.25 / 0.22 /
    # 0.23 against 0.24 / 0.20 / 0.25).
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    first, last = rows[:10], rows[-10:]
    assert abs(mean("value_mean", last) - mean("reward_mean", last)) < 0.15, (first, last)
    assert mean("value_mean", last) - mean("value_mean", first) > 0.15, (first, last)


def test_a_reward_model_ranks_held_out_pairs_above_chance(tmp_path):
    """The reward model of builtin:rm_then_ppo on the held-out rm_dev pairs: overall above chance (worst seed
    0.730; threshold 0.68) and, on the kinds it learns clearly (a missing last step, a step too many), nearly
    always right (1.0 on every seed measured; threshold 0.9). Slips and miscopied operands stay near chance for
    this 0.3M-parameter backbone."""
    raw, _ = recipe_data("builtin:rm_then_ppo")
    raw["stages"] = raw["stages"][:1]
    raw.pop("eval")
    summary = train(raw, out=tmp_path / "rm", progress=False)
    ev = summary["stages"]["rm"]["eval"]
    assert ev["pref_accuracy"] >= 0.68, ev
    for kind in ("short", "extra"):
        assert ev["by_kind"][kind]["n"] > 20 and ev["by_kind"][kind]["pref_accuracy"] >= 0.9, ev


def test_ppo_with_an_ensemble_of_reward_models_raises_id_accuracy(tmp_path):
    """PPO rewarded only by the worst case of the five shipped reward models (the verifier only logged) ends above
    the base on every seed measured (worst seed +4.3 points; threshold +2)."""
    rewards = load_recipe("builtin:ppo_rm_ensemble").stages[0].rewards  # the verifier is logged, not optimised
    assert [(r.fn, r.weight != 0, r.ensemble) for r in rewards] == [("model", True, "min"), ("correct", False, None)]
    summary = train("builtin:ppo_rm_ensemble", out=tmp_path / "ppo", overrides={"eval.splits": ["id"]}, progress=False)
    before, after = summary["eval"]["before"]["id"], summary["eval"]["after"]["id"]
    assert before["accuracy"] == pytest.approx(BASE_ID_ACCURACY, abs=0.02)
    assert after["accuracy"] - before["accuracy"] >= 0.02, (before, after)
