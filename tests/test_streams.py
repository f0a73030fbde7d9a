"""Streams end to end: demonstrations and rollouts in one step, their data checks, pipelines between stages,
and a rerun that skips the stages that finished."""
import ast
import json
import math
from pathlib import Path

import pytest
import torch

import posttrain
from letter_rewards import answer_is_a, varied
from posttrain.data.batch import DEMO, ROLLOUT
from posttrain.data.loading import DataError
from posttrain.models import save_pretrained
from posttrain.recipe import RecipeError
from posttrain.tiny import tiny_model
from posttrain.training.loop import new_state

PROMPT = [{"role": "user", "content": "Answer with the letter A."}]
ANSWER = [{"role": "assistant", "content": "A"}]
ROWS = [{"prompt": PROMPT, "answer": "A", "completion": ANSWER, "id": f"q{i}"} for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("m") / "llama"
    save_pretrained(tiny_model("llama", tokenizer, seed=0), tokenizer, d,
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    return str(d)


def stage(method, steps=2, **kw):
    st = {"method": method, "data": {}, "steps": steps, "optim": {"lr": 1e-3}, "batch": {"size": 2},
          "rollout": {"group_size": 4, "max_new_tokens": 5}}
    st.update(kw)
    return st


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_hybrid_logs_its_mixer_state(tmp_path, model_dir):
    expect = {"luffy": "demo_token_share", "hpt": "switch_frac", "srft": "loss/demo", "chord_mu": "mu",
              "relift": "buffer_fill", "prefix_rft": "prefix_len"}
    for method, key in expect.items():
        out = tmp_path / method
        posttrain.train({"model": model_dir, "stages": [stage(method, **({"mix": {"hpt_gamma": 1.0}} if method == "hpt"
                                                                          else {}))]},
                        out=out, data=ROWS, rewards=[varied], progress=False)
        rows = metrics(out)
        assert all(key in r for r in rows), (method, key, rows[0])
        assert all(math.isfinite(r["loss"]) for r in rows), method


def test_luffy_puts_one_demonstration_in_each_group(tmp_path, model_dir, tokenizer):
    from posttrain.recipe import load_recipe
    from posttrain.rewards import RewardScorer, RewardSpec
    from posttrain.training.experience import Experience
    from posttrain.training.sources import PairedDemos

    st = load_recipe({"model": "m", "stages": [stage("luffy", rewards=[{"fn": "exact"}], data={"path": "x"})]}
                     ).stages[0]
    model = tiny_model("llama", tokenizer, seed=0)
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with RewardScorer([RewardSpec(fn=answer_is_a)]) as scorer:
        exp = Experience(st, tokenizer, pad_id=tokenizer.eos_token_id, stop_ids=stop, rows=ROWS, scorer=scorer,
                         paired=PairedDemos(tokenizer), total_steps=2)
        data = exp.make(model, 0, torch.Generator().manual_seed(0))
    b = data.batch
    assert b.size == 2 * 4
    for g in b.group.unique().tolist():
        rows = b.group == g
        assert int((b.stream[rows] == DEMO).sum()) == 1 and int((b.stream[rows] == ROLLOUT).sum()) == 3
    demo = b.stream == DEMO
    # the demonstration is scored (answer_is_a: it starts with A) and enters its group's statistics
    assert bool((b.advantages[demo].sum(1) > 0).all())


def test_a_row_without_the_needed_demonstration_is_reported_before_step_0(tmp_path, model_dir):
    rows = [dict(r) for r in ROWS]
    del rows[5]["completion"]
    for method in ("luffy", "hpt", "relift", "prefix_rft", "chord_mu"):
        with pytest.raises(DataError) as e:
            posttrain.train({"model": "/nonexistent", "stages": [stage(method)]}, out=tmp_path / method, data=rows,
                            rewards=[varied], progress=False)
        assert "row 6" in str(e.value) and method in str(e.value), str(e.value)
    # grpo needs no demonstration: the same rows are fine (the run fails later only for the missing model)
    with pytest.raises(Exception) as e:
        posttrain.train({"model": "/nonexistent", "stages": [stage("grpo")]}, out=tmp_path / "g", data=rows,
                        rewards=[varied], progress=False)
    assert not isinstance(e.value, DataError)


def test_demonstrations_from_a_separate_dataset(tmp_path, model_dir):
    prompts = [{"prompt": PROMPT, "answer": "A"} for _ in range(4)]
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps({"prompt": PROMPT, "completion": ANSWER}) for _ in range(3)))
    for method in ("chord_phi", "luffy"):
        st = stage(method, demos={"path": str(demos)})
        summary = posttrain.train({"model": model_dir, "stages": [st]}, out=tmp_path / method, data=prompts,
                                  rewards=[varied], progress=False)
        assert summary["stages"][method]["steps"] == 2
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "something else", "completion": "B"}))
    with pytest.raises(DataError) as e:  # LUFFY pairs by prompt: a prompt with no demonstration is named
        posttrain.train({"model": model_dir, "stages": [stage("luffy", demos={"path": str(other)})]},
                        out=tmp_path / "bad", data=prompts, rewards=[varied], progress=False)
    assert "row 1" in str(e.value) and "other.jsonl" in str(e.value)
    with pytest.raises(RecipeError, match="reads no separate demonstrations"):
        posttrain.train({"model": model_dir, "stages": [stage("grpo", demos={"path": str(demos)})]},
                        out=tmp_path / "g", data=prompts, rewards=[varied], progress=False)


