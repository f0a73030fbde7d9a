"""RewardScorer: out-of-process reward functions with per-sample masking, timeouts, restarts and no leaks.

The functions under test live in tests/reward_fns.py and are named 'reward_fns:<name>', as a recipe would.
"""
import math
import os
import time
from multiprocessing import resource_tracker

import pytest
import torch

from posttrain.rewards import RewardScorer, RewardSpec, resolve_reward_fn
from posttrain.rewards.procs import children_map

N3 = dict(completion_ids=[[1], [2, 2], [3, 3, 3]], row_ids=["r0", "r1", "r2"])


def child_pids() -> set[int]:
    """Direct children of this process, zombies included; Python's spawn resource tracker (one per
    interpreter, started by the first spawn and kept for its lifetime) is not a leak and is left out."""
    return set(children_map().get(os.getpid(), [])) - {resource_tracker._resource_tracker._pid}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def no_leaks():
    """Every test ends with the child-process count back at its baseline."""
    before = child_pids()
    yield
    assert child_pids() == before


def values(batch, name):
    return [None if math.isnan(v) else v for v in batch.per_fn[name].tolist()]


def test_batch_scores_each_function_and_weighted_total(no_leaks):
    specs = [RewardSpec("reward_fns:length", weight=2.0), RewardSpec("reward_fns:trl_style", weight=-1.0)]
    with RewardScorer(specs, timeout_s=5) as scorer:
        out = scorer(["p"] * 3, ["a", "bab", "aaaa"], columns={}, **N3)
    assert scorer.context == "spawn"
    assert out.per_fn["length"].dtype == torch.float64
    assert values(out, "length") == [1.0, 3.0, 4.0]
    assert values(out, "trl_style") == [1.0, 1.0, 4.0]  # no `prompts` parameter: called by keyword, like TRL
    assert out.total.tolist() == [1.0, 5.0, 4.0]  # 2 * length - count("a")
    assert out.errors == []


def test_extra_columns_completion_ids_and_fixed_kwargs_arrive(no_leaks):
    spec = RewardSpec("reward_fns:uses_columns", kwargs={"bonus": 0.5}, name="cols")
    with RewardScorer([spec], timeout_s=5) as scorer:
        out = scorer(["p"] * 3, ["x", "y", "z"], columns={"answer": ["1", "2", "3"], "unused": [0, 0, 0]}, **N3)
    assert values(out, "cols") == [11.5, 22.5, 33.5]  # 10 * answer + len(completion_ids) + bonus


def test_raising_sample_is_masked_with_its_row_id_and_others_scored(no_leaks):
    specs = [RewardSpec("reward_fns:raises_on_boom"), RewardSpec("reward_fns:length")]
    with RewardScorer(specs, timeout_s=5) as scorer:
        out = scorer(["p"] * 3, ["ok", "boom", "fine"], columns={}, **N3)
    assert values(out, "raises_on_boom") == [1.0, None, 1.0]
    assert values(out, "length") == [2.0, 4.0, 4.0]  # the other function is unaffected
    assert [v if not math.isnan(v) else None for v in out.total.tolist()] == [3.0, None, 5.0]
    [error] = out.errors
    assert (error.row_id, error.fn, error.kind) == ("r1", "raises_on_boom", "exception")
    assert error.message == "ZeroDivisionError: cannot score 'boom'"
    assert "reward_fns.py" in error.traceback
    assert out.error_counts() == {"raises_on_boom": 1, "length": 0}


