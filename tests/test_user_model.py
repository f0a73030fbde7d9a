"""A user's own model (issue 12): a Qwen2 directory whose tokenizer holds one token past the model's embedding
rows (as transformers 5 loads Qwen2's `<|endoftext|>`). Only what can actually go wrong is refused."""
import copy
import json

import pytest

import posttrain
from posttrain.models import check_compatible, save_pretrained
from posttrain.tiny import tiny_model
from test_resume import RL_ROWS, SFT_ROWS
from letter_rewards import varied
from test_train_e2e import metrics

EXTRA = "<|extra|>"


@pytest.fixture(scope="module")
def user_model(tmp_path_factory, tokenizer):
    """A qwen2 model with exactly len(base vocabulary) rows, saved with a tokenizer one token longer."""
    model = tiny_model("qwen2", tokenizer, seed=0)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([EXTRA], special_tokens=True)
    assert len(tok) == model.get_input_embeddings().num_embeddings + 1
    path = tmp_path_factory.mktemp("user") / "qwen2-user"
    save_pretrained(model, tok, path, stop_ids=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    return str(path), model, tok


def test_a_token_past_the_rows_that_nothing_produces_is_accepted(user_model, caplog):
    _, model, tok = user_model
    with caplog.at_level("INFO", logger="posttrain"):
        check_compatible(model, tok)
    assert "'<|extra|>'" in caplog.text and "past the model's 320 embedding rows" in caplog.text


def test_a_pad_past_the_rows_falls_back_to_eos_and_an_eos_past_them_is_refused_naming_it(user_model):
    _, model, tok = user_model
    padded = copy.deepcopy(tok)
    padded.pad_token = EXTRA
    check_compatible(model, padded)
    assert padded.pad_token == padded.eos_token
    eos = copy.deepcopy(tok)
    eos.eos_token = EXTRA
    with pytest.raises(ValueError, match=r"has 320 rows, but training would feed it '<\|extra\|>' \(id 320, eos\).*"
                                         r"resize_embeddings: true"):
        check_compatible(model, eos)


def test_the_users_model_trains_and_a_row_holding_the_token_is_a_bad_row(user_model, tmp_path):
    path, _, _ = user_model
    for method, rows in (("sft", SFT_ROWS), ("grpo", RL_ROWS)):
        r = {"model": path, "device": "cpu", "stages": [{"method": method, "data": {}, "steps": 2,
                                                         "batch": {"size": 2},
                                                         "rollout": {"group_size": 2, "max_new_tokens": 4}}]}
        summary = posttrain.train(r, out=tmp_path / method, data=rows, rewards=[varied], progress=False)
        assert summary["stages"][method]["steps"] == 2
    bad_rows = SFT_ROWS[:3] + [{"messages": [{"role": "user", "content": f"say {EXTRA}"},
                                             {"role": "assistant", "content": "A"}]}]
    r = {"model": path, "device": "cpu", "stages": [{"method": "sft", "data": {}, "steps": 1}]}
    with pytest.raises(posttrain.data.DataError, match=r"row 4: contains the token '<\|extra\|>' \(id 320\), past "
                                                       r"the model's 320 embedding rows"):
        posttrain.train(r, out=tmp_path / "bad", data=bad_rows, progress=False)
    r["resize_embeddings"] = True  # the fix the message offers: the model gets a row for it, and trains
    summary = posttrain.train(r, out=tmp_path / "resized", data=bad_rows, progress=False)
    config = json.loads((tmp_path / "resized" / "final" / "config.json").read_text())
    assert summary["stages"]["sft"]["steps"] == 1 and config["vocab_size"] == 321
    assert metrics(tmp_path / "resized")[0]["loss"] > 0


def constant(prompts, completions, **kw):
    return [1.0] * len(completions)


def test_no_learning_signal_is_logged_every_step_and_warned_about(user_model, tmp_path, caplog):
    """Every group's rewards equal: zero_var_frac 1.0 in every record, loss and gradient 0, and one warning
    after 3 such steps; a reward that varies within groups gives a share below 1."""
    path, _, _ = user_model
    r = {"model": path, "device": "cpu", "stages": [{"method": "grpo", "data": {}, "steps": 4, "batch": {"size": 2},
                                                     "rollout": {"group_size": 4, "max_new_tokens": 4}}]}
    with caplog.at_level("WARNING", logger="posttrain"):
        posttrain.train(r, out=tmp_path / "flat", data=RL_ROWS, rewards=[constant], progress=False)
    recs = metrics(tmp_path / "flat")
    assert [x["zero_var_frac"] for x in recs] == [1.0] * 4 and all(x["grad_norm"] == 0 for x in recs)
    assert caplog.text.count("steps 1-3: in every group all rewards were equal") == 1
    posttrain.train(r, out=tmp_path / "varied", data=RL_ROWS, rewards=[varied], progress=False)
    assert all(x["zero_var_frac"] < 1 for x in metrics(tmp_path / "varied"))


def test_misreadable_settings_are_explained_in_the_log(user_model, tmp_path, caplog):
    path, _, _ = user_model
    r = {"model": path, "device": "cpu", "stages": [{"method": "grpo", "data": {"limit": 2}, "steps": 6,
                                                     "ppo_epochs": 2, "minibatches": 2, "batch": {"size": 4},
                                                     "rollout": {"group_size": 2, "max_new_tokens": 4}}]}
    with caplog.at_level("INFO", logger="posttrain"):
        posttrain.train(r, out=tmp_path / "run", data=RL_ROWS, rewards=[varied], progress=False)
    assert "6 optimizer steps are 2 rollout batches (ppo_epochs 2 x minibatches 2 = 4 updates per batch)" in caplog.text
    assert "2 rows for a batch of 4: rows repeat within every step" in caplog.text


def test_completions_are_saved_and_nll_is_logged_for_every_demonstration_stream(user_model, tmp_path):
    path, _, _ = user_model
    r = {"model": path, "device": "cpu", "stages": [{"method": "grpo", "data": {}, "steps": 4, "batch": {"size": 2},
                                                     "rollout": {"group_size": 2, "max_new_tokens": 4},
                                                     "samples": {"every": 2, "n": 3}}]}
    posttrain.train(r, out=tmp_path / "rl", data=RL_ROWS, rewards=[varied], progress=False)
    saved = [json.loads(x) for x in (tmp_path / "rl" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in saved] == [2, 2, 2, 4, 4, 4]
    assert all(set(s) >= {"prompt", "completion", "reward", "rewards", "id"} for s in saved)
    assert saved[0]["rewards"]["varied"] == saved[0]["reward"]
    for method in ("sft", "dft"):
        r = {"model": path, "device": "cpu", "stages": [{"method": method, "data": {}, "steps": 2}]}
        posttrain.train(r, out=tmp_path / method, data=SFT_ROWS, progress=False)
    sft, dft = metrics(tmp_path / "sft"), metrics(tmp_path / "dft")
    assert all(abs(x["nll"] - x["loss"]) < 1e-5 for x in sft)  # SFT's objective is the NLL
    assert dft[0]["nll"] == pytest.approx(sft[0]["nll"], abs=1e-5) and abs(dft[0]["loss"] - dft[0]["nll"]) > 1e-3


def test_methods_that_do_not_exist_yet_are_named_not_mistaken(tmp_path):
    from posttrain.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"method 'gkd' \(distillation\) is not in posttrain yet"):
        posttrain.train({"model": "m", "stages": [{"method": "gkd", "data": {}}]}, out=tmp_path / "r", progress=False)
    with pytest.raises(posttrain.data.DataError, match="the path does not exist"):
        posttrain.train({"model": "m", "stages": [{"method": "sft", "data": {"path": str(tmp_path / "nope.jsonl")}}]},
                        out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # a run that failed before it made anything leaves no directory


def test_accuracy_is_the_primary_rewards_success_rate_at_its_threshold(user_model, tmp_path):
    """Training: accuracy reads the reward marked primary (not the first listed) against its threshold."""
    path, _, _ = user_model
    r = {"model": path, "device": "cpu", "stages": [{"method": "grpo", "data": {}, "steps": 2, "batch": {"size": 2},
                                                     "rollout": {"group_size": 2, "max_new_tokens": 4},
                                                     "rewards": [{"fn": "letter_rewards:varied"},
                                                                 {"fn": "user_model_rewards:one", "primary": True,
                                                                  "weight": 0.0}]}]}
    (tmp_path / "user_model_rewards.py").write_text("def one(prompts, completions, **kw):\n"
                                                    "    return [1.0] * len(completions)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        posttrain.train(r, out=tmp_path / "run", data=RL_ROWS, progress=False)
    finally:
        sys.path.remove(str(tmp_path))
    recs = metrics(tmp_path / "run")
    assert all(x["accuracy"] == 1.0 and x["reward/varied"] < 1.0 for x in recs)


def test_eval_requires_a_verifier_reports_reward_mean_and_reads_another_answer_column(tmp_path, user_model, capsys):
    from posttrain.cli import main

    path, _, _ = user_model
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "Say A.", "answer": a, "completion": "7"}) for a in ("0.5", "1")))
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(data)]) == 2  # before the model loads
    assert "name the verifier of this data: --reward exact" in capsys.readouterr().err
    common = ["eval", "--model", path, "--data", str(data), "--reward", "reward_fns:from_answer", "--max-new-tokens",
              "2", "--json"]
    assert main(common) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 0.5 and out["reward_mean"] == 0.75  # 1.0 reaches the default threshold, 0.5 not
    assert main(common + ["--threshold", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert main(common + ["--answer-column", "completion", "--save-samples", str(tmp_path / "s.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["reward_mean"] == 7.0
    saved = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["reward"], x["answer"]) for x in saved] == [("Say A.", 7.0, "7")] * 2
    assert all(isinstance(x["completion"], str) for x in saved)


def test_a_wrong_eval_verifier_is_an_error_before_the_model_loads(tmp_path, user_model, capsys, monkeypatch):
    """A misspelled module or function, or a verifier that cannot take the data's columns: exit 2 with the
    reason, the model never loaded (what the user met: a traceback after loading it)."""
    import posttrain.eval.cli_eval as cli_eval
    from posttrain.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_eval, "load_policy", no_load)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_verifiers.py").write_text("def strict(prompts, completions, answer):\n    return [0.0]\n")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Say A.", "answer": "A"}) + "\n")
    for reward, words in (("my_verifierz:strict", "no module 'my_verifierz'"),
                          ("my_verifiers:strickt", "has no attribute 'strickt'; its public callables are: strict"),
                          ("my_verifiers:strict", "cannot be called with keywords"),
                          ("exakt", "unknown built-in reward 'exakt'")):
        assert main(["eval", "--model", user_model[0], "--data", str(data), "--reward", reward]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"posttrain: error: --reward {reward}: ") and words in err and "Traceback" not in err


