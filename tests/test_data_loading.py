"""Loading rows from every supported source, and validation errors that name file, row and field."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data import FORMATS, DataError, RowSet, detect_format, is_conversational, load_rows, validate

ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    {"prompt": "What is 4 * 4?", "answer": "16"},
    {"prompt": "What is 9 - 1?", "answer": "8"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------- sources

def test_jsonl_file_loads_every_row_in_order_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    path.write_text(path.read_text() + "\n\n")
    rs = load_rows(path)
    assert rs.rows == ROWS and rs.origin == str(path) and len(rs) == 3


def test_json_array_and_json_lines_under_json_name(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_rows(str(tmp_path / "a.json")).rows == ROWS
    assert load_rows(str(tmp_path / "b.json")).rows == ROWS


def test_parquet_file_with_nested_messages(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = write_parquet(tmp_path / "m.parquet", rows)
    assert load_rows(path).rows == rows


def test_save_to_disk_dataset_and_dataset_dict_pick_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(tmp_path / "ds").rows == ROWS
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1]))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd").rows == ROWS
    assert load_rows(tmp_path / "dd", split="test").rows == ROWS[:1]
    with pytest.raises(DataError, match=r"split 'validation' not found; available splits: test, train"):
        load_rows(tmp_path / "dd", split="validation")


def test_directory_of_files_selects_split_by_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", ROWS[2:])
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert load_rows(tmp_path).rows == ROWS[2:] + ROWS[:2]  # sorted paths: data/... before train.jsonl
    assert load_rows(tmp_path, split="test").rows == ROWS[:1]
    with pytest.raises(DataError, match="no files for split 'dev'"):
        load_rows(tmp_path, split="dev")


def test_directory_without_split_names_concatenates_all_files(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "part2.jsonl", ROWS[1:])
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "dataset_infos.json").write_text('{"default": {"description": "metadata, not rows"}}')
    write_jsonl(tmp_path / ".cache" / "stale.jsonl", ROWS)
    rs = load_rows(tmp_path)
    assert rs.rows == ROWS and rs.origin == str(tmp_path)


def test_in_memory_list_and_dataset():
    rs = load_rows(ROWS)
    assert rs.rows == ROWS and rs.origin == "<in-memory>"
    datasets = pytest.importorskip("datasets")
    assert load_rows(datasets.Dataset.from_list(ROWS)).rows == ROWS
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[1:]))
    assert load_rows(dd, split="test").rows == ROWS[1:]
    with pytest.raises(DataError, match=r"in-memory dataset, row 2: each row must be a dict"):
        load_rows([ROWS[0], "oops"])


def _fake_hub_dataset(hf_home, repo_id, files: dict, revision="0123abcd" * 5):
    """The hub-cache layout: blobs/, snapshots/<rev>/<file> -> ../../blobs/<id>, refs/main = <rev>."""
    repo = hf_home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    for i, (name, writer) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        writer(blob)
        link = repo / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)


def test_hub_id_resolved_from_local_cache_only(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    _fake_hub_dataset(hf_home, "org/name", {
        "data/train-00000-of-00001.parquet": lambda p: write_parquet(p, ROWS),
        "data/test-00000-of-00001.jsonl": lambda p: write_jsonl(p, ROWS[:1]),
        "README.md": lambda p: p.write_text("---\nlicense: mit\n---\n"),
    })
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/name" must not be mistaken for a local path
    rs = load_rows("org/name")
    assert rs.rows == ROWS and rs.origin.startswith("org/name")
    assert load_rows("org/name", split="test").rows == ROWS[:1]
    with pytest.raises(DataError, match=r"org/missing: .*datasets--org--missing"):
        load_rows("org/missing")


# ---------------------------------------------------------------- loading errors

def test_unreadable_lines_are_bad_rows_named_by_line(tmp_path):
    """Invalid JSON, a non-object, invalid UTF-8 and a truncated last line are each a bad row with its line and
    reason; the readable rows keep their line numbers (blank lines are skipped, not counted as rows)."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "x", "answer": }\n\n[1, 2]\n'
                     b'{"text": "caf\xe9"}\n' + json.dumps(ROWS[1]).encode() + b'\n{"prompt": "cut')
    rs = load_rows(path)
    assert rs.rows == [ROWS[0], ROWS[1]] and [rs.number(i) for i in range(2)] == [1, 6] and rs.total == 6
    assert [(b.row, b.reason.split(":")[0].split(" (")[0]) for b in rs.bad] == [
        (2, "not valid JSON"), (4, "holds a JSON list, not an object of columns"), (5, "not valid UTF-8"),
        (7, "a truncated last line")]
    assert all(b.origin == str(path) for b in rs.bad)
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: not valid JSON"):
        validate(rs, "prompt_answer")


