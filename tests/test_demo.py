"""`posttrain demo --quick` runs end to end and its table comes from the runs it made."""
import json

import pytest

from posttrain.cli import main


@pytest.mark.slow
def test_demo_quick_runs_the_study_and_prints_its_numbers(tmp_path, capsys):
    """`posttrain demo --quick`: every demo recipe trained and evaluated; the printed table and findings come
    from the study's summary (which test_study.py ties to the run directories)."""
    from posttrain.demo import DEMO_RECIPES

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "quick" / "summary.json").read_text())
    assert [r["recipe"] for r in summary["runs"]] == list(DEMO_RECIPES)
    assert all(r["status"] == "done" for r in summary["runs"])
    for r in summary["runs"]:
        row = next(line for line in out.splitlines() if line.startswith(f"| {r['recipe']} |"))
        assert f"| {100 * r['id_accuracy']:.1f} |" in row  # the measured number, as printed
    for f in summary["findings"]:
        assert f["text"] in out
    assert (tmp_path / "quick" / "report.html").is_file() and "report.html" in out


def test_tasks_command_lists_arith(capsys):
    assert main(["tasks", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)
    arith = next(t for t in tasks if t["name"] == "arith")
    assert {"train", "id", "ood", "ood_phrasing", "plain"} <= set(arith["splits"]) and arith["primary"] == "correct"