def test_rft_writes_verified_samples_that_a_later_stage_reads(tmp_path):
    """On the shipped model (it stops; a random one never does, and truncated samples are never kept)."""
    collect = stage("rft", name="collect", steps=2, data={"task": "arith", "limit": 16},
                    rewards=[{"fn": "correct"}], sources={"rounds": 2, "round_prompts": 8},
                    rollout={"group_size": 4, "max_new_tokens": 48})
    r = {"model": "builtin:tiny", "stages": [
        collect, {"method": "sft", "name": "again", "data": {"from_stage": "collect"}, "steps": 2,
                  "batch": {"size": 2}}]}
    summary = posttrain.train(r, out=tmp_path / "run", progress=False)
    path = tmp_path / "run" / "stages" / "collect" / "verified.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and {r["round"] for r in rows} == {1, 2}
    from posttrain.tasks.arith import is_correct

    assert all(r["reward"] == 1.0 and is_correct(r["completion"][0]["content"], r["answer"]) for r in rows)
    assert summary["stages"]["again"]["rows"] == len(rows) and summary["stages"]["again"]["steps"] == 2
    recs = metrics(tmp_path / "run")
    assert [r.get("rft_round") for r in recs[:2]] == [1, 2] and "verified_frac" in recs[0]
    with pytest.raises(RecipeError, match="not an earlier stage"):
        posttrain.train({"model": "m", "stages": [{"method": "sft", "data": {"from_stage": "x"}}]},
                        out=tmp_path / "bad", progress=False)


def test_rerun_skips_finished_stages_and_a_failed_stage_keeps_earlier_outputs(tmp_path, model_dir):
    r = {"model": model_dir, "stages": [stage("sft", name="first"), stage("grpo", name="second")]}
    out = tmp_path / "run"
    data = {"first": [{"messages": PROMPT + ANSWER}] * 4, "second": ROWS}

    def boom(prompts, completions, **kw):
        return [1.0]  # one value for a batch of several: a broken reward function stops the run

    with pytest.raises(ValueError, match="boom"):
        posttrain.train(r, out=out, data=data, rewards={"second": [boom]}, progress=False)
    assert (out / "stages" / "first" / "model" / "model.safetensors").is_file()
    progress = json.loads((out / "progress.json").read_text())
    assert list(progress["stages"]) == ["first"]
    summary = posttrain.train(r, out=out, data=data, rewards={"second": [varied]}, progress=False)
    recs = metrics(out)
    assert [x["stage"] for x in recs] == ["first", "first", "second", "second"]  # first ran once
    assert summary["stages"]["first"]["steps"] == 2 and summary["stages"]["second"]["steps"] == 2
    with pytest.raises(RecipeError, match="the changes:\n  seed: 0 -> 1\n"):
        posttrain.train({**r, "seed": 1}, out=out, data=data, rewards={"second": [varied]}, progress=False)
    changed = {"model": model_dir, "stages": [stage("sft", name="first", steps=3), r["stages"][1]]}
    with pytest.raises(RecipeError, match="'first', which finished, ran with another configuration; the changes:\n"
                                          "  stages.0.steps: 2 -> 3\n"):
        posttrain.train(changed, out=out, data=data, rewards={"second": [varied]}, progress=False)


def test_sampling_generator_lives_on_the_models_device(tokenizer):
    from posttrain.recipe import load_recipe
    from posttrain.training.experience import Experience

    st = load_recipe({"model": "m", "stages": [stage("sft", data={"path": "x"})]}).stages[0]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model = tiny_model("llama", tokenizer).to(device)
        state = new_state(model, st, 0, Experience(st, tokenizer, pad_id=0))
        assert state.generator.device.type == device
        probs = torch.softmax(torch.randn(3, 7, device=device), -1)
        torch.multinomial(probs, 1, generator=state.generator)  # a CPU generator fails here on CUDA


def test_eval_does_not_import_training():
    root = Path(posttrain.__file__).parent / "eval"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "training" not in (node.module or ""), f"{path.name} imports {node.module}"


def test_r1_recipe_runs_all_four_stages_quickly(tmp_path):
    """The shipped r1 pipeline (SFT -> GRPO -> RFT -> GRPO) end to end, each stage cut to 2 small steps."""
    over = {"eval.splits": ["id"], "eval.n": 8, "eval.max_new_tokens": 24}
    for i in range(4):
        over[f"stages.{i}.batch.size"] = 4
    for i in (1, 2, 3):
        over[f"stages.{i}.rollout.group_size"] = 4
        over[f"stages.{i}.rollout.max_new_tokens"] = 32
    over["stages.2.sources.round_prompts"] = 16
    summary = posttrain.train("builtin:r1", out=tmp_path / "r1", max_steps=2, overrides=over, progress=False)
    assert list(summary["stages"]) == ["cold_start", "rl", "rejection", "rl2"]
    assert all(s["steps"] == 2 for s in summary["stages"].values())
    verified = (tmp_path / "r1" / "stages" / "rejection" / "verified.jsonl").read_text().splitlines()
    assert verified, "the RL policy verified none of 64 samples"
    for name in summary["stages"]:
        assert (tmp_path / "r1" / "stages" / name / "model" / "model.safetensors").is_file()
