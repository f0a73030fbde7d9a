"""Bad input, all of it, before step 0: fuzzed rows (missing and mistyped fields, empty turns, unknown roles,
invalid UTF-8, a truncated last line, over-long rows and prompts, a 10 MB row, a column that only the first
rows have) are each reported with their line and reason in OUT/bad_rows.jsonl; by default (max_bad_fraction
0) the run stops before the model loads, listing them, and with a tolerance it drops them and trains."""
import json

import pytest

import posttrain
from letter_rewards import varied
from posttrain.data.loading import DataError
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)


def msg(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = [msg(f"Say {c}.", c) for c in "ABCDEFGHIJKL"]
# (line written to the file, expected field, words of the reason); the file interleaves them with GOOD rows
FUZZ = [
    (json.dumps({"text": "no messages column"}), "messages", "missing"),
    (json.dumps({"messages": []}), "messages", "non-empty list"),
    (json.dumps({"messages": "hi"}), "messages", "non-empty list"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "messages", "role 'wizard'"),
    (json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]}),
     "messages", "string 'content'"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "messages", "no assistant message"),
    ('{"messages": [1, 2', None, "not valid JSON"),
    (b'{"messages": "caf\xe9"}', None, "not valid UTF-8"),
    (json.dumps(msg("x", "long " * 30)), None, "tokens long, more than data.max_len=64"),
    (json.dumps(msg("x", "ab " * 3_500_000)), None, "characters long, so more than max_len=64 tokens"),  # 10 MB
]


def fuzzed_file(path):
    lines, expect = [], {}
    for i, good in enumerate(GOOD):
        lines.append(json.dumps(good).encode())
        if i < len(FUZZ):
            line, field, words = FUZZ[i]
            lines.append(line if isinstance(line, bytes) else line.encode())
            expect[len(lines)] = (field, words)
    lines.append(b'{"messages": [{"role": "user", "content": "cut of')  # a truncated last line
    expect[len(lines)] = (None, "a truncated last line")
    path.write_bytes(b"\n".join(lines))
    return expect


def recipe(model_dir, **data):
    return {"model": model_dir, "stages": [{"method": "sft", "data": {"max_len": 64, **data}, "steps": 2,
                                            "batch": {"size": 2}, "optim": {"lr": 1e-3}}]}


def test_every_bad_row_is_listed_and_the_run_stops_before_the_model_loads(tmp_path, model_dirs, monkeypatch):
    data = tmp_path / "rows.jsonl"
    expect = fuzzed_file(data)
    from posttrain import run as run_mod

    monkeypatch.setattr(run_mod, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError) as e:
        posttrain.train(recipe(model_dirs["llama"], path=str(data)), out=tmp_path / "run", progress=False)
    text = str(e.value)
    assert f"{len(expect)} of {len(expect) + len(GOOD)} rows are bad (stage 'sft', data.max_bad_fraction=0)" in text
    assert "... and 1 more" in text and text.count("\n  row ") == 10  # capped in the message, with the count
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert {b["row"] for b in bad} == set(expect)
    for b in bad:
        field, words = expect[b["row"]]
        assert words in b["reason"] and (field is None or b["field"] == field), b
        assert b["stage"] == "sft" and b["origin"] == str(data) and len(b["excerpt"]) <= 203
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_within_max_bad_fraction_the_bad_rows_are_dropped_and_the_run_trains(tmp_path, model_dirs, caplog):
    data = tmp_path / "rows.jsonl"
    expect = fuzzed_file(data)
    with caplog.at_level("WARNING", logger="posttrain"):
        summary = posttrain.train(recipe(model_dirs["llama"], path=str(data), max_bad_fraction=0.5),
                                  out=tmp_path / "run", progress=False)
    assert summary["stages"]["sft"]["rows"] == len(GOOD) and len(metrics(tmp_path / "run")) == 2
    assert f"stage sft: dropping {len(expect)} bad rows of {data}" in caplog.text
    assert len((tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()) == len(expect)


def test_rl_rows_missing_a_later_column_and_prompts_too_long_for_the_context(tmp_path, model_dirs):
    """The first rows have `answer`, rows 9 and 11 do not: prompt_answer is decided from every row and those
    rows are bad (today's crash at step 27, reported up front). A prompt that fits data.max_len but not the
    model's 256-token context with rollout.max_new_tokens=200 is bad too."""
    rows = [{"prompt": f"Say {c}.", "answer": c} for c in "ABCDEFGHIJKL"]
    del rows[8]["answer"], rows[10]["answer"]
    rows[3]["prompt"] = "word " * 80  # ~80 tokens: over 256 - 200
    r = {"model": model_dirs["llama"], "stages": [{"method": "grpo", "data": {}, "steps": 1, "batch": {"size": 2},
                                                   "rollout": {"group_size": 2, "max_new_tokens": 200}}]}
    with pytest.raises(DataError) as e:
        posttrain.train(r, out=tmp_path / "run", data=rows, rewards=[varied], progress=False)
    text = str(e.value)
    assert "3 of 12 rows are bad" in text and "row 9, field 'answer': missing" in text
    assert "row 11, field 'answer': missing" in text
    assert "row 4, field 'prompt': the prompt is" in text and "does not fit the model's context of 256" in text
