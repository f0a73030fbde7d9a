"""Rewards you can trust (issue 11): the failure policy stops a run whose rewards keep failing, after saving
the step before; the worker never runs the user's main script, answers in plain JSON whatever the reward
prints, enforces its memory limit, and ends every process a reward starts (a new session included) when a
call times out and when it closes; reward modules are found beside the recipe and checked before the model
loads."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import posttrain
from posttrain.errors import RewardFailure
from posttrain.recipe import RecipeError
from posttrain.rewards import RewardScorer, RewardSpec
from posttrain.training import checkpoint
from test_rewards_worker import N3, alive, child_pids, no_leaks, values  # noqa: F401  (no_leaks: a fixture)
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

TESTS = Path(__file__).parent
ROWS = [{"prompt": [{"role": "user", "content": f"Say {c}."}], "answer": c, "id": f"q{i}"}
        for i, c in enumerate("ABCDEFGHIJKLMNOPQRST")]


def gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


# ---- the worker ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hang", [False, True], ids=["on-close", "on-timeout"])
def test_a_daemon_a_reward_starts_in_a_new_session_is_ended(tmp_path, no_leaks, hang):
    pid_file = tmp_path / "daemon.pid"
    with RewardScorer([RewardSpec("reward_fns:starts_daemon")], timeout_s=1.0) as scorer:
        out = scorer(["p"], ["x"], columns={"pid_file": [str(pid_file)], "hang": [hang]}, completion_ids=[[1]],
                     row_ids=[0])
        daemon = int(pid_file.read_text())
        assert [e.kind for e in out.errors] == (["timeout"] if hang else [])
        if not hang:
            assert alive(daemon)  # it lives as long as the worker...
    assert gone(daemon)  # ...and not a moment longer


def test_memory_past_the_limit_is_a_masked_error_not_a_dead_host(no_leaks):
    with RewardScorer([RewardSpec("reward_fns:allocates")], timeout_s=20, memory_mb=256) as scorer:
        big = scorer(["p"] * 3, ["a", "bb", "ccc"], columns={"mb": [1024] * 3}, **N3)
        small = scorer(["p"] * 3, ["a", "bb", "ccc"], columns={"mb": [16] * 3}, **N3)
    assert {e.kind for e in big.errors} == {"exception"} and "MemoryError" in big.errors[0].message
    assert values(small, "allocates") == [1.0, 2.0, 3.0]


def test_cpu_time_past_the_limit_ends_the_call_before_the_wall_clock_timeout(no_leaks):
    started = time.monotonic()
    with RewardScorer([RewardSpec("reward_fns:spins")], timeout_s=30, cpu_s=1) as scorer:
        out = scorer(["p"], ["x"], columns={}, completion_ids=[[1]], row_ids=[0])
    assert [e.kind for e in out.errors] == ["crash"] and "exit code -24" in out.errors[0].message  # SIGXCPU
    assert time.monotonic() - started < 10


def test_a_reward_flooding_stdout_cannot_corrupt_the_replies(no_leaks, capfd):
    with RewardScorer([RewardSpec("reward_fns:floods_stdout")], timeout_s=20) as scorer:
        out = scorer(["p"] * 3, ["a", "bb", "ccc"], columns={}, **N3)
    assert values(out, "floods_stdout") == [1.0, 2.0, 3.0] and out.errors == []
    assert "{not json" in capfd.readouterr().err  # the worker's prints go to stderr


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_once(tmp_path, model_dirs):
    """A spawned multiprocessing worker re-runs the user's script; posttrain's worker never imports it."""
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    marks = tmp_path / "marks.txt"
    script = tmp_path / "train_script.py"
    script.write_text(f"""
import posttrain
with open({str(marks)!r}, "a") as f:
    f.write("ran\\n")
posttrain.train({{"model": {model_dirs["llama"]!r}, "device": "cpu", "stages": [{{"method": "grpo",
    "data": {{"path": {str(tmp_path / "rows.jsonl")!r}}}, "steps": 1, "batch": {{"size": 2}},
    "rollout": {{"group_size": 2, "max_new_tokens": 4}}, "rewards": [{{"fn": "reward_fns:length"}}]}}]}},
    out={str(tmp_path / "run")!r}, progress=False)
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert marks.read_text() == "ran\n"


# ---- the failure policy -------------------------------------------------------------------------------


