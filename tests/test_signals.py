"""SIGTERM and SIGINT through the command line: the run stops at the end of the step it is in (whether the
signal came during the step, during generation or during a checkpoint save), saves, and exits with code 75;
a second signal during the save corrupts nothing; no process it started (the reward worker, which runs
reward functions by reference in a spawned interpreter) outlives it; rerunning the command finishes the run
exactly as an uninterrupted one. Signals are sent by the process to itself through POSTTRAIN_FAULTS."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from posttrain.errors import EXIT_INTERRUPTED
from posttrain.training import checkpoint
from test_resume import RL_ROWS, assert_same_run
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, model_dirs):
    d = tmp_path_factory.mktemp("signals")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RL_ROWS))
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 4, "checkpoint": {"every": 0},
         "stages": [{"method": "grpo", "data": {"path": str(d / "rows.jsonl")}, "steps": 4, "optim": {"lr": 1e-3},
                     "batch": {"size": 2}, "rollout": {"group_size": 4, "max_new_tokens": 6},
                     "rewards": [{"fn": "letter_rewards:varied"}]}]}
    (d / "r.yaml").write_text(yaml.safe_dump(r))
    return d / "r.yaml"


def cli(recipe, out, *extra, fault=None):
    """Run `posttrain train`; returns (completed process, processes left carrying its tag)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "POSTTRAIN_TEST_TAG": tag}
    env.pop("POSTTRAIN_FAULTS", None)
    if fault:
        env["POSTTRAIN_FAULTS"] = fault
    p = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(recipe), "--out", str(out), *extra],
                       env=env, capture_output=True, text=True, timeout=300)
    return p, tagged(tag)


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (the run and anything it started inherit it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"POSTTRAIN_TEST_TAG={tag}".encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:  # gone, or not ours
                pass
    return found


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p, left = cli(recipe_file, out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert left == []
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fault,at", [("step@2=term", 2), ("generate@3=term", 3), ("step@2=int", 2)],
                         ids=["sigterm-in-step", "sigterm-in-generation", "sigint"])
def test_a_signal_stops_at_the_step_boundary_saves_and_resumes_exactly(tmp_path, recipe_file, reference, fault,
                                                                       at):
    out = tmp_path / "run"
    p, left = cli(recipe_file, out, fault=fault)
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-3000:]
    assert left == [], f"processes outlived the run: {left}"
    name = "SIGINT" if fault.endswith("int") else "SIGTERM"
    assert f"stopped by {name} at step {at} of stage 'grpo'" in p.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, at + 1))
    found, skipped = checkpoint.latest(out / "checkpoints", 0, "grpo")
    assert found.step == at and skipped == []
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    p, left = cli(recipe_file, out)
    assert p.returncode == 0 and left == [], p.stderr[-3000:]
    assert f"resuming at step {at}" in p.stderr
    assert_same_run(reference, out)


@pytest.mark.slow
def test_signals_during_a_save_corrupt_nothing(tmp_path, recipe_file, reference):
    """SIGTERM at the second file of the step-1 save, and again at the fourth: the save completes (the second
    signal is reported and ignored), is committed and intact, and the run stops there."""
    out = tmp_path / "run"
    p, left = cli(recipe_file, out, "--save-every", "1", fault="save@2=term,save@4=term")
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-3000:]
    assert left == []
    assert "SIGTERM received again: already stopping" in p.stderr
    found, skipped = checkpoint.latest(out / "checkpoints", 0, "grpo")
    assert found.step == 1 and skipped == [] and checkpoint.verify(found.path) is None
    p, left = cli(recipe_file, out, "--save-every", "1")
    assert p.returncode == 0 and left == [], p.stderr[-3000:]
    assert_same_run(reference, out)