def test_hanging_sample_times_out_is_masked_and_worker_restarts(no_leaks):
    timeout = 0.5
    specs = [RewardSpec("reward_fns:hangs_on_hang"), RewardSpec("reward_fns:length")]
    with RewardScorer(specs, timeout_s=timeout, max_sample_timeouts=2) as scorer:  # (default 1: see below)
        scorer.start()  # keep the first start-up out of the timing
        started = time.monotonic()
        out = scorer(["p"] * 3, ["ok", "hang", "fine"], columns={}, **N3)
        elapsed = time.monotonic() - started
        # two timeouts (the batch call, then the sample alone) plus two worker restarts of ~0.2 s
        assert elapsed < 2 * timeout + 2.0, elapsed
        assert values(out, "hangs_on_hang") == [2.0, None, 2.0]
        assert values(out, "length") == [2.0, 4.0, 4.0]
        [error] = out.errors
        assert (error.row_id, error.fn, error.kind) == ("r1", "hangs_on_hang", "timeout")
        again = scorer(["p"] * 3, ["a", "b", "c"], columns={}, **N3)  # a fresh worker serves the next batch
        assert values(again, "hangs_on_hang") == [2.0, 2.0, 2.0] and again.errors == []


def test_function_that_always_hangs_is_given_up_after_max_sample_timeouts(no_leaks):
    timeout = 0.3
    with RewardScorer([RewardSpec("reward_fns:hangs_on_hang")], timeout_s=timeout, max_sample_timeouts=1) as scorer:
        scorer.start()
        started = time.monotonic()
        out = scorer(["p"] * 3, ["hang"] * 3, columns={}, **N3)
        assert time.monotonic() - started < 2 * timeout + 2.0  # not 4 timeouts
    assert [(e.row_id, e.kind) for e in out.errors] == [("r0", "timeout"), ("r1", "skipped"), ("r2", "skipped")]
    assert values(out, "hangs_on_hang") == [None, None, None]


def test_killing_a_hung_worker_also_ends_processes_it_started(tmp_path, no_leaks):
    pid_file = tmp_path / "grandchild.pid"
    with RewardScorer([RewardSpec("reward_fns:starts_sleeper_then_hangs")], timeout_s=1.0) as scorer:
        out = scorer(["p"], ["x"], columns={"pid_file": [str(pid_file)]}, completion_ids=[[1]], row_ids=[7])
    assert [(e.row_id, e.kind) for e in out.errors] == [(7, "timeout")]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 2.0
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(grandchild)


def test_crashed_worker_masks_the_sample_and_is_restarted(no_leaks):
    with RewardScorer([RewardSpec("reward_fns:exits_on_crash")], timeout_s=5) as scorer:
        out = scorer(["p"] * 3, ["ok", "crash", "ok"], columns={}, **N3)
    assert values(out, "exits_on_crash") == [3.0, None, 3.0]
    [error] = out.errors
    assert (error.row_id, error.kind) == ("r1", "crash") and "exit code 7" in error.message


@pytest.mark.parametrize(
    "fn, message",
    [
        ("reward_fns:wrong_length", r"'wrong_length' returned 4 values for 3 completions"),
        ("reward_fns:non_numeric", r"'non_numeric' returned a non-numeric value 'good'"),
    ],
)
def test_bad_output_raises_value_error_naming_the_function(fn, message, no_leaks):
    with RewardScorer([RewardSpec(fn), RewardSpec("reward_fns:length")], timeout_s=5) as scorer:
        with pytest.raises(ValueError, match=message):
            scorer(["p"] * 3, ["a", "b", "c"], columns={}, **N3)
        assert scorer._runner.restarts == 0  # a bug report, not a stall: the worker stays in step


def test_none_nan_and_inf_are_masked_and_reported(no_leaks):
    with RewardScorer([RewardSpec("reward_fns:none_or_nan", name="special")], timeout_s=5) as scorer:
        out = scorer(["p"] * 4, ["none", "nan", "inf", "ok"], columns={}, completion_ids=[[1]] * 4, row_ids=range(4))
    assert values(out, "special") == [None, None, None, 0.5]
    assert math.isnan(out.total[0]) and out.total[3].item() == 0.5
    assert [(e.row_id, e.kind) for e in out.errors] == [(0, "none"), (1, "nonfinite"), (2, "nonfinite")]


