"""LoRA stages: only the adapters train and are checkpointed; the KL reference is the base with the adapters
disabled; `final/` holds merged weights (W + (alpha/r) B A, to 1e-6) that plain transformers loads, with the
adapter beside it in `final/adapter/` that peft loads; QLoRA trains on an NF4-quantized base."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import posttrain
from letter_rewards import varied
from posttrain.recipe import RecipeError
from test_resume import RL_ROWS, SFT_ROWS
from test_train_e2e import metrics, model_dirs  # noqa: F401  (model_dirs: a fixture)

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_a_lora_sft_stage_merges_to_base_plus_scaled_BA_and_keeps_the_adapter(tmp_path, model_dirs):
    base_dir = model_dirs["llama"]
    r = {"model": base_dir, "device": "cpu", "checkpoint": {"every": 1},
         "stages": [{"method": "sft", "data": {}, "steps": 3, "optim": {"lr": 1e-2}, "lora": LORA}]}
    posttrain.train(r, out=tmp_path / "run", data=SFT_ROWS, progress=False)
    base = load_file(f"{base_dir}/model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    adapter = load_file(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors")
    scale = LORA["alpha"] / LORA["r"]
    targeted = 0
    for name, w in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = adapter.get(prefix + ".lora_A.weight"), adapter.get(prefix + ".lora_B.weight")
        if a is None:
            assert torch.equal(final[name], w), name  # not a target: untouched
            continue
        targeted += 1
        expect = w.double() + scale * (b.double() @ a.double())
        assert torch.allclose(final[name].double(), expect, atol=1e-6, rtol=0), name
        assert not torch.equal(final[name], w), name  # the adapter did learn something
    assert targeted == 3 * 2  # q, v, down in each of the 2 layers
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))  # adapters only
    # the merged weights load in plain transformers; peft's base + adapter gives the same outputs
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                           str(tmp_path / "run" / "final" / "adapter")).eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_lora_grpo_with_kl_uses_the_disabled_adapters_as_reference(tmp_path, model_dirs):
    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [{
        "method": "grpo", "data": {}, "steps": 3, "optim": {"lr": 1e-2}, "batch": {"size": 2},
        "rollout": {"group_size": 4, "max_new_tokens": 6}, "kl": {"beta": 0.1}, "lora": LORA}]}
    posttrain.train(r, out=tmp_path / "run", data=RL_ROWS, rewards=[varied], progress=False)
    recs = metrics(tmp_path / "run")
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # at the start the policy is the reference
    assert recs[-1]["kl"] > 0  # then the adapters move it away


def test_a_qlora_sft_stage_trains_on_the_4bit_base_and_merges_in_full_precision(tmp_path, model_dirs):
    """Every Linear but the head is NF4-quantized (bitsandbytes, here on the CPU); the adapters train through the
    4-bit matmuls; `final/` is dequant(quant(W)) + (alpha/r) B A for adapted layers, dequant(quant(W)) for the
    other Linears, and the embeddings, norms and head untouched. quant() here is bitsandbytes' own, called
    directly: the oracle does not go through posttrain's quantizer."""
    F = pytest.importorskip("bitsandbytes.functional", reason="pip install 'posttrain[qlora]'")
    base_dir = model_dirs["llama"]
    r = {"model": base_dir, "device": "cpu", "checkpoint": {"every": 1},
         "stages": [{"method": "sft", "data": {}, "steps": 3, "optim": {"lr": 1e-2},
                     "lora": {**LORA, "quantize": "4bit"}}]}
    posttrain.train(r, out=tmp_path / "run", data=SFT_ROWS, progress=False)
    base = load_file(f"{base_dir}/model.safetensors")
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    adapter = load_file(tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors")
    scale = LORA["alpha"] / LORA["r"]
    kinds = {"adapted": 0, "quantized": 0, "kept": 0}
    for name, w in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = adapter.get(prefix + ".lora_A.weight"), adapter.get(prefix + ".lora_B.weight")
        linear = name.endswith("proj.weight")  # every Linear of a llama block; lm_head is tied to the embeddings
        if not linear:
            kinds["kept"] += 1
            assert torch.equal(final[name], w), name
            continue
        deq = F.dequantize_4bit(*F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        assert (deq - w).abs().max() > 0  # quantization did change the base
        expect = deq.double() + (scale * (b.double() @ a.double()) if a is not None else 0)
        assert torch.allclose(final[name].double(), expect, atol=1e-6, rtol=0), name
        kinds["adapted" if a is not None else "quantized"] += 1
        if a is not None:
            assert b.abs().max() > 0, name  # the adapter learned through the 4-bit layers above it
    assert kinds["adapted"] == 3 * 2 and kinds["quantized"] == 4 * 2 and kinds["kept"] > 0
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))  # adapters only
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a plain model


def test_qlora_without_bitsandbytes_or_on_an_unsupported_device_is_a_clear_error(tmp_path, model_dirs, monkeypatch):
    import sys

    from posttrain.training import lora

    r = {"model": model_dirs["llama"], "device": "cpu", "stages": [{
        "method": "sft", "data": {}, "steps": 1, "lora": {**LORA, "quantize": "4bit"}}]}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(RecipeError, match=r"lora.quantize: '4bit' \(QLoRA\) needs bitsandbytes: pip install "
                                          r"'posttrain\[qlora\]'"):
        posttrain.train(r, out=tmp_path / "run", data=SFT_ROWS, progress=False)
    with pytest.raises(RecipeError, match=r"runs on CUDA GPUs and CPUs, not on mps"):
        lora.quantize_4bit(torch.nn.Linear(2, 2), "mps")


def test_the_reference_reads_the_adapters_off_in_the_chunked_log_probs_too(make_model, tokenizer):
    """Reference (adapters disabled) through token_logprobs' chunked LM head equals its plain forward, and the
    base model before the adapters were attached; the policy with trained adapters differs."""
    from posttrain.logprobs import token_logprobs
    from posttrain.recipe import LoraConfig
    from posttrain.training.lora import attach, reference

    base = make_model("llama")
    ids = torch.randint(0, base.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want, _ = token_logprobs(base, ids, mask, chunk_size=None, chunk_mb=None)
        policy = attach(base, LoraConfig(**LORA), "cpu")
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # adapters that change the outputs
        ref = reference(policy)
        chunked, _ = token_logprobs(ref, ids, mask, chunk_size=2, chunk_mb=None)
        plain, _ = token_logprobs(ref, ids, mask, chunk_size=None, chunk_mb=None)
        adapted, _ = token_logprobs(policy, ids, mask, chunk_size=2, chunk_mb=None)
    torch.testing.assert_close(chunked, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, want, atol=1e-6, rtol=0)
    assert (adapted - want).abs().max() > 1e-3
