"""vLLM as the rollout engine (`rollout.engine: vllm`; the `vllm` extra, GPU only), behind the built-in sampler's
interface: token ids in, a `Rollout` (ids, sampler log-probs, truncation) out.

Colocated: one vLLM instance per rank on the rank's own GPU, beside the trainer (under torchrun with vLLM's
external launcher, so it joins the ranks torchrun started instead of spawning its own). Before each step's
sampling the policy's weights are copied into it (`sync`; a LoRA policy sends its weights with the adapters
merged, and a sharded one gathers them whole first). vLLM samples with its own kernels and precision, so its
log-probs are not the trainer's: the stage corrects the advantages by truncated importance weights
(`rollout.correction`, token level unless set), the mismatch is logged as `sampler_mismatch`.

Keyed seeding carries over: each prompt's request gets a seed derived from its rows' keys, so a prompt's samples
do not depend on which rank asked for them (as far as vLLM's kernels are deterministic).

Not verified on hardware yet (no GPU in this project's sessions so far): tests/test_vllm_engine.py checks the
glue on the CPU against a stand-in with vLLM's interface (`LLM.generate` with token-id prompts and
`SamplingParams`, `CompletionOutput.token_ids / logprobs / finish_reason`, the model's `load_weights`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from .sampler import Rollout

log = logging.getLogger("posttrain")

EXTRA = "pip install 'posttrain[vllm]'"


def import_vllm():
    try:
        import vllm
    except ImportError:
        from ..recipe import RecipeError

        raise RecipeError(f"rollout.engine: vllm needs vLLM, the optional `vllm` extra ({EXTRA}; GPU only), or "
                          "rollout.engine: builtin") from None
    return vllm


def check_engines(cfg, device: str) -> None:
    """A stage asking for vLLM: the extra installed and a GPU to run it on, checked before anything loads."""
    if any(s.rollout.engine == "vllm" for s in cfg.stages):
        from ..recipe import RecipeError

        if not device.startswith("cuda"):
            raise RecipeError(f"rollout.engine: vllm runs on a CUDA GPU; this run is on {device} (use "
                              "rollout.engine: builtin)")
        import_vllm()


class VLLMEngine:
    """A colocated vLLM instance serving one policy."""

    def __init__(self, model_path: str, *, dtype: torch.dtype, seed: int, gpu_memory_utilization: float,
                 max_model_len: int | None, distributed: bool):
        vllm = import_vllm()
        self.vllm = vllm
        # token ids in and out: vLLM needs no tokenizer (stop ids are given with each request)
        kw: dict[str, Any] = dict(model=model_path, skip_tokenizer_init=True, dtype=str(dtype).replace("torch.", ""),
                                  seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                                  enable_prefix_caching=True)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        if distributed:  # join torchrun's ranks: one engine per rank, no processes of its own
            kw["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kw)
        log.info("rollout engine: vLLM %s on %s (%.0f %% of the GPU's memory)", getattr(vllm, "__version__", "?"),
                 model_path, 100 * gpu_memory_utilization)

    # ---- weights ------------------------------------------------------------------------------------------------

    def _model(self):
        """The model inside vLLM's in-process engine, whose `load_weights` takes (name, tensor) pairs."""
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        runner = getattr(worker, "model_runner", None)
        model = getattr(runner, "model", None)
        if model is None or not hasattr(model, "load_weights"):
            raise RuntimeError("cannot reach the model inside this vLLM version's engine to copy weights into it "
                               "(expected llm.llm_engine.model_executor.driver_worker[.worker].model_runner.model)")
        return model

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM (names as transformers saves them)."""
        from ..training.world import full_state_dict

        weights = merged_weights(policy) if hasattr(policy, "peft_config") else full_state_dict(policy)
        self._model().load_weights(weights=list(weights.items()))
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached prefixes were computed with the old weights
            reset()

    # ---- sampling -----------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop_ids: Sequence[int], greedy: bool = False,
                 keys: Sequence[int] | None = None) -> Rollout:
        """`num_samples` completions of each prompt, as the built-in sampler returns them (samples of a prompt
        contiguous, the stop id kept, `sampler_logp` each sampled id's log-probability under vLLM)."""
        out = Rollout([], [], [], [], [])
        if not prompts:
            return out
        requests, params = [], []
        for j, p in enumerate(prompts):
            requests.append({"prompt_token_ids": list(p)})
            seed = None if keys is None else int(keys[j * num_samples] % (2 ** 31 - 1))
            params.append(self.vllm.SamplingParams(
                n=num_samples, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens, logprobs=0, stop_token_ids=list(stop_ids), seed=seed,
                skip_special_tokens=False, detokenize=False))
        results = self.llm.generate(requests, params, use_tqdm=False)
        stop = set(stop_ids)
        for j, result in enumerate(results):
            for completion in result.outputs:
                ids = list(completion.token_ids)
                out.prompt_index.append(j)
                out.prompt_ids.append(list(prompts[j]))
                out.completion_ids.append(ids)
                out.sampler_logp.append(torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, ids)],
                                                     dtype=torch.float32))
                out.truncated.append(completion.finish_reason == "length" and not (ids and ids[-1] in stop))
        return out


def merged_weights(policy) -> dict[str, torch.Tensor]:
    """A LoRA policy's weights with the adapters' deltas added, W + s B A (transposed for fan-in-fan-out layers),
    under the base model's names; the policy itself is not touched (merging in place and back would drift its
    weights by rounding at every step). Read from the whole state dict, so a sharded policy's too (collective)."""
    from peft.tuners.lora import Linear as LoraLinear, LoraLayer

    from ..training.world import full_state_dict

    def base_name(name: str) -> str:
        name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        return name.replace(".base_layer", "")

    with torch.no_grad():
        weights = full_state_dict(policy)
        out = {base_name(k): v.detach() for k, v in weights.items() if "lora_" not in k}
        for name, module in policy.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if not isinstance(module, LoraLinear):
                raise ValueError(f"the vLLM engine merges LoRA adapters of linear layers only; {name} is a "
                                 f"{type(module).__name__}")
            key = base_name(name) + ".weight"
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    a, b = (weights[f"{name}.lora_{x}.{adapter}.weight"].float() for x in "AB")
                    delta = (b @ a) * module.scaling[adapter]
                    delta = delta.T if module.fan_in_fan_out else delta
                    out[key] = out[key] + delta.to(out[key].dtype)
    return out