def test_spawned_worker_does_not_import_torch(no_leaks):
    """Keeps a worker (re)start at ~0.2 s: posttrain.rewards imports torch only where it builds tensors."""
    with RewardScorer([RewardSpec("reward_fns:torch_loaded")], timeout_s=5) as scorer:
        out = scorer(["p"], ["x"], columns={}, completion_ids=[[1]], row_ids=[0])
    assert out.total.tolist() == [0.0]


def test_builtins_run_in_the_worker_with_fixed_kwargs(no_leaks):
    specs = [RewardSpec("exact"), RewardSpec("format", kwargs={"pattern": r"^<a>"}, weight=0.5)]
    with RewardScorer(specs, timeout_s=10) as scorer:
        out = scorer(["p"] * 3, ["<a> #### 4", "#### 5", "<a> #### 6"], columns={"answer": ["4", "4", "6"]}, **N3)
    assert out.total.tolist() == [1.5, 0.0, 1.5]


def test_closures_run_in_a_forked_worker(no_leaks):
    offset = 10.0
    spec = RewardSpec(lambda prompts, completions, **kw: [offset + len(c) for c in completions])
    with RewardScorer([spec], timeout_s=5) as scorer:
        out = scorer(["p"] * 3, ["a", "bb", "ccc"], columns={}, **N3)
    assert scorer.context == "fork"
    assert values(out, "<lambda>") == [11.0, 12.0, 13.0]


def test_in_process_keeps_per_sample_masking_without_a_worker(no_leaks):
    with RewardScorer([RewardSpec("reward_fns:raises_on_boom")], in_process=True) as scorer:
        out = scorer(["p"] * 3, ["boom", "ok", "boom"], columns={}, **N3)
        assert child_pids() == set()  # nothing was started
    assert values(out, "raises_on_boom") == [None, 1.0, None]
    assert [e.row_id for e in out.errors] == ["r0", "r2"]


def test_missing_column_fails_before_scoring(no_leaks):
    with RewardScorer([RewardSpec("reward_fns:needs_answer")], timeout_s=5) as scorer:
        with pytest.raises(ValueError, match=r"'needs_answer' cannot be called.*missing a required argument: 'answer'"):
            scorer(["p"] * 3, ["a", "b", "c"], columns={"solution": ["1", "2", "3"]}, **N3)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("exactt", r"unknown built-in reward 'exactt'; built-ins are code, exact, format, math, numeric"),
        ("no_such_module_xyz:f", r"no module 'no_such_module_xyz' on sys.path or in the current directory"),
        ("reward_fns:lenght", r"has no attribute 'lenght'; its public callables are: .*length"),
    ],
)
def test_bad_specs_fail_eagerly_with_the_valid_choices(spec, message, no_leaks):
    with pytest.raises(ValueError, match=message):
        RewardScorer([RewardSpec(spec)])


def test_duplicate_names_and_ragged_batches_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        RewardScorer([RewardSpec("format"), RewardSpec("format", kwargs={"pattern": "x"})])
    scorer = RewardScorer([RewardSpec("reward_fns:length")], in_process=True)
    with pytest.raises(ValueError, match="'answer' has 2 entries for 3 completions"):
        scorer(["p"] * 3, ["a", "b", "c"], columns={"answer": ["1", "2"]}, **N3)


def test_resolve_reward_fn_accepts_builtins_references_and_callables():
    from posttrain.rewards.builtin import math_match
    import reward_fns

    assert resolve_reward_fn("math") is math_match
    assert resolve_reward_fn("reward_fns:length") is reward_fns.length
    assert resolve_reward_fn(reward_fns.length) is reward_fns.length


def test_close_is_idempotent_and_leaves_no_process():
    before = child_pids()
    scorer = RewardScorer([RewardSpec("reward_fns:length")], timeout_s=5)
    scorer(["p"], ["a"], columns={}, completion_ids=[[1]], row_ids=[0])
    assert len(child_pids() - before) == 1  # the worker is running
    scorer.close()
    scorer.close()
    assert child_pids() == before
    with pytest.raises(RuntimeError, match="closed"):
        scorer(["p"], ["a"], columns={}, completion_ids=[[1]], row_ids=[0])
