"""Exact resume: a run stopped by SIGTERM (injected through POSTTRAIN_FAULTS, never by editing the code) and
rerun with the same command matches the uninterrupted run step by step — loss, gradient norm, learning rate
and reward to 1e-6, the same steps in the same order, bitwise-equal final weights — for every method family:
demonstrations (SFT) at every point of the resume grid, rollouts (GRPO with PPO epochs and minibatches, DAPO's
dynamic sampling), rejection sampling's pool, each hybrid's state (LUFFY, HPT, SRFT, CHORD's mu, ReLIFT's
buffer, prefix-guided RL), and a later stage with a KL reference (the policy at that stage's start)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import posttrain
from letter_rewards import varied
from posttrain import faults
from posttrain.errors import Interrupted
from posttrain.objective.presets import PRESETS
from test_train_e2e import PROMPT, metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

LETTERS = "ABCDEFGH"
SFT_ROWS = [{"messages": [{"role": "user", "content": f"Say {c}."}, {"role": "assistant", "content": c * (i + 1)}]}
            for i, c in enumerate(LETTERS)]
RL_ROWS = [{"prompt": [{"role": "user", "content": f"Say {c}."}], "answer": c,
            "completion": [{"role": "assistant", "content": c}], "id": f"q{i}"} for i, c in enumerate(LETTERS)]

PREF_ROWS = [{"prompt": f"Say {c}.", "chosen": c, "rejected": c.lower() * 2} for c in LETTERS]
UNPAIRED_ROWS = [{"prompt": f"Say {c}.", "completion": c if i % 2 else c.lower() * 2, "label": bool(i % 2)}
                 for i, c in enumerate(LETTERS)]


@pytest.fixture(autouse=True)
def _no_faults(monkeypatch):
    monkeypatch.delenv("POSTTRAIN_FAULTS", raising=False)
    faults.reset()


def stage(method, steps, **kw):
    st = {"method": method, "name": method, "data": {}, "steps": steps, "optim": {"lr": 1e-3}, "batch": {"size": 2},
          "rollout": {"group_size": 4, "max_new_tokens": 6}}
    st.update(kw)
    return st


def train(r, out, monkeypatch, fault=None, data=None):
    faults.reset()
    if fault:
        monkeypatch.setenv("POSTTRAIN_FAULTS", fault)
    else:
        monkeypatch.delenv("POSTTRAIN_FAULTS", raising=False)
    names = [s["name"] for s in r["stages"]]
    kind = {"demonstrations": SFT_ROWS, "preferences": PREF_ROWS, "prompts": RL_ROWS, "unpaired": UNPAIRED_ROWS}
    data = data or {n: kind[PRESETS[s["method"]].data] for n, s in zip(names, r["stages"])}
    return posttrain.train(r, out=out, data=data, rewards=[varied], progress=False)


def stopped(r, out, monkeypatch, fault):
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        train(r, out, monkeypatch, fault)


def assert_same_run(ref, out):
    a, b = metrics(ref), metrics(out)
    assert [(x["stage"], x["step"]) for x in b] == [(x["stage"], x["step"]) for x in a]
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "lr", "reward_mean", "mu", "buffer_fill", "switch_frac", "pool_size"):
            if k in x:
                assert y[k] == pytest.approx(x[k], abs=1e-6, rel=1e-6), (x["stage"], x["step"], k)
        assert y["samples_total"] == x["samples_total"] and y["tokens_total"] == x["tokens_total"]
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, model_dirs):
    """10 SFT steps of batch 2 over 8 rows: epochs end after steps 4 and 8."""
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 3, "checkpoint": {"every": 0}, "stages": [stage("sft", 10)]}
    out = tmp_path_factory.mktemp("sft") / "ref"
    posttrain.train(r, out=out, data=SFT_ROWS, progress=False)
    return r, out


@pytest.mark.parametrize("stops", [[2], [4], [6], [3, 7]], ids=["mid-epoch", "epoch-boundary", "later-epoch",
                                                                "twice"])
def test_sft_resume_grid(tmp_path, monkeypatch, sft_reference, stops):
    r, ref = sft_reference
    out = tmp_path / "run"
    done = 0
    for at in stops:  # SIGTERM at the start of step `at` (1-based): that step finishes, is saved, the run stops
        stopped(r, out, monkeypatch, f"step@{at - done}=term")
        assert [x["step"] for x in metrics(out)] == list(range(1, at + 1))
        done = at
    summary = train(r, out, monkeypatch)
    assert summary["stages"]["sft"]["steps"] == 10
    assert_same_run(ref, out)


FAMILIES = {
    "grpo": stage("grpo", 6, ppo_epochs=2, kl={"beta": 0.05}),  # two updates per rollout batch
    "dapo": stage("dapo", 4, overlong={"mask_truncated": False}),
    "rft": stage("rft", 5, success_threshold=0.3, sources={"rounds": 3}),
    "luffy": stage("luffy", 4),
    "hpt": stage("hpt", 4, success_threshold=0.5),
    "srft": stage("srft", 4),
    "chord_mu": stage("chord_mu", 4, mix={"mu_warmup": 1, "mu_decay": 3}),
    "relift": stage("relift", 5, sources={"buffer_size": 2}),
    "prefix_rft": stage("prefix_rft", 4),
    "grpo_lora": {**stage("grpo", 4, kl={"beta": 0.1}, lora={"r": 4, "alpha": 8.0}), "name": "grpo_lora"},
    "ppo": stage("ppo", 6, ppo_epochs=2),  # the critic's weights and optimizer must come back too
    "ppo_lora": {**stage("ppo", 4, lora={"r": 4, "alpha": 8.0}), "name": "ppo_lora"},  # adapters + a full critic
    "ppo_shared": {**stage("ppo", 6, ppo_epochs=2, critic={"shared": True, "coef": 0.5}), "name": "ppo_shared"},
    "dpo": stage("dpo", 4),
    "kto": stage("kto", 4),
    # iterative DPO: the reference renewed before step 4, the run stopped in step 5: the checkpoint must carry it
    "online_dpo": stage("online_dpo", 6, preference={"refresh_every": 3}),
    "grpo_qlora": {**stage("grpo", 4, kl={"beta": 0.1}, lora={"r": 4, "alpha": 8.0, "quantize": "4bit"}),
                   "name": "grpo_qlora"},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_resumes_exactly(tmp_path, monkeypatch, model_dirs, family):
    """Stopped while generating the second batch's rollouts (rejection sampling: at step 3's start)."""
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 1, "checkpoint": {"every": 0}, "stages": [FAMILIES[family]]}
    train(r, tmp_path / "ref", monkeypatch)
    fault = "step@3=term" if family in ("rft", "dpo", "kto") else "generate@2=term"  # (no sampling in dpo, kto)
    if family == "online_dpo":  # while step 5 samples, after the reference was renewed
        fault = "generate@5=term"
    stopped(r, tmp_path / "run", monkeypatch, fault)
    if family == "rft":  # the verified rows already written stay; the round after the checkpoint is made again
        assert (tmp_path / "run" / "stages" / "rft" / "verified.jsonl").read_text() == \
            (tmp_path / "ref" / "stages" / "rft" / "verified.jsonl").read_text()[: len(
                (tmp_path / "run" / "stages" / "rft" / "verified.jsonl").read_text())]
    train(r, tmp_path / "run", monkeypatch)
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    if family == "relift":
        assert any(x.get("buffer_sft") for x in metrics(tmp_path / "ref"))  # the buffer did fill and drain
    if family == "rft":
        assert (tmp_path / "run" / "stages" / "rft" / "verified.jsonl").read_text() == \
            (tmp_path / "ref" / "stages" / "rft" / "verified.jsonl").read_text()


def test_later_stage_with_kl_reference_resumes_exactly(tmp_path, monkeypatch, model_dirs):
    """SFT then GRPO with a KL penalty: stopped in the second stage, the resumed run rebuilds the reference
    from the first stage's saved policy and matches; the finished first stage is not run again."""
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 2, "checkpoint": {"every": 0},
         "stages": [stage("sft", 3), stage("grpo", 4, kl={"beta": 0.1})]}
    train(r, tmp_path / "ref", monkeypatch)
    stopped(r, tmp_path / "run", monkeypatch, "step@5=term")  # the 2nd step of the GRPO stage
    assert [(x["stage"], x["step"]) for x in metrics(tmp_path / "run")][-1] == ("grpo", 2)
    train(r, tmp_path / "run", monkeypatch)
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    assert all(x["kl"] > 0 for x in metrics(tmp_path / "run") if x["stage"] == "grpo" and x["step"] > 1)


