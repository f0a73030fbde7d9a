"""`posttrain eval` on a dataset with a verifier, and `posttrain train` failing early on malformed data."""
import json

import pytest

from posttrain.cli import main
from posttrain.models import save_pretrained
from posttrain.tiny import tiny_model


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    out = tmp_path / "model"
    save_pretrained(tiny_model("qwen2", tokenizer, seed=0), tokenizer, out,
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    return str(out)


def test_eval_json_reports_accuracy_pass_at_k_and_length(tmp_path, model_dir, capsys):
    data = tmp_path / "rl.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
                                          "answer": str(i + 1)}) for i in range(6)))
    assert main(["eval", "--model", model_dir, "--data", str(data), "--reward", "numeric", "--samples", "4",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6 and 0.0 <= out["accuracy"] <= 1.0
    assert {"pass@1", "pass@2", "pass@4", "response_len"} <= set(out)
    assert out["pass@1"] <= out["pass@4"] and 1 <= out["response_len"] <= 5


def test_eval_user_reward_module(tmp_path, model_dir, capsys):
    data = tmp_path / "rl.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "Answer with the letter A.", "answer": "A"}) for _ in range(3)))
    assert main(["eval", "--model", model_dir, "--data", str(data), "--reward", "letter_rewards:answer_is_a",
                 "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_train_stops_on_malformed_row_naming_file_row_and_field(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    rows = [{"prompt": "ok", "completion": "fine"}, {"prompt": "ok", "completion": 5}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = tmp_path / "r.yaml"
    # the model path does not exist: the data error must come first, before any model loads
    recipe.write_text(f"model: {tmp_path}/no-model\nstages:\n  - method: sft\n    data: {{path: {data}}}\n")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "row 2" in err and "completion" in err


def test_cli_train_with_max_steps_and_overrides(tmp_path, model_dir, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say {i}.", "completion": f" {i}"}) for i in range(6)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\nstages:\n  - method: sft\n    data: {{path: {data}}}\n    steps: 50\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--max-steps", "2", "stages.0.optim.lr=0.002",
                 "stages.0.batch.size=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and "sft" in printed["stages"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["lr"] == 0.002
    assert "lr: 0.002" in (out / "config.yaml").read_text()
