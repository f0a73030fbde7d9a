"""Preference learning on the built-in task, from the SFT model: the shipped `builtin:sft_then_dpo` recipe,
then IPO, SimPO, ORPO and KTO from its SFT stage with its DPO stage's settings (KTO on the same pairs as
unpaired rows: chosen desirable, rejected not). Held-out pairs (`pref_dev`, 200): the worked solution against
the same working with one arithmetic slip.

IPO, SimPO and KTO train at lr 1e-5, a third of DPO's: at DPO's 3e-5 they cost the SFT model 5 to 19 points of
`id` (IPO -17.7 / -12.3 / -17.7, SimPO -16.7 / -9.0 / -14.7, KTO -10.7 / -5.3 / -18.7 on seeds 0 / 1 / 2).

Thresholds sit below the worst of seeds 0 / 1 / 2 (recipes/sft_then_dpo.yaml; MEASURED below), with margin:
DPO, IPO and KTO lift preference accuracy (KTO judged by DPO's margin) from chance (0.5: at the reference every
margin is 0) to >= 0.70 (worst seed 0.755); SimPO and ORPO rank every pair right already after SFT (by mean
log-prob), so their margin must grow, by more than 0.02 (worst seed +0.047); and no method lowers greedy `id`
accuracy (300 prompts) by more than 6 points (the worst seed: -4.0).
"""
import copy

import pytest

from posttrain.eval.preference import preference_accuracy
from posttrain.eval.task_eval import evaluate_task
from posttrain.models import load_policy, stop_token_ids
from posttrain.objective.preference import PreferenceSpec
from posttrain.recipe import load_recipe, recipe_data
from posttrain.run import train
from posttrain.tasks import get_task

pytestmark = pytest.mark.slow

# seed -> (preference accuracy or margin of the SFT model, after; `id` accuracy change in points)
MEASURED = {
    "dpo": ((0.5, 0.87, -4.0), (0.5, 0.905, -2.0), (0.5, 0.90, -1.3)),
    "ipo": ((0.5, 0.82, -3.7), (0.5, 0.78, -3.0), (0.5, 0.82, -2.0)),
    "simpo": ((2.461, 2.508, -3.7), (2.433, 2.483, -2.3), (2.421, 2.488, -1.0)),  # margins
    "orpo": ((6.575, 6.855, +0.7), (6.751, 7.085, +0.7), (6.502, 6.800, +1.0)),  # margins
    "kto": ((0.5, 0.78, -3.3), (0.5, 0.79, -1.7), (0.5, 0.755, -0.7)),
}
LR = {"ipo": 1e-5, "simpo": 1e-5, "kto": 1e-5}  # the others: the recipe's DPO stage (3e-5)


def _id(model, tok) -> float:
    return evaluate_task(model, tok, "arith", "id", n=300, max_new_tokens=48, stop_ids=stop_token_ids(tok, model),
                         pad_id=tok.pad_token_id)["accuracy"]


def test_preference_methods_rank_held_out_pairs_better_without_losing_task_accuracy(tmp_path):
    recipe, _ = recipe_data("builtin:sft_then_dpo")
    recipe.pop("eval")
    train(recipe, out=tmp_path / "dpo", progress=False)
    sft_dir = tmp_path / "dpo" / "stages" / "sft" / "model"
    finals = {"dpo": tmp_path / "dpo" / "final"}
    pairs = get_task("arith").rows("pref_train")
    unpaired = [{"prompt": x["prompt"], "completion": x[side], "label": side == "chosen"} for x in pairs
                for side in ("chosen", "rejected")]
    for method in ("ipo", "simpo", "orpo", "kto"):
        r = copy.deepcopy(recipe)
        stage = {k: v for k, v in recipe["stages"][1].items() if k in ("data", "steps", "optim", "schedule", "batch")}
        if method == "kto":
            stage["data"] = {"max_len": 128}
        if method in LR:
            stage["optim"] = {**stage["optim"], "lr": LR[method]}
        r.update(model=str(sft_dir), stages=[{**stage, "method": method, "name": method}])
        train(r, out=tmp_path / method, progress=False, data={"kto": unpaired} if method == "kto" else None)
        finals[method] = tmp_path / method / "final"
    sft, tok = load_policy(str(sft_dir))
    rows = get_task("arith").rows("pref_dev")
    sft_id = _id(sft, tok)
    assert sft_id > 0.85  # the SFT stage did its job (94.7 / 97.0 / 94.0 %)
    for method, path in finals.items():
        model, _ = load_policy(str(path))
        st = load_recipe({"model": "m", "stages": [{"method": method, "data": {"path": "x"},
                                                    **({"preference": {"beta": 0.5}} if method == "dpo" else {})}]})
        p = st.stages[0].preference
        spec = PreferenceSpec(method, p.beta, p.gamma, p.lam)
        before = preference_accuracy(sft, tok, rows, spec, ref_model=sft)
        after = preference_accuracy(model, tok, rows, spec, ref_model=sft)
        if method in ("dpo", "ipo", "kto"):
            assert before["pref_accuracy"] == 0.5 and after["pref_accuracy"] >= 0.70, (method, before, after)
        else:
            assert before["pref_accuracy"] == 1.0 and after["margin"] > before["margin"] + 0.02, (method, before,
                                                                                                  after)
        drop = sft_id - _id(model, tok)
        assert drop <= 0.06, (method, sft_id, drop)