def test_rerun_of_a_finished_run_does_nothing_and_fresh_moves_it_aside(tmp_path, monkeypatch, model_dirs, caplog):
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [stage("sft", 2)]}
    out = tmp_path / "run"
    first = train(r, out, monkeypatch)
    before = (out / "metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="posttrain"):
        again = train(r, out, monkeypatch)
    assert "finished already: nothing to do" in caplog.text
    assert again == json.loads(json.dumps(first)) and (out / "metrics.jsonl").read_text() == before
    with caplog.at_level("INFO", logger="posttrain"):
        posttrain.train(r, out=out, data=SFT_ROWS, progress=False, fresh=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert len(aside) == 1 and "--fresh: moved the previous run's" in caplog.text and str(aside[0]) in caplog.text
    assert (aside[0] / "metrics.jsonl").read_text() == before and (aside[0] / "final" / "config.json").is_file()
    assert len(metrics(out)) == 2


def test_resuming_with_a_changed_recipe_is_refused_with_a_diff_unless_allowed(tmp_path, monkeypatch, model_dirs):
    from posttrain.recipe import RecipeError

    r = {"model": model_dirs["llama"], "device": "cpu", "checkpoint": {"every": 0}, "stages": [stage("sft", 6)]}
    out = tmp_path / "run"
    stopped(r, out, monkeypatch, "step@2=term")
    changed = {**r, "stages": [stage("sft", 8, optim={"lr": 2e-3})]}
    with pytest.raises(RecipeError, match=r"stage 'sft', resumed from 0-sft-step0000002, ran with another "
                                          r"configuration; the changes:\n  stages.0.optim.lr: 0.001 -> 0.002\n"
                                          r"  stages.0.steps: 6 -> 8\n"):
        train(changed, out, monkeypatch)
    assert len(metrics(out)) == 2  # the refused attempt touched nothing
    posttrain.train(changed, out=out, data=SFT_ROWS, progress=False, allow_change=["stages.0.steps",
                                                                                   "stages.*.optim.lr"])
    assert [x["step"] for x in metrics(out)] == list(range(1, 9))


def test_state_round_trip_restores_every_rng_and_the_optimizer(tmp_path, model_dirs, tokenizer):
    """Save a TrainState after two steps, load it into fresh objects: Python, NumPy, torch and sampler RNGs,
    Adam's moments and step, the scheduler's position and LR, counters and data cursors are all equal."""
    import random

    import numpy as np

    from posttrain.recipe import load_recipe
    from posttrain.training import checkpoint
    from posttrain.training.experience import Experience
    from posttrain.training.loop import new_state
    from posttrain.training.sources import Demonstrations
    from posttrain.data import encode_dataset
    from posttrain.data.loading import RowSet
    from posttrain.tiny import tiny_model

    st = load_recipe({"model": "m", "stages": [stage("sft", 5, data={"path": "x"})]}).stages[0]
    demos = encode_dataset(RowSet(SFT_ROWS, "rows"), "messages", tokenizer, max_len=64)[0]

    def fresh():
        exp = Experience(st, tokenizer, pad_id=0, demos=Demonstrations(demos, 4))
        return new_state(tiny_model("llama", tokenizer, seed=5), st, 7, exp)

    state = fresh()
    from posttrain.training.loop import run_stage

    run_stage(state, st, device="cpu", max_steps=3)
    torch.randn(3, generator=state.generator)
    random.random(), np.random.rand(), torch.rand(2)
    path = checkpoint.save(tmp_path, 0, "sft", state, {"config": "", "reward_errors": 0})
    expect = (random.random(), float(np.random.rand()), torch.rand(4), torch.rand(4, generator=state.generator))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    other = fresh()
    checkpoint.load(path, other)
    got = (random.random(), float(np.random.rand()), torch.rand(4), torch.rand(4, generator=other.generator))
    assert got[:2] == expect[:2] and torch.equal(got[2], expect[2]) and torch.equal(got[3], expect[3])
    a, b = state.optimizer.state_dict(), other.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    assert other.scheduler.last_epoch == state.scheduler.last_epoch == 3
    assert other.scheduler.get_last_lr() == state.scheduler.get_last_lr()
    assert (other.step, other.samples, other.tokens) == (state.step, state.samples, state.tokens)
    assert other.experience.state_dict() == state.experience.state_dict()
    assert all(torch.equal(x, y) for x, y in zip(state.model.state_dict().values(), other.model.state_dict().values()))


def _fork_train(r, out, fault: str) -> int:
    """Train in a forked child with POSTTRAIN_FAULTS set; returns the signal that ended it (0: none)."""
    import os

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.environ["POSTTRAIN_FAULTS"] = fault
            faults.reset()
            posttrain.train(r, out=out, data=SFT_ROWS, progress=False)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


@pytest.mark.slow
def test_kill_9_at_every_file_of_a_save_costs_at_most_that_checkpoint(tmp_path, monkeypatch, sft_reference):
    """Checkpoints every 2 steps; SIGKILL at each file operation of the second save (the 4 files, the rename,
    the commit marker). Every time, resume takes the step-2 checkpoint and reports the partial one, and the
    resumed run (checked for the first and last kill point) matches the uninterrupted one bitwise."""
    import signal

    from posttrain.training import checkpoint

    r, ref = sft_reference
    r = {**r, "checkpoint": {"every": 2, "keep": 5}}
    for k in range(7, 13):  # hits 1-6 are the first save's operations, 7-12 the second's
        out = tmp_path / f"k{k}"
        assert _fork_train(r, out, f"save@{k}=kill") == signal.SIGKILL
        found, skipped = checkpoint.latest(out / "checkpoints", 0, "sft")
        assert found is not None and found.step == 2, (k, found)
        assert len(skipped) == 1 and ("interrupted" in skipped[0]), (k, skipped)
        if k in (7, 12):
            train(r, out, monkeypatch)
            assert_same_run(ref, out)
            assert [f.step for f in checkpoint.committed(out / "checkpoints")] == [2, 4, 6, 8]
            assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
                checkpoint.name_of(0, "sft", s) for s in (2, 4, 6, 8)]  # the partial save was cleared away


@pytest.mark.slow
def test_kill_9_during_a_step_loses_only_the_steps_since_the_last_checkpoint(tmp_path, monkeypatch, sft_reference):
    import signal

    r, ref = sft_reference
    r = {**r, "checkpoint": {"every": 3, "keep": 1}}
    out = tmp_path / "run"
    assert _fork_train(r, out, "step@8=kill") == signal.SIGKILL  # at the start of step 8: steps 1-7 done
    assert [x["step"] for x in metrics(out)] == list(range(1, 8))
    train(r, out, monkeypatch)  # resumes from step 6; step 7's record is written again, once
    assert_same_run(ref, out)


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path, monkeypatch, sft_reference, caplog):
    from posttrain.training import checkpoint

    r, ref = sft_reference
    r = {**r, "checkpoint": {"every": 2}}
    out = tmp_path / "run"
    stopped(r, out, monkeypatch, "step@5=term")  # checkpoints at steps 4 and 5
    newest = out / "checkpoints" / checkpoint.name_of(0, "sft", 5) / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7] + b"garbage")
    with caplog.at_level("WARNING", logger="posttrain"):
        train(r, out, monkeypatch)
    assert "0-sft-step0000005: optimizer.safetensors does not match its hash" in caplog.text
    assert_same_run(ref, out)


def test_sft_on_rows_packed_an_epoch_at_a_time_resumes_exactly(tmp_path, monkeypatch, model_dirs):
    """batch.pack: rows (PackedDemonstrations): stopped mid-epoch, resumed at its (epoch, window, row), and the run
    equals the uninterrupted one."""
    st = stage("sft", 6, batch={"size": 2, "pack": "rows"}, data={"max_len": 48})
    r = {"model": model_dirs["llama"], "device": "cpu", "seed": 2, "checkpoint": {"every": 0}, "stages": [st]}
    train(r, tmp_path / "ref", monkeypatch)
    stopped(r, tmp_path / "run", monkeypatch, "step@4=term")
    train(r, tmp_path / "run", monkeypatch)
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    assert [x["samples"] for x in metrics(tmp_path / "ref")] == [2] * 6  # packed rows a step
