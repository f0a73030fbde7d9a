"""Non-finite numbers never reach the weights: a NaN/inf loss or gradient skips the step (weights and Adam's
state untouched), a run of them stops the run non-zero without publishing `final/`, rewards too large for
float32 stop it naming the function and row, NaN weights are never saved, and every JSON file is strict.
Faults are injected from the tests (a gradient hook, a recipe's learning rate, a reward function), never
by editing the code under test."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import posttrain
from letter_rewards import overflows_on_q2
from posttrain.errors import NonFiniteError, RunBusy
from posttrain.jsonio import dumps
from posttrain.models import save_pretrained
from posttrain.tiny import tiny_model
from posttrain.training import loop
from test_train_e2e import RL_ROWS, SFT_ROWS, metrics, model_dirs, recipe  # noqa: F401  (model_dirs: a fixture)

def _state(model, opt):
    w = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s = {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in st.items()} for k, st in opt.state.items()}
    return w, s


def test_a_nan_gradient_skips_the_step_and_touches_no_weight_or_adam_state(tmp_path, model_dirs, monkeypatch):
    """Step 1 is normal; a hook then turns one gradient into NaN for step 2: the step is recorded as skipped
    and weights and optimizer state equal those after step 1; the hook removed, step 3 updates again."""
    seen = {}
    real_step = loop.optimizer_step

    def spy(model, optimizer, *args, **kwargs):
        n = seen.setdefault("n", 0) + 1
        seen["n"] = n
        if n == 2:
            p = next(model.parameters())
            h = p.register_hook(lambda g: g * float("nan"))
            before = _state(model, optimizer)
            rec = real_step(model, optimizer, *args, **kwargs)
            h.remove()
            after = _state(model, optimizer)
            seen["skipped"] = rec.get("nonfinite") == 1
            seen["weights"] = all(torch.equal(before[0][k], after[0][k]) for k in before[0])
            seen["adam"] = all(torch.equal(before[1][k][n_], after[1][k][n_]) for k in before[1] for n_ in before[1][k])
            return rec
        return real_step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", spy)
    posttrain.train(recipe(model_dirs["llama"], "sft", steps=3), out=tmp_path / "b", data=SFT_ROWS, progress=False)
    assert seen["skipped"] and seen["weights"] and seen["adam"], seen
    rows = metrics(tmp_path / "b")
    assert [r.get("nonfinite", 0) for r in rows] == [0, 1, 0]
    assert rows[1]["nonfinite_total"] == 1 and rows[1]["grad_norm"] is None  # NaN is written as null
    assert (tmp_path / "b" / "final" / "model.safetensors").is_file()  # one skip does not stop the run


def test_a_diverging_run_stops_nonzero_and_publishes_no_weights(tmp_path):
    """`stages.0.optim.lr=1e3` on the shipped SFT recipe: the second step's loss is ~7e5 and its gradient NaN;
    after optim.max_nonfinite_steps (3) skipped steps in a row the CLI exits 1 naming the cause, and neither
    `final/` nor a stage model exists."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", "builtin:sft", "--out", str(out),
                        "--save-every", "1", "stages.0.optim.lr=1e3", "stages.0.steps=20", "eval.splits=[id]",
                        "eval.n=4"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "3 steps in a row had a non-finite loss or gradient" in p.stderr
    assert not (out / "final").exists() and not (out / "stages").exists()
    from posttrain.training import checkpoint  # the last checkpoint is intact, its weights finite

    found, skipped = checkpoint.latest(out / "checkpoints", 0, "sft")
    assert found is not None and skipped == [] and checkpoint.verify(found.path) is None
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(found.path / "model.safetensors").values())
    rows = metrics(out)
    assert sum(r.get("nonfinite", 0) for r in rows) == 3 and rows[-1]["nonfinite_total"] == 3
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_a_reward_too_large_for_float32_stops_the_run_naming_function_and_row(tmp_path, model_dirs):
    r = recipe(model_dirs["llama"], "grpo", steps=2, batch={"size": 8}, rollout={"group_size": 2, "max_new_tokens": 4})
    with pytest.raises(NonFiniteError, match=r"overflows_on_q2 returned 1e\+308 for row q2"):
        posttrain.train(r, out=tmp_path / "run", data=RL_ROWS, rewards=[overflows_on_q2], progress=False)
    assert not (tmp_path / "run" / "final").exists()


def test_nan_weights_are_never_saved(tmp_path, tokenizer):
    model = tiny_model("llama", tokenizer, seed=0)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="holds NaN or inf"):
        save_pretrained(model, tokenizer, tmp_path / "m", stop_ids=[tokenizer.eos_token_id])
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()


def test_json_files_are_strict():
    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.tensor([1.0, 2.0]), "d": (1, 2)})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [None, 1.5],
                                                                         "c": [1.0, 2.0], "d": [1, 2]}


def test_one_run_at_a_time_per_out_and_a_killed_runs_lock_is_taken_over(tmp_path, model_dirs, caplog):
    """A second run on a live run's --out is refused naming the holder's pid; after a kill -9 of the
    holder, the rerun takes the directory over (the kernel drops a dead process's flock) and finishes."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "train", "builtin:sft", "--out", str(out),
                               "stages.0.steps=100000", "eval.n=4", "eval.splits=[id]"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((out / ".lock").exists() and f"pid {holder.pid}" in (out / ".lock").read_text()):
            assert holder.poll() is None and time.time() < deadline, "the holder did not start"
            time.sleep(0.2)
        with pytest.raises(RunBusy, match=f"in use by another run \\(pid {holder.pid} on "):
            posttrain.train(recipe(model_dirs["llama"], "sft", steps=1), out=out, data=SFT_ROWS, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    with caplog.at_level(logging.INFO, logger="posttrain"):
        # the same directory, its .lock still naming the dead holder
        posttrain.train(recipe(model_dirs["llama"], "sft", steps=1), out=out, data=SFT_ROWS, progress=False)
    assert f"from pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert (out / ".lock").read_text() == "" and os.path.isdir(out / "final")
