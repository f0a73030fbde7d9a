"""GPU paths: skipped without CUDA. What they rely on that runs on a CPU is tested elsewhere on the CPU
(dtype choice, fp32 estimator math, sampler/log-prob agreement)."""
import pytest
import torch

import posttrain
from letter_rewards import varied
from posttrain.models import choose_dtype, save_pretrained
from posttrain.tiny import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_defaults_to_fp32():
    assert choose_dtype("auto", "cpu") == torch.float32


@cuda
def test_cuda_defaults_to_bf16_when_supported():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert choose_dtype("auto", "cuda") == want


@cuda
@pytest.mark.parametrize("method", ["grpo", "luffy", "prefix_rft", "hpt", "chord_mu", "ppo", "remax", "dppo", "sdft"])
def test_rl_and_hybrids_three_steps_on_cuda_bf16(tmp_path, tokenizer, method):
    """Sampling on the GPU with the training generator (a CPU generator fails in torch.multinomial there),
    demonstrations and rollouts in one bf16 step."""
    save_pretrained(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    recipe = {"model": str(tmp_path / "m"), "device": "cuda", "stages": [{
        "method": method, "data": {}, "steps": 3, "batch": {"size": 2},
        "rollout": {"group_size": 4, "max_new_tokens": 6}, "mix": {"hpt_gamma": 1.0} if method == "hpt" else {}}]}
    rows = [{"prompt": "Say A.", "answer": "A", "completion": "A"}] * 4
    summary = posttrain.train(recipe, out=tmp_path / "run", data=rows, rewards=[varied], progress=False)
    assert summary["device"].startswith("cuda") and summary["dtype"] == "bfloat16"
    assert summary["stages"][method]["steps"] == 3


@cuda
@pytest.mark.parametrize("method", ["kd", "reward_model"])
def test_distillation_and_reward_models_on_cuda_bf16(tmp_path, tokenizer, method):
    """KD's teacher targets and a reward model's scalar head, on the GPU in bf16 (scores and losses in fp32)."""
    save_pretrained(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    rows = [{"prompt": f"Say {c}.", "completion": c, "chosen": c, "rejected": c.lower() + "x"} for c in "ABCD"]
    if method == "reward_model":
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    else:
        rows = [{k: r[k] for k in ("prompt", "completion")} for r in rows]
    recipe = {"model": str(tmp_path / "m"), "device": "cuda", "teacher": str(tmp_path / "m"),
              "stages": [{"method": method, "data": {}, "steps": 3, "batch": {"size": 2}}]}
    summary = posttrain.train(recipe, out=tmp_path / "run", data=rows, progress=False)
    assert summary["dtype"] == "bfloat16" and summary["stages"][method]["steps"] == 3
    assert all(v == v for v in summary["stages"][method]["final"].values() if isinstance(v, float))  # no NaN


@cuda
def test_a_run_stopped_and_resumed_on_cuda_continues_from_its_checkpoint(tmp_path, tokenizer, monkeypatch, capsys):
    """The checkpoint path on the GPU: CUDA weights and Adam state saved and restored onto the device, the
    sampler's CUDA generator and the CUDA RNG restored. bf16 kernels need not be bitwise reproducible, so the
    test asserts the resumed run completes with the same steps, and prints how far it drifted."""
    import json

    from posttrain import faults
    from posttrain.errors import Interrupted
    from posttrain.training import checkpoint

    save_pretrained(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    recipe = {"model": str(tmp_path / "m"), "device": "cuda", "checkpoint": {"every": 0}, "stages": [{
        "method": "grpo", "data": {}, "steps": 4, "batch": {"size": 2}, "rollout": {"group_size": 4,
                                                                                    "max_new_tokens": 6}}]}
    rows = [{"prompt": f"Say {c}.", "answer": c} for c in "ABCD"]

    def go(out, fault=None):
        faults.reset()
        if fault:
            monkeypatch.setenv("POSTTRAIN_FAULTS", fault)
        else:
            monkeypatch.delenv("POSTTRAIN_FAULTS", raising=False)
        return posttrain.train(recipe, out=out, data=rows, rewards=[varied], progress=False)

    go(tmp_path / "ref")
    with pytest.raises(Interrupted):
        go(tmp_path / "run", "generate@2=term")
    found, _ = checkpoint.latest(tmp_path / "run" / "checkpoints", 0, "grpo")
    assert found.step == 2
    go(tmp_path / "run")
    a, b = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ref", "run")]
    assert [x["step"] for x in b] == [x["step"] for x in a] == [1, 2, 3, 4]
    drift = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    with capsys.disabled():
        print(f"\ncuda resume: max |loss(resumed) - loss(uninterrupted)| over 4 steps = {drift:.3g}")


@cuda
def test_qlora_grpo_on_cuda_bf16_trains_the_adapters_and_merges(tmp_path, tokenizer):
    """QLoRA on the GPU: NF4 base in bf16 compute, KL to the adapters-off reference 0 at the start, a plain
    merged `final/` that transformers loads."""
    pytest.importorskip("bitsandbytes", reason="pip install 'posttrain[qlora]'")
    from transformers import AutoModelForCausalLM

    save_pretrained(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    recipe = {"model": str(tmp_path / "m"), "device": "cuda", "stages": [{
        "method": "grpo", "data": {}, "steps": 3, "batch": {"size": 2}, "optim": {"lr": 1e-2}, "kl": {"beta": 0.1},
        "rollout": {"group_size": 4, "max_new_tokens": 6}, "lora": {"r": 4, "alpha": 8.0, "quantize": "4bit"}}]}
    rows = [{"prompt": "Say A.", "answer": "A"}] * 4
    summary = posttrain.train(recipe, out=tmp_path / "run", data=rows, rewards=[varied], progress=False)
    assert summary["stages"]["grpo"]["steps"] == 3 and summary["dtype"] == "bfloat16"
    import json

    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")


@cuda
def test_packed_logprobs_and_chunked_head_on_cuda_equal_the_padded_full_ones(tokenizer):
    """On the GPU (SDPA, fp32): packed rows keep documents apart through their positions, and the chunked LM
    head gives the full logits' log-probs and entropies."""
    from posttrain.data.batch import demo_batch, packed_demo_batch
    from posttrain.data.encode import encode_sft
    from posttrain.logprobs import token_logprobs

    model = tiny_model("llama", tokenizer).cuda().eval()
    docs = [encode_sft({"prompt": f"Say {c}.", "completion": c * (i + 1)}, "prompt_completion", tokenizer)
            for i, c in enumerate("ABCDE")]
    packed = packed_demo_batch(docs, tokenizer.eos_token_id, pack_len=40).to("cuda")
    padded = demo_batch(docs, tokenizer.eos_token_id).to("cuda")
    with torch.no_grad():
        lp, _ = token_logprobs(model, packed.input_ids, packed.attention_mask, position_ids=packed.position_ids)
        ref, ref_ent = token_logprobs(model, padded.input_ids, padded.attention_mask, with_entropy=True,
                                      chunk_mb=None)
        ch, ch_ent = token_logprobs(model, padded.input_ids, padded.attention_mask, with_entropy=True, chunk_size=2)
    got, want = lp[packed.loss_mask > 0].sort().values, ref[padded.loss_mask > 0].sort().values
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(ch, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ch_ent, ref_ent, atol=1e-5, rtol=0)


@cuda
def test_ppo_with_a_shared_value_head_and_grpo_with_the_sampler_correction_on_cuda_bf16(tmp_path, tokenizer):
    """critic.shared (the value head on the policy's bf16 backbone) and rollout.correction (the bf16 sampler's
    log-probs against the trainer's): three steps each, finite, the weights logged."""
    import json

    save_pretrained(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    rows = [{"prompt": "Say A.", "answer": "A"}] * 4
    for method, extra in [("ppo", {"critic": {"shared": True}}), ("grpo", {"rollout": {"group_size": 4,
                                                                                        "max_new_tokens": 6,
                                                                                        "correction": "token"}})]:
        stage = {"method": method, "data": {}, "steps": 3, "batch": {"size": 2},
                 "rollout": {"group_size": 4, "max_new_tokens": 6}, **extra}
        out = tmp_path / method
        summary = posttrain.train({"model": str(tmp_path / "m"), "device": "cuda", "stages": [stage]}, out=out,
                                  data=rows, rewards=[varied], progress=False)
        assert summary["dtype"] == "bfloat16" and summary["stages"][method]["steps"] == 3
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        key = "value_loss" if method == "ppo" else "is_weight"
        assert all(key in r and r[key] == r[key] for r in recs), recs


@cuda
def test_bf16_mixed_with_activation_checkpointing_and_keyed_sampling_on_cuda(tmp_path, tokenizer):
    """fp32 master weights under bf16 autocast, layers recomputed in backward, keyed sampling noise on the GPU."""
    save_pretrained(tiny_model("llama", tokenizer), tokenizer, tmp_path / "m",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    recipe = {"model": str(tmp_path / "m"), "device": "cuda", "dtype": "bf16-mixed", "stages": [{
        "method": "grpo", "data": {}, "steps": 3, "batch": {"size": 2, "activation_checkpointing": True},
        "rollout": {"group_size": 4, "max_new_tokens": 6, "seeding": "row"}}]}
    rows = [{"prompt": "Say A.", "answer": "A"}] * 4
    summary = posttrain.train(recipe, out=tmp_path / "run", data=rows, rewards=[varied], progress=False)
    assert summary["dtype"] == "float32" and summary["stages"]["grpo"]["steps"] == 3
    assert all(v == v for v in summary["stages"]["grpo"]["final"].values() if isinstance(v, float))


@cuda
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_with_the_vllm_engine(tmp_path, lora):
    """rollout.engine: vllm on the built-in model and task: weights synced each step, samples scored and corrected.
    A LoRA policy: its base once, its adapter each step (enable_lora), the samples corrected the same way."""
    pytest.importorskip("vllm")
    stage = {"method": "grpo", "data": {"task": "arith", "split": "train"}, "steps": 3, "batch": {"size": 4},
             "rewards": [{"fn": "correct"}],
             "rollout": {"group_size": 4, "max_new_tokens": 32, "engine": "vllm", "vllm_memory": 0.2}}
    if lora:
        stage.update(lora={"r": 8}, optim={"lr": 2.0e-3})
    summary = posttrain.train({"model": "builtin:tiny", "device": "cuda", "stages": [stage]},
                              out=tmp_path / "run", progress=False)
    final = summary["stages"]["grpo"]["final"]
    assert summary["stages"]["grpo"]["steps"] == 3
    assert 0.5 < final["is_weight"] < 1.5 and final["sampler_mismatch"] < 0.5


@cuda
@pytest.mark.parametrize("precision", ["float32", "bf16-mixed"])
def test_shared_prompts_on_cuda_equal_the_padded_rows(tokenizer, precision):
    """batch.share_prompts' tree mask through CUDA SDPA (a boolean 4-D mask: no flash kernel, the memory-efficient
    or math one): the same log-probs and gradients as the padded rows, in float32 to 1e-5, under bf16 autocast to
    bf16 rounding."""
    from posttrain.logprobs import token_logprobs

    model = tiny_model("qwen2", tokenizer).cuda()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (9, 5, 12)]
    rows = [p + torch.randint(1, V, (k,), generator=g).tolist() for p in prompts for k in (3, 6, 1, 4)]
    groups = torch.arange(3).repeat_interleave(4).cuda()
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows]).cuda()
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]).cuda()

    def run(**kw):
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16-mixed"):
            logp, _ = token_logprobs(model, ids, mask, **kw)
        logp.sum().backward()
        return logp.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    logp, grad = run()
    s_logp, s_grad = run(groups=groups, min_shared=None)
    tol = 1e-5 if precision == "float32" else 0.05
    torch.testing.assert_close(s_logp, logp, atol=tol, rtol=0)
    assert float((s_grad - grad).norm() / grad.norm()) < (1e-4 if precision == "float32" else 0.05)