def test_missing_file_says_the_path_does_not_exist(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: the path does not exist"):
        load_rows(str(missing))
    with pytest.raises(DataError, match="the path does not exist"):
        load_rows("data/train.jsonl")  # looks like org/name but has a data suffix: a path, not a hub id


def test_unsupported_file_type(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_rows(tmp_path / "d.csv")


# ---------------------------------------------------------------- formats

def test_detect_format_takes_first_allowed_match():
    rs = RowSet(rows=[{"prompt": "p", "completion": "c", "answer": "1"}], origin="<in-memory>")
    assert detect_format(rs, ["prompt_answer", "prompt_completion"]) == "prompt_answer"
    assert detect_format(rs, ["prompt_completion", "prompt_answer"]) == "prompt_completion"
    assert detect_format(rs, ["preference", "prompt_only"]) == "prompt_only"


def test_format_is_decided_from_every_row_and_rows_without_its_columns_are_bad():
    """A first row with `answer` and later rows without: not prompt_answer from the first row alone, nor
    silently prompt_only; the majority's format, with the others reported."""
    from posttrain.data.formats import check_rows

    rows = [{"prompt": f"p{i}", "answer": "1"} for i in range(5)] + [{"prompt": "q"}, {"prompt": "r", "answer": None}]
    rs = RowSet(rows, "d.jsonl")
    assert detect_format(rs, ["prompt_answer", "prompt_only"]) == "prompt_answer"
    assert [(b.row, b.field) for b in check_rows(rs, "prompt_answer")] == [(6, "answer"), (7, "answer")]
    few = RowSet(rows[:1] + [{"prompt": "q"}] * 3, "d.jsonl")
    assert detect_format(few, ["prompt_answer", "prompt_only"]) == "prompt_only"


def test_detect_format_lists_columns_found_and_needed(tmp_path):
    rs = RowSet(rows=[{"question": "q", "response": "r"}], origin="d.jsonl")
    with pytest.raises(DataError) as e:
        detect_format(rs, ["messages", "prompt_completion"])
    msg = str(e.value)
    assert "question, response" in msg and "messages: messages" in msg and "prompt_completion: prompt, completion" in msg
    with pytest.raises(ValueError, match="unknown dataset format"):
        detect_format(rs, ["chat"])


def test_is_conversational():
    assert is_conversational([{"role": "user", "content": "hi"}])
    assert not is_conversational("hi") and not is_conversational([]) and not is_conversational(["hi"])


def test_formats_follow_trl_column_names():
    assert FORMATS["preference"] == ("prompt", "chosen", "rejected")
    assert FORMATS["unpaired"] == ("prompt", "completion", "label")
    assert set(FORMATS) == {"text", "messages", "prompt_completion", "prompt_answer", "prompt_only",
                            "preference", "unpaired"}


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
GOOD = {
    "text": {"text": "some text"},
    "messages": {"messages": [USER, ASSISTANT]},
    "prompt_completion": {"prompt": [USER], "completion": [ASSISTANT]},
    "prompt_answer": {"prompt": "1+1?", "answer": 2, "solution": "2"},
    "prompt_only": {"prompt": "hi", "extra": 1},
    "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "unpaired": {"prompt": "p", "completion": "", "label": False},
}


@pytest.mark.parametrize("fmt", list(GOOD))
def test_valid_rows_pass(fmt):
    validate(RowSet(rows=[GOOD[fmt]] * 3, origin="x.jsonl"), fmt)


BAD = [  # (format, bad row, field, words the message must contain)
    ("text", {"text": ""}, "text", "non-empty string"),
    ("text", {"txt": "a"}, "text", "missing"),
    ("messages", {"messages": []}, "messages", "non-empty list"),
    ("messages", {"messages": [USER]}, "messages", "no assistant message"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}, "messages", "valid roles: system, user"),
    ("messages", {"messages": [USER, {"role": "assistant", "content": None}]}, "messages", "string 'content'"),
    ("prompt_completion", {"prompt": "p", "completion": 3}, "completion", "string or a list"),
    ("prompt_completion", {"prompt": "p", "completion": [ASSISTANT]}, "completion", "same form as the prompt"),
    ("prompt_completion", {"prompt": "", "completion": "c"}, "prompt", "empty string"),
    ("prompt_answer", {"prompt": "p", "answer": None}, "answer", "missing"),
    ("prompt_answer", {"prompt": "p", "answer": [1]}, "answer", "string or a number"),
    ("prompt_answer", {"prompt": "p", "answer": True}, "answer", "string or a number"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "equals 'chosen'"),
    ("preference", {"prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]}, "chosen", "no assistant message"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": 1}, "label", "true or false"),
]


@pytest.mark.parametrize("fmt,bad,field,words", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_row_names_file_row_and_field(fmt, bad, field, words):
    rows = [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]]
    with pytest.raises(DataError) as e:
        validate(RowSet(rows=rows, origin="/data/train.jsonl"), fmt)
    err = e.value
    assert (err.origin, err.row, err.field) == ("/data/train.jsonl", 3, field)
    assert str(err).startswith(f"/data/train.jsonl, row 3, field {field!r}: ")
    assert words in str(err)


def test_validation_of_a_loaded_file_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD["preference"], {"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"prefs\.jsonl, row 2, field 'rejected': missing"):
        validate(load_rows(path), "preference")