def rl(model_dir, steps=10, **stage):
    return {"model": model_dir, "device": "cpu", "seed": 0, "checkpoint": {"every": 1, "keep": 1},
            "stages": [{"method": "grpo", "data": {}, "steps": steps, "batch": {"size": 2},
                        "rollout": {"group_size": 2, "max_new_tokens": 4},
                        "reward_policy": {"max_error_rate": 0.5, "window": 3}, **stage}]}


def test_an_always_failing_reward_stops_the_run_after_saving_the_step_before(tmp_path, model_dirs):
    with pytest.raises(RewardFailure, match=r"rewards failed on 12 of 12 samples over the last 3 steps .*"
                                            r"'always_raises' failed most, last on row '.*': RuntimeError: the "
                                            r"verifier is broken"):
        posttrain.train(rl(model_dirs["llama"], rewards=[{"fn": "reward_fns:always_raises"}]), out=tmp_path / "run",
                        data=ROWS, progress=False)
    found, _ = checkpoint.latest(tmp_path / "run" / "checkpoints", 0, "grpo")
    assert found.step == 2  # the failing third step made no update; the state before it is saved
    assert not (tmp_path / "run" / "final").exists()
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


def test_an_always_hanging_reward_costs_about_two_timeouts_a_step_and_stops_the_run(tmp_path, model_dirs):
    timeout = 0.5
    r = rl(model_dirs["llama"], rewards=[{"fn": "reward_fns:always_hangs"}], reward_timeout_s=timeout)
    started = time.monotonic()
    with pytest.raises(RewardFailure, match="'always_hangs' failed most"):
        posttrain.train(r, out=tmp_path / "run", data=ROWS, progress=False)
    elapsed = time.monotonic() - started
    # 3 steps x (the batch call + one sample alone) x timeout, plus worker restarts and the run's own start
    assert elapsed < 3 * 2 * timeout + 12, elapsed


def test_a_reward_failing_one_sample_in_ten_is_masked_and_the_run_finishes(tmp_path, model_dirs):
    summary = posttrain.train(rl(model_dirs["llama"], steps=5, rewards=[{"fn": "reward_fns:fails_one_in_ten"}]),
                              out=tmp_path / "run", data=ROWS[:10], progress=False)  # one epoch: q0 is drawn
    assert summary["stages"]["grpo"]["steps"] == 5 and summary["stages"]["grpo"]["reward_errors"] == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# ---- reward modules -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_reward_modules_are_found_beside_the_recipe_and_checked_before_the_model_loads(tmp_path, model_dirs):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                          "    return [1.0 / (1 + len(c[-1]['content'])) for c in completions]\n"
                                          "def needs_tests(prompts, completions, tests):\n    return [0.0] * len(completions)\n")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    recipe = rl(model_dirs["llama"], steps=1, data={"path": str(folder / "rows.jsonl")},
                rewards=[{"fn": "my_rewards:short"}])
    (folder / "r.yaml").write_text(json.dumps(recipe))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    p = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(folder / "r.yaml"), "--out",
                        str(tmp_path / "run")], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recipe["model"] = str(tmp_path / "no-such-model")  # a column check that fails must fail before the model loads
    recipe["stages"][0]["rewards"] = [{"fn": "my_rewards:needs_tests"}]
    (folder / "bad.yaml").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=r"stage 'grpo': reward 'needs_tests' cannot be called with keywords .*"
                                          r"add the missing column to the dataset"):
        posttrain.train(str(folder / "bad.yaml"), out=tmp_path / "bad", progress=False)


@pytest.mark.slow
def test_after_sigterm_no_process_a_reward_started_survives_the_run(tmp_path, model_dirs):
    """A reward that leaves a daemon (new session) behind on every call; SIGTERM stops the run (exit 75) and
    every process it or its rewards started is gone: found by an environment tag they all inherit."""
    from posttrain.errors import EXIT_INTERRUPTED
    from test_signals import cli

    pid_file = tmp_path / "daemon.pid"
    rows = [{**r, "pid_file": str(pid_file), "hang": False} for r in ROWS[:4]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = rl(model_dirs["llama"], steps=4, data={"path": str(tmp_path / "rows.jsonl")},
                rewards=[{"fn": "reward_fns:starts_daemon"}])
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    p, left = cli(tmp_path / "r.yaml", tmp_path / "run", fault="step@3=term")
    assert p.returncode == EXIT_INTERRUPTED, p.stderr[-3000:]
    assert left == [] and gone(int(pid_file.read_text()), within=0.1)
