"""The vLLM rollout engine's glue, on the CPU, against a stand-in with vLLM's interface (tests/test_gpu.py has the
real thing, which needs a GPU and the `vllm` extra): token-id requests and their sampling parameters, the outputs
read back into a Rollout, the policy's weights copied in before each step (a LoRA policy's base once, then its
adapter each step, read back by peft as vLLM would), and a clear error when vLLM or a GPU is missing."""
import copy
import sys
import types
from pathlib import Path

import pytest
import torch

from posttrain.recipe import RecipeError, load_recipe
from posttrain.rollout.sampler import row_key, sample
from posttrain.rollout.vllm_engine import VLLMEngine
from posttrain.tiny import tiny_model


class _Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Inner:
    """What vLLM's engine holds: a model with `load_weights(weights=[(name, tensor)])`."""

    def __init__(self, hf):
        self.hf, self.loads = hf, 0

    def load_weights(self, weights):
        own = self.hf.state_dict()
        for name, t in weights:
            own[name].copy_(t)
        self.loads += 1


def fake_vllm(hf_model, stop_ids):
    """A `vllm` module whose LLM samples with posttrain's own sampler on its copy of the weights (seeded per
    request) and answers in vLLM's output classes' shape."""
    calls = {"init": None, "params": [], "lora": []}

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw
            inner = _Inner(copy.deepcopy(hf_model))
            runner = types.SimpleNamespace(model=inner)
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner))))
            self.inner = inner

        def reset_prefix_cache(self):
            calls["reset"] = calls.get("reset", 0) + 1

        def generate(self, requests, params, use_tqdm=True, lora_request=None):
            model = self.inner.hf
            if lora_request is not None:  # the adapter as vLLM reads it: peft's files in the request's directory
                from peft import PeftModel

                calls["lora"].append(lora_request)
                model = PeftModel.from_pretrained(copy.deepcopy(model), lora_request.lora_path)
            out = []
            for req, p in zip(requests, params):
                calls["params"].append(p)
                ro = sample(model, [req["prompt_token_ids"]], num_samples=p.n, max_new_tokens=p.max_tokens,
                            temperature=max(p.temperature, 1e-6), top_p=p.top_p, stop_ids=p.stop_token_ids, pad_id=0,
                            greedy=p.temperature == 0, keys=[row_key(p.seed, k) for k in range(p.n)])
                outputs = [types.SimpleNamespace(
                    token_ids=ids, finish_reason="stop" if ids and ids[-1] in stop_ids else "length",
                    logprobs=[{t: types.SimpleNamespace(logprob=float(lp))} for t, lp in zip(ids, lps)])
                    for ids, lps in zip(ro.completion_ids, ro.sampler_logp)]
                out.append(types.SimpleNamespace(outputs=outputs))
            return out

    lora_request = types.SimpleNamespace(LoRARequest=lambda name, id_, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=id_, lora_path=path))
    lora = types.SimpleNamespace(request=lora_request)
    return types.SimpleNamespace(LLM=LLM, SamplingParams=_Params, __version__="fake", lora=lora), calls


def _install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.lora", module.lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", module.lora.request)


@pytest.fixture
def stop_ids(tokenizer):
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_asking_for_vllm_without_it_or_without_a_gpu_is_a_clear_error(monkeypatch):
    from posttrain.rollout.vllm_engine import check_engines

    cfg = load_recipe("builtin:grpo", overrides=["stages.0.rollout.engine=vllm"])
    assert cfg.stages[0].rollout.correction == "token"  # vLLM's numbers are not the trainer's: corrected by default
    with pytest.raises(RecipeError, match="runs on a CUDA GPU; this run is on cpu"):
        check_engines(cfg, "cpu")
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(RecipeError, match=r"pip install 'posttrain\[vllm\]'"):
        check_engines(cfg, "cuda")
    check_engines(load_recipe("builtin:grpo"), "cpu")  # the built-in sampler needs neither
    big = load_recipe("builtin:grpo_lora", overrides=["stages.0.rollout.engine=vllm", "stages.0.lora.r=1024"])
    with pytest.raises(RecipeError, match=r"stages.0.lora.r: 1024; vLLM serves adapters of rank 512 at most"):
        check_engines(big, "cuda")


