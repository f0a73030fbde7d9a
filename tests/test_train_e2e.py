"""End to end through the one loop: every preset runs on tiny models of every architecture, gradient
accumulation is invariant through a real model, the run directory honours its contract."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain
from letter_rewards import answer_is_a, fails_on_q1, varied
from posttrain.models import save_pretrained
from posttrain.objective.presets import PRESETS
from posttrain.tiny import ARCHITECTURES, tiny_model
from posttrain.data.batch import ROLLOUT, rollout_batch
from posttrain.objective.estimator import StreamComponents
from posttrain.training.update import ObjectiveSpec, accumulate_gradients

PROMPT = [{"role": "user", "content": "Answer with the letter A."}]
ANSWER = [{"role": "assistant", "content": "A"}]
RL_ROWS = [{"prompt": PROMPT, "answer": "A", "completion": ANSWER, "id": f"q{i}"} for i in range(8)]
SFT_ROWS = [{"messages": PROMPT + [{"role": "assistant", "content": "A"}]} for _ in range(8)]
PREF_ROWS = [{"prompt": PROMPT, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "B"}]}] * 8
UNPAIRED_ROWS = [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": "AB"[i % 2]}], "label": i % 2 == 0}
                 for i in range(8)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHITECTURES:
        m = tiny_model(arch, tokenizer, seed=0)
        save_pretrained(m, tokenizer, root / arch, stop_ids=[tokenizer.eos_token_id,
                                                             tokenizer.convert_tokens_to_ids("<|im_end|>")])
        out[arch] = str(root / arch)
    return out


def recipe(model_dir, method, steps=3, **stage):
    st = {"method": method, "data": {}, "steps": steps, "optim": {"lr": 1e-3}, "batch": {"size": 2},
          "rollout": {"group_size": 4, "max_new_tokens": 6}, "log_every": 1}
    for k, v in stage.items():
        st[k] = v
    teacher = {"teacher": model_dir} if PRESETS[method].distill_coef else {}  # (the model itself: a smoke run)
    return {"model": model_dir, "seed": 0, "stages": [st], **teacher}


def run(tmp_path, model_dir, method, **stage):
    rl = PRESETS[method].needs_rewards
    data = {"prompts": RL_ROWS, "demonstrations": SFT_ROWS, "preferences": PREF_ROWS,
            "unpaired": UNPAIRED_ROWS}[PRESETS[method].data]
    return posttrain.train(recipe(model_dir, method, **stage), out=tmp_path / "run", data=data,
                           rewards=[varied] if rl else None, progress=False)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


FAST = [(m, a) for m in PRESETS for a in ("llama", "qwen2")] + [(m, a) for a in ("mistral", "gpt2")
                                                                for m in ("sft", "grpo", "dpo")]
SLOW = [(m, a) for a in ARCHITECTURES for m in PRESETS if (m, a) not in FAST]


def _check_run(tmp_path, model_dir, method):
    # A random tiny model never stops within 6 tokens: DAPO would mask every (truncated) completion.
    extra = {"overlong": {"mask_truncated": False}} if method == "dapo" else {}
    if method == "rft":  # verify every sample whose reward is at least 0.1 (varied() gives 0.1 .. 0.6) and that
        # stopped: a random model samples one of the 2 stop ids of 320 about once in 160 tokens, so 2 x 8 samples of
        # up to 64 tokens all run to the limit with probability ~0.2 % (4 x 6 tokens: ~75 %)
        extra = {"success_threshold": 0.1, "rollout": {"group_size": 8, "max_new_tokens": 64}}
    summary = run(tmp_path, model_dir, method, **extra)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["stage"] == method
    if PRESETS[method].needs_rewards and method != "rft":
        assert {"reward_mean", "accuracy", "response_len", "entropy", "t_rollout"} <= set(rows[0])
    assert summary["stages"][method]["steps"] == 3


@pytest.mark.parametrize("method,arch", FAST)
def test_preset_runs_three_steps(tmp_path, model_dirs, method, arch):
    _check_run(tmp_path, model_dirs[arch], method)


@pytest.mark.slow
@pytest.mark.parametrize("method,arch", SLOW)
def test_preset_runs_three_steps_every_arch(tmp_path, model_dirs, method, arch):
    _check_run(tmp_path, model_dirs[arch], method)


def test_run_directory_contract(tmp_path, model_dirs):
    summary = run(tmp_path, model_dirs["qwen2"], "sft")
    out = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final", "tb", "run.log"} <= {p.name for p in out.iterdir()}
    assert any((out / "tb").iterdir())
    assert json.loads((out / "summary.json").read_text())["stages"]["sft"]["steps"] == summary["stages"]["sft"]["steps"]
    for key in ("step", "stage", "loss", "lr", "grad_norm"):
        assert key in metrics(out)[0]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template and "<|im_end|>" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed, "training changed no weight"


def test_multi_stage_sft_then_grpo_and_columns_reach_rewards(tmp_path, model_dirs):
    r = recipe(model_dirs["llama"], "sft", steps=2)
    r["stages"].append({"method": "grpo", "name": "rl", "data": {}, "steps": 2, "batch": {"size": 2},
                        "rollout": {"group_size": 2, "max_new_tokens": 4}, "ppo_epochs": 2, "minibatches": 2})
    summary = posttrain.train(r, out=tmp_path / "run", data={"sft": SFT_ROWS, "rl": RL_ROWS},
                              rewards={"rl": [answer_is_a]}, progress=False)
    assert list(summary["stages"]) == ["sft", "rl"]
    rows = metrics(tmp_path / "run")
    assert [r["stage"] for r in rows] == ["sft", "sft", "rl", "rl"]
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["reward_errors"] == 0 and "reward/answer_is_a" in rows[2]  # on the batch's first update
    assert "reward_errors" not in rows[3]  # ... and only there: counted once per rollout batch
    # two updates per rollout batch: old_logp comes from a trainer pass, so the first update's ratio is 1
    assert abs(rows[2]["ratio_mean"] - 1.0) < 1e-5 and rows[2]["clipfrac"] == 0.0


def test_reward_errors_are_masked_counted_and_logged(tmp_path, model_dirs, caplog):
    r = recipe(model_dirs["llama"], "grpo", steps=2, batch={"size": 8}, rollout={"group_size": 2, "max_new_tokens": 4})
    summary = posttrain.train(r, out=tmp_path / "run", data=RL_ROWS, rewards=[fails_on_q1], progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["reward_errors"] for r in rows] == [2, 2]  # the two samples of row q1, every step
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert summary["stages"]["grpo"]["reward_errors"] == 4
    assert "q1" in (tmp_path / "run" / "run.log").read_text()


def test_dapo_logs_fill_ratio_and_rloo_kl_in_reward(tmp_path, model_dirs):
    run(tmp_path, model_dirs["llama"], "dapo")  # (nearly) every completion is truncated and masked: no group left
    rows = metrics(tmp_path / "run")
    assert all(r["skipped"] == 1 and r["fill_ratio"] == 0 and r["truncated_frac"] > 0.9 for r in rows)
    run(tmp_path / "b", model_dirs["llama"], "rloo")
    kls = [r["kl"] for r in metrics(tmp_path / "b" / "run")]
    assert kls[0] == 0.0  # the reference is the policy at the stage's start
    assert all(math.isfinite(k) for k in kls) and kls[-1] != 0.0


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


@pytest.mark.parametrize("aggregation", ["tok", "seq", "const", "sum"])
def test_gradient_accumulation_invariant_through_model(tokenizer, aggregation):
    """micro-batches of one group (2 rows) x 4 == one batch of 8, with ragged padding, clip and a KL term on
    (fp32, 1e-5)."""
    model = tiny_model("llama", tokenizer, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(8)]
    comps = [torch.randint(5, 200, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
             for _ in range(8)]
    adv = torch.randn(8, generator=g)
    batch = rollout_batch(prompts, comps, adv, torch.ones(8, dtype=torch.bool), pad_id=0, group=[0, 0, 1, 1, 2, 2, 3, 3])
    batch.old_logp = (torch.randn(batch.loss_mask.shape, generator=g) * 0.2 - 4) * batch.loss_mask
    batch.ref_logp = (torch.randn(batch.loss_mask.shape, generator=g) * 0.2 - 4) * batch.loss_mask
    rollout = StreamComponents(weight="ratio", clip="token", aggregation=aggregation, eps_low=0.2, eps_high=0.28,
                               eps_max=5.0, shaping_gamma=0.1, max_len=6, kl=True)
    spec = ObjectiveSpec(streams={ROLLOUT: rollout}, joint=False, kl_beta_loss=0.05, kl_estimator="k3",
                         entropy_coef=0.01, temperature=1.0, with_entropy=True)
    accumulate_gradients(model, batch, spec, micro_size=8, device="cpu")
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batch, spec, micro_size=1, device="cpu")
    torch.testing.assert_close(_grads(model), full, rtol=1e-5, atol=1e-7)
    assert full.abs().sum() > 0


def test_rollout_native_decode_picks_the_samplers_decode_step(tmp_path, model_dirs, monkeypatch):
    from posttrain.rollout import decode

    calls = []
    step = decode.NativeDecoder.step
    monkeypatch.setattr(decode.NativeDecoder, "step", lambda self, *a: calls.append(1) or step(self, *a))
    run(tmp_path / "native", model_dirs["llama"], "grpo", steps=2)
    native_steps = len(calls)
    run(tmp_path / "forward", model_dirs["llama"], "grpo", steps=2,
        rollout={"group_size": 4, "max_new_tokens": 6, "native_decode": False})
    assert native_steps > 0 and len(calls) == native_steps


def test_rollout_cuda_graphs_reaches_the_sampler(tmp_path, model_dirs, monkeypatch):
    """The key's value is what the sampler is called with (on a CPU the graph is never captured: that path is
    tests/test_decode.py's, on a GPU)."""
    from posttrain.training import experience

    seen = []
    sample = experience.sample
    monkeypatch.setattr(experience, "sample", lambda *a, **kw: seen.append(kw["graphs"]) or sample(*a, **kw))
    run(tmp_path / "off", model_dirs["llama"], "grpo", steps=1,
        rollout={"group_size": 4, "max_new_tokens": 6, "cuda_graphs": False})
    run(tmp_path / "on", model_dirs["llama"], "grpo", steps=1)
    assert seen and set(seen[: len(seen) // 2]) == {False} and seen[-1] is True


@pytest.mark.parametrize("method, extra", [("grpo", {"kl": {"beta": 0.1}}), ("luffy", {})])
def test_shared_prompts_train_like_the_padded_rows(tmp_path, model_dirs, monkeypatch, method, extra):
    """batch.share_prompts: true reaches every log-prob pass of the step (the training pass, and the reference's
    for the KL term) with the rows' groups, false none, and the first step's figures are equal (same samples, the
    same log-probs up to float32 rounding); LUFFY's groups mix demonstrations with samples."""
    import posttrain.training.experience as experience
    import posttrain.training.update as update

    import posttrain.logprobs as logprobs

    calls, layouts = [], []
    layout = logprobs.shared_prefix_layout
    monkeypatch.setattr(logprobs, "shared_prefix_layout", lambda *a, **kw: layouts.append(1) or layout(*a, **kw))
    for mod in (experience, update):
        real = mod.token_logprobs
        monkeypatch.setattr(mod, "token_logprobs", lambda *a, _real=real, **kw: calls.append(kw.get("groups") is not None)
                            or _real(*a, **kw))
    off = run(tmp_path / "off", model_dirs["qwen2"], method, steps=1, batch={"size": 2, "share_prompts": False}, **extra)
    assert calls and not any(calls)
    calls.clear()
    on = run(tmp_path / "on", model_dirs["qwen2"], method, steps=1, batch={"size": 2, "share_prompts": True}, **extra)
    assert calls and all(calls) and len(layouts) == len(calls)  # (qwen2's attention takes the tree mask)
    a, b = (metrics(tmp_path / d / "run")[0] for d in ("off", "on"))
    for key in ("loss", "grad_norm", "reward_mean", "entropy") + (("kl",) if "kl" in a else ()):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert off["stages"][method]["steps"] == on["stages"][method]["steps"] == 1
