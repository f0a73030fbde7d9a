"""The vLLM rollout engine's glue, on the CPU, against a stand-in with vLLM's interface (tests/test_gpu.py has the
real thing, which needs a GPU and the `vllm` extra): token-id requests and their sampling parameters, the outputs
read back into a Rollout, the policy's weights copied in before each step (LoRA merged, under the base names),
and a clear error when vLLM or a GPU is missing."""
import copy
import sys
import types

import pytest
import torch

from posttrain.recipe import RecipeError, load_recipe
from posttrain.rollout.sampler import row_key, sample
from posttrain.rollout.vllm_engine import VLLMEngine, merged_weights
from posttrain.tiny import tiny_model


class _Params:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Inner:
    """What vLLM's engine holds: a model with `load_weights(weights=[(name, tensor)])`."""

    def __init__(self, hf):
        self.hf = hf

    def load_weights(self, weights):
        own = self.hf.state_dict()
        for name, t in weights:
            own[name].copy_(t)


def fake_vllm(hf_model, stop_ids):
    """A `vllm` module whose LLM samples with posttrain's own sampler on its copy of the weights (seeded per
    request) and answers in vLLM's output classes' shape."""
    calls = {"init": None, "params": []}

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

        def generate(self, requests, params, use_tqdm=True):
            out = []
            for req, p in zip(requests, params):
                calls["params"].append(p)
                ro = sample(self.inner.hf, [req["prompt_token_ids"]], num_samples=p.n, max_new_tokens=p.max_tokens,
                            temperature=max(p.temperature, 1e-6), top_p=p.top_p, stop_ids=p.stop_token_ids, pad_id=0,
                            greedy=p.temperature == 0, keys=[row_key(p.seed, k) for k in range(p.n)])
                outputs = [types.SimpleNamespace(
                    token_ids=ids, finish_reason="stop" if ids and ids[-1] in stop_ids else "length",
                    logprobs=[{t: types.SimpleNamespace(logprob=float(lp))} for t, lp in zip(ids, lps)])
                    for ids, lps in zip(ro.completion_ids, ro.sampler_logp)]
                out.append(types.SimpleNamespace(outputs=outputs))
            return out

    return types.SimpleNamespace(LLM=LLM, SamplingParams=_Params, __version__="fake"), calls


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


def test_a_grpo_step_through_the_engine(monkeypatch, tokenizer, stop_ids):
    """The trainer's Experience with the engine: weights copied in first, token-id requests with the step's keyed
    seeds, the samples and vLLM's log-probs in the batch, and the correction weights applied (here the stand-in
    is the policy itself, so every weight is 1)."""
    from posttrain.training.experience import Experience

    policy = tiny_model("llama", tokenizer, seed=1)
    module, calls = fake_vllm(tiny_model("llama", tokenizer, seed=2), stop_ids)  # other weights until synced
    monkeypatch.setitem(sys.modules, "vllm", module)
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


def test_lora_weights_go_in_merged_under_the_base_names(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", tokenizer, seed=3)
    names = set(base.state_dict())
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    weights = merged_weights(policy)
    assert set(weights) == names
    want = copy.deepcopy(policy).merge_and_unload().state_dict()
    for k in names:
        torch.testing.assert_close(weights[k], want[k])
    assert any(not torch.equal(weights[k], base.state_dict()[k]) for k in names if "q_proj" in k)
    for k, v in policy.state_dict().items():  # the policy is left unmerged
        assert torch.equal(v, before[k])
