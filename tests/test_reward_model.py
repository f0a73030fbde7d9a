"""Reward models: method `reward_model` (a Bradley-Terry scalar head on the policy's backbone) and the reward
`{fn: model, path: ...}` an RL stage scores completions with.

The oracle is independent of posttrain's pooling: transformers' own *ForSequenceClassification forward (which
finds each row's last token by `pad_token_id`) gives the scores of the textbook loss -log sigma(r_w - r_l),
differentiated by autograd; the trainer's gradient, accumulated over micro-batches, must equal it.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_preference import PAIRS
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)
from transformers import AutoModelForSequenceClassification

import posttrain
from posttrain.data.batch import pair_batch
from posttrain.data.encode import encode_pair, encode_response
from posttrain.recipe import RecipeError, load_recipe
from posttrain.reward_model import EnsembleReward, ModelReward, calibrate, from_policy, sequence_scores
from posttrain.training.update import ObjectiveSpec, accumulate_gradients


def _stage():
    return load_recipe({"model": "m", "stages": [{"method": "reward_model", "data": {"path": "x.jsonl"}}]}).stages[0]


def test_bradley_terry_gradient_through_the_trainer_equals_the_textbook_loss_on_transformers_scores(make_model,
                                                                                                   tokenizer_with_pad):
    tok = tokenizer_with_pad
    torch.manual_seed(0)
    rm = from_policy(make_model("llama", dtype=torch.float64), tok.pad_token_id)
    with torch.no_grad():  # a head away from its init, so the margins are not all near 0
        rm.score.weight.normal_(0, 0.5)
    pairs = [encode_pair({"prompt": r["prompt"], "chosen": r["chosen"] * (i + 1), "rejected": r["rejected"]}, tok)
             for i, r in enumerate(PAIRS[:5])]  # unequal lengths: right padding inside every micro-batch
    b = pair_batch(pairs, tok.pad_token_id, dtype=torch.float64)
    spec = ObjectiveSpec.from_stage(_stage())
    assert spec.reward_model and spec.preference is None
    rm.zero_grad()
    stats = accumulate_gradients(rm, b, spec, micro_size=4, device="cpu")  # micro-batches of 2 pairs, 2, 1
    got = {n: p.grad.clone() for n, p in rm.named_parameters()}

    rm.zero_grad()
    r = rm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.squeeze(-1)  # transformers' pooling
    loss = -F.logsigmoid(r[0::2] - r[1::2]).mean()
    loss.backward()
    assert float(stats[0]) == pytest.approx(float(loss.detach()), abs=1e-10)  # the logged loss is the BT loss
    for n, p in rm.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-11, msg=n)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in rm.named_parameters() if not n.startswith("score"))
    # posttrain's pooling by the attention mask reads the same token as transformers' by the pad id
    torch.testing.assert_close(sequence_scores(rm, b.input_ids, b.attention_mask).detach(), r.detach())


def test_a_reward_model_stage_saves_a_model_transformers_loads_and_the_rl_stage_after_it_is_scored_by_it(
        tmp_path, model_dirs):
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    kinds = ["early" if r["chosen"] < "E" else "late" for r in PAIRS]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({**r, "kind": k}) + "\n" for r, k in zip(PAIRS, kinds)))
    prompts = [{"prompt": r["prompt"], "answer": r["chosen"]} for r in PAIRS]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    pairs = {"path": str(tmp_path / "pairs.jsonl")}
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [
        {"name": "rm", "method": "reward_model", "data": pairs, "heldout": {"path": str(tmp_path / "heldout.jsonl")},
         "steps": 6,
         "batch": {"size": 4}, "optim": {"lr": 3e-3}},
        {"method": "grpo", "data": {"path": str(tmp_path / "prompts.jsonl")}, "steps": 2, "batch": {"size": 2},
         "rollout": {"group_size": 4, "max_new_tokens": 4},
         "rewards": [{"fn": "model", "path": "rm", "weight": 0.5}, {"fn": "exact"}]}]}
    summary = posttrain.train(r, out=tmp_path / "run", progress=False)
    ev = summary["stages"]["rm"]["eval"]
    assert ev["n"] == len(PAIRS) and ev["pref_accuracy"] > 0.5  # its own training pairs, after 6 steps
    # per kind: the same pairs' margins and wins, again from the saved model's own scores, pair by pair
    rm = ModelReward(str(tmp_path / "run" / "stages" / "rm" / "model"))
    for kind in ("early", "late"):
        rows = [p for p, k in zip(PAIRS, kinds) if k == kind]
        margins = [rm([p["prompt"]], [p["chosen"]])[0] - rm([p["prompt"]], [p["rejected"]])[0] for p in rows]
        assert ev["by_kind"][kind] == pytest.approx({"n": 4, "pref_accuracy": sum(m > 0 for m in margins) / 4,
                                                     "margin": sum(margins) / 4}, abs=1e-5)
    assert sum(v["pref_accuracy"] for v in ev["by_kind"].values()) / 2 == pytest.approx(ev["pref_accuracy"])
    recs = metrics(tmp_path / "run")
    rm_recs = [x for x in recs if x["stage"] == "rm"]
    assert len(rm_recs) == 6 and rm_recs[-1]["margin"] > rm_recs[0]["margin"]
    assert rm_recs[0]["loss"] == pytest.approx(0.6931, abs=0.05)  # a fresh head scores near 0: about log 2
    rl = [x for x in recs if x["stage"] == "grpo"]
    assert len(rl) == 2 and all("reward/model" in x and "reward/exact" in x for x in rl)
    for x in rl:  # the total is the weighted sum
        assert x["reward_mean"] == pytest.approx(0.5 * x["reward/model"] + x["reward/exact"], abs=1e-6)

    where = tmp_path / "run" / "stages" / "rm" / "model"
    hf = AutoModelForSequenceClassification.from_pretrained(where).eval()
    assert hf.config.num_labels == 1
    fn = ModelReward(str(where))
    got = fn([p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS])
    for p, score in zip(PAIRS, got):
        ids = torch.tensor([encode_response(p["prompt"], p["chosen"], fn.tok).input_ids])
        assert score == pytest.approx(float(hf(input_ids=ids).logits[0, 0]), abs=1e-5)
    # the policy went on from the model the run started with, not from the reward model
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("stage, message", [
    ({"method": "grpo", "rewards": [{"fn": "model"}]}, "{fn: model, path: DIR}"),
    ({"method": "grpo", "rewards": [{"fn": "exact", "path": "rm"}]}, "belongs to fn: model only"),
    ({"method": "dpo", "heldout": {"path": "p.jsonl"}}, "`heldout` pairs are scored after a reward_model stage"),
    ({"method": "reward_model", "lora": {"r": 4}}, "remove `lora`"),
    ({"method": "reward_model", "advantage": {"kind": "dpo"}}, "only method reward_model trains a scalar head"),
    ({"method": "dpo", "advantage": {"kind": "bradley_terry"}}, "only method reward_model trains a scalar head"),
    ({"method": "reward_model", "kl": {"beta": 0.1}}, "no KL or entropy term"),
    ({"method": "grpo", "rewards": [{"fn": "model", "path": ["a"]}]}, "lists at least two paths"),
    ({"method": "grpo", "rewards": [{"fn": "model", "path": "a", "ensemble": "min"}]}, "give `path` as a list"),
    ({"method": "grpo", "rewards": [{"fn": "model", "path": ["a", "b"], "ensemble": "max"}]}, "'min' or 'mean'"),
])
def test_reward_model_recipes_that_cannot_mean_anything_are_refused(stage, message):
    with pytest.raises((RecipeError, ValueError)) as e:
        load_recipe({"model": "m", "stages": [{"data": {"path": "x.jsonl"}, **stage}]})
    assert message in str(e.value)


def test_a_reward_model_stage_must_come_before_the_stage_it_scores():
    stages = [{"method": "grpo", "data": {"path": "p.jsonl"}, "rewards": [{"fn": "model", "path": "rm"}]},
              {"name": "rm", "method": "reward_model", "data": {"path": "x.jsonl"}}]
    with pytest.raises(RecipeError, match="must be a reward_model stage that runs before it"):
        load_recipe({"model": "m", "stages": stages})
    stages[1]["method"] = "dpo"
    with pytest.raises(RecipeError, match="must be a reward_model stage"):
        load_recipe({"model": "m", "stages": stages[::-1]})
    load_recipe({"model": "m", "stages": [{**stages[1], "method": "reward_model"}, stages[0]]})


def test_a_reward_model_path_that_does_not_load_is_a_recipe_error_before_step_0(tmp_path, model_dirs):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Say A.", "answer": "A"}) + "\n")
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [
        {"method": "grpo", "data": {"path": str(tmp_path / "prompts.jsonl")}, "steps": 1,
         "rewards": [{"fn": "model", "path": str(tmp_path / "nothing-here")}]}]}
    with pytest.raises(RecipeError, match="reward model .*nothing-here"):
        posttrain.train(r, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_ensemble_of_reward_model_stages_pays_the_worst_of_their_standardised_scores(tmp_path, model_dirs):
    """Each reward_model stage records the mean and standard deviation of its scores over both responses of its
    training pairs (in its summary and its saved config.json); {fn: model, path: [A, B]} pays, for each
    completion, min_k (r_k - mean_k) / std_k, checked against each saved model's own scores."""
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["chosen"]}) + "\n"
                                                    for r in PAIRS))
    rm = {"method": "reward_model", "data": {"path": str(tmp_path / "pairs.jsonl")}, "steps": 3, "batch": {"size": 4},
          "optim": {"lr": 3e-3}}
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [
        {"name": "a", **rm}, {"name": "b", **rm},
        {"method": "grpo", "data": {"path": str(tmp_path / "prompts.jsonl")}, "steps": 2, "batch": {"size": 2},
         "rollout": {"group_size": 4, "max_new_tokens": 4}, "samples": {"every": 1, "n": 8},
         "rewards": [{"fn": "model", "path": ["a", "b"]}]}]}
    assert load_recipe(r).stages[2].rewards[0].ensemble == "min"  # the default for a list
    summary = posttrain.train(r, out=tmp_path / "run", progress=False)
    members = []
    for name in ("a", "b"):
        where = tmp_path / "run" / "stages" / name / "model"
        cfg = json.loads((where / "config.json").read_text())
        raw = ModelReward(str(where))
        scores = torch.tensor(raw([p["prompt"] for p in PAIRS] * 2, [p["chosen"] for p in PAIRS] +
                                  [p["rejected"] for p in PAIRS]), dtype=torch.float64)
        assert cfg["score_n"] == summary["stages"][name]["score_n"] == 2 * len(PAIRS)
        assert cfg["score_mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
        assert cfg["score_std"] == pytest.approx(float(scores.std()), abs=1e-5) and cfg["score_std"] > 0
        members.append((raw, cfg["score_mean"], cfg["score_std"]))
    assert members[0][1] != members[1][1]  # two different models
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    for x in samples:
        z = [(m([x["prompt"]], [x["completion"]])[0] - mean) / std for m, mean, std in members]
        assert x["rewards"]["model"] == pytest.approx(min(z), abs=1e-5)
    # the mean over members, and a member without statistics refused with what to do
    where = [str(tmp_path / "run" / "stages" / n / "model") for n in ("a", "b")]
    prompts, completions = [p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS]
    z = torch.tensor([[(v - mean) / std for v in m(prompts, completions)] for m, mean, std in members])
    assert EnsembleReward(where, ensemble="mean")(prompts, completions) == pytest.approx(z.mean(0).tolist(), abs=1e-5)
    cfg = json.loads((tmp_path / "run" / "stages" / "a" / "model" / "config.json").read_text())
    for k in ("score_mean", "score_std", "score_n"):
        cfg.pop(k)
    (tmp_path / "run" / "stages" / "a" / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no score statistics.*calibrate"):
        EnsembleReward(where)
    # calibrate: the statistics of the model's scores on the responses given, written to its config.json
    stats = calibrate(where[0], prompts, completions)
    scores = torch.tensor(members[0][0](prompts, completions), dtype=torch.float64)
    assert stats == pytest.approx({"score_mean": float(scores.mean()), "score_std": float(scores.std()),
                                   "score_n": len(PAIRS)})
    assert ModelReward(where[0], normalize=True)(prompts, completions) == pytest.approx(
        ((scores - scores.mean()) / scores.std()).tolist(), abs=1e-5)