def test_a_grpo_step_through_the_engine(monkeypatch, tokenizer, stop_ids):
    """The trainer's Experience with the engine: weights copied in first, token-id requests with the step's keyed
    seeds, the samples and vLLM's log-probs in the batch, and the correction weights applied (here the stand-in
    is the policy itself, so every weight is 1)."""
    from posttrain.training.experience import Experience

    policy = tiny_model("llama", tokenizer, seed=1)
    module, calls = fake_vllm(tiny_model("llama", tokenizer, seed=2), stop_ids)  # other weights until synced
    _install(monkeypatch, module)
    engine = VLLMEngine("/some/model", dtype=torch.bfloat16, seed=0, gpu_memory_utilization=0.25,
                        max_model_len=None, distributed=False)
    assert calls["init"]["skip_tokenizer_init"] and calls["init"]["dtype"] == "bfloat16"
    stage = load_recipe({"model": "m", "stages": [{
        "method": "grpo", "data": {"path": "x"}, "rewards": [{"fn": "exact"}], "batch": {"size": 2},
        "rollout": {"group_size": 3, "max_new_tokens": 6, "engine": "vllm", "seeding": "row"}}]}).stages[0]
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": "A"} for q in ("Say A.", "Say B.")]

    def scorer(prompts, completions, **kw):
        n = len(completions)
        return types.SimpleNamespace(total=torch.arange(n, dtype=torch.float64) % 2, per_fn={}, errors=[])

    exp = Experience(stage, tokenizer, pad_id=tokenizer.eos_token_id, stop_ids=stop_ids, rows=rows, scorer=scorer,
                     engine=engine, seed=0, ref_model=copy.deepcopy(policy))
    data = exp.make(policy, 0, torch.Generator().manual_seed(0))
    inner = engine.llm.inner.hf
    assert all(torch.equal(a, b) for a, b in zip(inner.state_dict().values(), policy.state_dict().values()))
    assert calls["reset"] == 1
    p = calls["params"][0]
    assert (p.n, p.max_tokens, p.logprobs, p.temperature, p.stop_token_ids) == (3, 6, 0, 1.0, stop_ids)
    assert len(calls["params"]) == 2 and calls["params"][0].seed != calls["params"][1].seed
    batch = data.batch
    assert batch.size == 6 and batch.sampler_logp is not None and batch.old_logp is not None
    own = batch.loss_mask > 0
    torch.testing.assert_close(batch.sampler_logp[own], batch.old_logp[own], atol=1e-5, rtol=0)
    assert data.values["is_weight"] == pytest.approx(1.0, abs=1e-4)


def test_a_lora_policy_sends_its_base_once_then_its_adapter_each_step(monkeypatch, tokenizer, stop_ids):
    """vLLM serves the adapter: the policy's frozen base is loaded once, each step's adapter is saved in peft's
    format under a new LoRARequest (the last step's files removed), and the samples drawn with it are the policy's
    own (vLLM's log-probs equal the trainer's, so every correction weight is 1), before and after the adapter
    changes."""
    from peft import LoraConfig, get_peft_model

    from posttrain.training import lora
    from posttrain.training.experience import Experience

    policy = get_peft_model(tiny_model("llama", tokenizer, seed=1), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    module, calls = fake_vllm(tiny_model("llama", tokenizer, seed=2), stop_ids)
    _install(monkeypatch, module)
    engine = VLLMEngine("/some/model", dtype=torch.float32, seed=0, gpu_memory_utilization=0.25, max_model_len=None,
                        distributed=False, lora_rank=4)
    assert (calls["init"]["enable_lora"], calls["init"]["max_lora_rank"]) == (True, 8)
    stage = load_recipe({"model": "m", "stages": [{
        "method": "grpo", "data": {"path": "x"}, "rewards": [{"fn": "exact"}], "batch": {"size": 2},
        "lora": {"r": 4}, "rollout": {"group_size": 3, "max_new_tokens": 6, "engine": "vllm", "seeding": "row"}}]}
    ).stages[0]
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": "A"} for q in ("Say A.", "Say B.")]

    def scorer(prompts, completions, **kw):
        return types.SimpleNamespace(total=torch.arange(len(completions), dtype=torch.float64) % 2, per_fn={},
                                     errors=[])

    exp = Experience(stage, tokenizer, pad_id=tokenizer.eos_token_id, stop_ids=stop_ids, rows=rows, scorer=scorer,
                     engine=engine, seed=0, ref_model=lora.reference(policy))
    base = {k: v.clone() for k, v in policy.get_base_model().state_dict().items()}
    for step in range(2):
        data = exp.make(policy, step, torch.Generator().manual_seed(0))
        assert engine.llm.inner.loads == 1  # the base went in once, at the first step
        inner = engine.llm.inner.hf.state_dict()
        assert all(torch.equal(inner[k.replace(".base_layer", "")], v) for k, v in base.items() if "lora_" not in k)
        request = calls["lora"][-1]
        assert request.lora_int_id == step + 1
        assert sorted(p.name for p in Path(request.lora_path).parent.iterdir()) == [f"step-{step + 1}"]
        own = data.batch.loss_mask > 0
        torch.testing.assert_close(data.batch.sampler_logp[own], data.batch.old_logp[own], atol=1e-5, rtol=0)
        with torch.no_grad():  # the next step's adapter differs
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.add_(0.5)
    assert calls["lora"][0].lora_path != calls["lora"][1].lora_path
