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
                            (["stages.0.advantage.kind=group_zscore"], "do not go together")):
        with pytest.raises(RecipeError, match=words):
            load_recipe(base, override)
    with pytest.raises(RecipeError, match="do not go together"):
        load_recipe({"model": "m", "stages": [{"method": "grpo", "data": {"path": "x"}, "rewards": [{"fn": "exact"}],
                                               "advantage": {"kind": "dpo"}}]})
    st = load_recipe(base, ["stages.0.preference.beta=0.3"]).stages[0]
    assert (st.preference.beta, st.streams.demo.aggregation) == (0.3, "pair")
