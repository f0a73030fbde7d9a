"""`posttrain demo --quick` runs end to end and its table comes from the runs it made."""
import json

import pytest

from posttrain.cli import main


@pytest.mark.slow
def test_demo_quick_writes_table_from_its_runs(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "sft", "grpo", "sft_then_grpo"]
    for name in ("sft", "grpo", "sft_then_grpo"):
        assert (tmp_path / name / "final" / "config.json").is_file()
        acc = results[name]["eval"]["id"]["accuracy"]
        assert f"{100 * acc:.1f}%" in out  # the printed table shows the measured number
    assert "| run | id acc | ood acc |" in (tmp_path / "report.md").read_text()


def test_tasks_command_lists_arith(capsys):
    assert main(["tasks", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)
    arith = next(t for t in tasks if t["name"] == "arith")
    assert {"train", "id", "ood", "plain"} <= set(arith["splits"]) and arith["primary"] == "correct"