@pytest.fixture(scope="module")
def no_template(tmp_path_factory, tokenizer):
    """A model saved with a tokenizer that has no chat template, and that tokenizer (with one) elsewhere."""
    root = tmp_path_factory.mktemp("tpl")
    model = tiny_model("llama", tokenizer, seed=0)
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    save_pretrained(model, bare, root / "model", stop_ids=stop)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    return root


def test_chat_data_without_a_chat_template_fails_before_the_model_loads_for_every_method(no_template, tmp_path,
                                                                                         capsys):
    from posttrain.cli import main
    from posttrain.recipe import RecipeError
    from posttrain.tiny import CHAT_TEMPLATE

    model = str(no_template / "model")
    for method, rows in (("grpo", RL_ROWS), ("sft", SFT_ROWS)):
        r = {"model": model, "device": "cpu", "stages": [{"method": method, "data": {}, "steps": 1,
                                                          "batch": {"size": 2},
                                                          "rollout": {"group_size": 2, "max_new_tokens": 4}}]}
        with pytest.raises(RecipeError, match=r"row 1 is a chat .* has no chat template; set `chat_template:`"):
            posttrain.train(r, out=tmp_path / method, data=rows, rewards=[varied], progress=False)
        template = tmp_path / "chatml.jinja"
        template.write_text(CHAT_TEMPLATE)
        for k, fix in enumerate(({"chat_template": str(template)}, {"tokenizer": str(no_template / "tokenizer")})):
            summary = posttrain.train({**r, **fix}, out=tmp_path / f"{method}-fix{k}", data=rows, rewards=[varied],
                                      progress=False)
            assert summary["stages"][method]["steps"] == 1
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "Say A."}], "answer": "A"}) + "\n")
    assert main(["eval", "--model", model, "--data", str(data), "--reward", "exact"]) == 2
    assert "row 1, field 'prompt': is a chat (a list of messages), but the tokenizer" in capsys.readouterr().err


