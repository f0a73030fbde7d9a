"""Preference stages end to end: pair data checked before step 0 (row numbers for identical, empty and
over-long pairs), implicit shared prompts, a reference computed once per batch, metrics that say whether
the chosen responses are ranked above the rejected ones, and recipes that cannot mean anything refused."""
import json

import pytest

import posttrain
from posttrain.data import DataError
from posttrain.recipe import RecipeError, load_recipe
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

PAIRS = [{"prompt": f"Say {c}.", "chosen": c, "rejected": c.lower() + "x"} for c in "ABCDEFGH"]
UNPAIRED = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"} for r in PAIRS
            for side in ("chosen", "rejected")]


def recipe(model, method, **stage):
    return {"model": model, "device": "cpu", "stages": [{"method": method, "data": {}, "steps": 4,
                                                        "batch": {"size": 4}, "optim": {"lr": 1e-3}, **stage}]}


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_each_preference_method_ranks_the_chosen_responses_higher_after_a_few_steps(tmp_path, model_dirs, method):
    posttrain.train(recipe(model_dirs["llama"], method), out=tmp_path / "run", data=UNPAIRED if method == "kto"
                    else PAIRS, progress=False)
    recs = metrics(tmp_path / "run")
    assert len(recs) == 4 and all(set(r) >= {"pref_accuracy", "margin", "reward_chosen", "reward_rejected", "loss"}
                                  for r in recs)
    assert recs[-1]["margin"] > recs[0]["margin"]
    # KTO judges each response against the batch's reference point, one row at a time: a looser bar
    assert recs[-1]["pref_accuracy"] == 1.0 if method != "kto" else recs[-1]["pref_accuracy"] > 0.5
    if method == "dpo":  # pi == pi_ref at the start: every margin 0, the loss log 2
        assert recs[0]["margin"] == 0.0 and recs[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    if method == "kto":  # at the start r = 0 and z0 = 0: each row's loss is 1 - sigma(0)
        assert recs[0]["margin"] == 0.0 and recs[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_bad_pairs_are_reported_with_their_rows_before_step_0_and_implicit_prompts_are_split(tmp_path, model_dirs):
    rows = [PAIRS[0], {"prompt": "Say B.", "chosen": "B", "rejected": "B"},
            {"prompt": "Say C.", "chosen": " ", "rejected": "c"}, {"prompt": "Say D.", "chosen": "D" * 400,
                                                                     "rejected": "d"},
            {"chosen": [{"role": "user", "content": "Say E."}, {"role": "assistant", "content": "E"}],
             "rejected": [{"role": "user", "content": "Say E."}, {"role": "assistant", "content": "e"}]}]
    r = recipe(model_dirs["llama"], "dpo", data={"max_bad_fraction": 0.0})
    with pytest.raises(DataError) as e:
        posttrain.train(r, out=tmp_path / "bad", data=rows, progress=False)
    text = str(e.value)
    assert "3 of 5 rows are bad" in text and "row 2, field 'rejected': equals 'chosen'" in text
    assert "row 3, field 'chosen': is an empty response" in text and "row 4: is 406 tokens long" in text
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    r["stages"][0]["data"]["max_bad_fraction"] = 0.7
    posttrain.train(r, out=tmp_path / "ok", data=rows, progress=False)  # the implicit-prompt row 5 trains
    bad = [json.loads(x)["row"] for x in (tmp_path / "ok" / "bad_rows.jsonl").read_text().splitlines()]
    assert bad == [2, 3, 4]


def test_recipes_that_mix_preference_and_other_parts_are_refused():
    base = {"model": "m", "stages": [{"method": "dpo", "data": {"path": "x.jsonl"}}]}
    for override, words in ((["stages.0.rewards=[{fn: exact}]"], "trains on preferences and uses no rewards"),
                            (["stages.0.advantage.kind=group_zscore"], "do not go together"),
                            (["stages.0.kl.beta=0.1"], "has no KL or entropy term of its own"),
                            (["stages.0.entropy.coef=0.01"], "has no KL or entropy term of its own"),
                            (["stages.0.streams.demo.aggregation=tok"], "fixes its stream's components")):
        with pytest.raises(RecipeError, match=words):
            load_recipe(base, override)
    with pytest.raises(RecipeError, match="do not go together"):
        load_recipe({"model": "m", "stages": [{"method": "grpo", "data": {"path": "x"}, "rewards": [{"fn": "exact"}],
                                               "advantage": {"kind": "dpo"}}]})
    st = load_recipe(base, ["stages.0.preference.beta=0.3"]).stages[0]
    assert (st.preference.beta, st.streams.demo.aggregation) == (0.3, "pair")


def test_online_dpo_pairs_each_groups_best_and_worst_sample_and_skips_groups_without_a_preference():
    """Experience._sampled_pairs: per group the highest and the lowest reward (first of equals); a group whose
    rewards are all equal give no pair, a sample whose reward failed (NaN) is left out."""
    import math

    import torch

    from posttrain.data.batch import ROLLOUT, Row
    from posttrain.training.experience import Experience, _Rows

    def row(group, token, truncated=False):
        return Row([1, 2, token], [0, 1, 1], ROLLOUT, group, truncated=truncated)

    part = _Rows()
    for group, token, reward, trunc in ((0, 10, 0.0, False), (0, 11, 1.0, False), (0, 12, 0.5, False),
                                        (0, 13, 1.0, False), (1, 20, 1.0, False), (1, 21, 1.0, False),
                                        (2, 30, math.nan, False), (2, 31, 0.0, False), (2, 32, 2.0, True),
                                        (2, 33, 0.2, False)):
        part.rows.append(row(group, token, trunc))
        part.rewards.append(reward)
    exp = Experience.__new__(Experience)
    exp.pad_id, exp.ref_model = 0, "ref"
    exp._logp = lambda model, batch, temperature=None: torch.zeros_like(batch.loss_mask)
    values = {}
    batch = exp._sampled_pairs(part, values)
    assert batch.input_ids[:, 2].tolist() == [11, 10, 32, 31]  # (chosen, rejected) of groups 0 and 2
    assert batch.pair_sign.tolist() == [1.0, -1.0, 1.0, -1.0] and batch.stream.tolist() == [ROLLOUT] * 4
    assert values["pair_frac"] == pytest.approx(2 / 3)
    tied = _Rows()
    tied.rows, tied.rewards = [row(0, 1), row(0, 2)], [1.0, 1.0]
    assert exp._sampled_pairs(tied, values) is None and values["pair_frac"] == 0.0


def test_refreshing_the_reference_is_only_for_online_dpo_without_lora():
    base = {"model": "m", "stages": [{"method": "dpo", "data": {"path": "x.jsonl"}}]}
    with pytest.raises(RecipeError, match="refresh_every renews the reference of online DPO"):
        load_recipe(base, ["stages.0.preference.refresh_every=10"])
    online = {"model": "m", "stages": [{"method": "online_dpo", "data": {"path": "x"}, "rewards": [{"fn": "exact"}],
                                        "preference": {"refresh_every": 10}}]}
    assert load_recipe(online).stages[0].preference.refresh_every == 10
    with pytest.raises(RecipeError, match="cannot be refreshed"):
        load_recipe(online, ["stages.0.lora.r=4"])