def test_a_recipe_evaluates_on_the_users_own_data_and_verifier(user_model, tmp_path):
    from posttrain.recipe import RecipeError

    path, _, _ = user_model
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say {c}.", "answer": a}) for c, a in (("A", "1"), ("B", "0.5"))))
    r = {"model": path, "device": "cpu", "stages": [{"method": "sft", "data": {}, "steps": 2}],
         "eval": {"data": str(data), "reward": "reward_fns:from_answer", "every": 1, "curve_n": 2,
                  "max_new_tokens": 2}}
    summary = posttrain.train(r, out=tmp_path / "run", data=SFT_ROWS, progress=False)
    for when in ("before", "after"):
        assert summary["eval"][when]["data"]["accuracy"] == 0.5 and summary["eval"][when]["data"]["reward_mean"] == 0.75
    curve = [json.loads(x) for x in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 1, 2] and curve[-1]["data"]["reward_mean"] == 0.75
    for bad, words in (({"reward": "exact"}, "neither"), ({"task": "arith", "data": "x", "reward": "exact"}, "both"),
                       ({"data": "x"}, "eval.data needs eval.reward")):
        with pytest.raises(RecipeError, match=words):
            posttrain.train({**r, "eval": bad}, out=tmp_path / "bad", data=SFT_ROWS, progress=False)
