"""vLLM as the rollout engine (`rollout.engine: vllm`; the `vllm` extra, GPU only), behind the built-in sampler's
interface: token ids in, a `Rollout` (ids, sampler log-probs, truncation) out.

Colocated: one vLLM instance per rank on the rank's own GPU, beside the trainer (under torchrun with vLLM's
external launcher, so it joins the ranks torchrun started instead of spawning its own). Before each step's
sampling the policy's weights are copied into it (`sync`; a sharded policy gathers them whole first). A LoRA
policy sends its adapters only: its frozen base goes in once per stage, then each step's adapter is written to a
temporary directory and named in the requests (vLLM's `enable_lora`, a `LoRARequest` per step). vLLM samples with its own kernels and precision, so its
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
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch

from .sampler import Rollout

log = logging.getLogger("posttrain")

EXTRA = "pip install 'posttrain[vllm]'"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM takes for max_lora_rank


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
        for i, s in enumerate(cfg.stages):
            if s.rollout.engine == "vllm" and s.lora is not None and s.lora.r > LORA_RANKS[-1]:
                raise RecipeError(f"stages.{i}.lora.r: {s.lora.r}; vLLM serves adapters of rank {LORA_RANKS[-1]} "
                                  "at most (use rollout.engine: builtin)")
        import_vllm()


class VLLMEngine:
    """A colocated vLLM instance serving one policy."""

    def __init__(self, model_path: str, *, dtype: torch.dtype, seed: int, gpu_memory_utilization: float,
                 max_model_len: int | None, distributed: bool, lora_rank: int | None = None):
        vllm = import_vllm()
        self.vllm = vllm
        # token ids in and out: vLLM needs no tokenizer (stop ids are given with each request)
        kw: dict[str, Any] = dict(model=model_path, skip_tokenizer_init=True, dtype=str(dtype).replace("torch.", ""),
                                  seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                                  enable_prefix_caching=True)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self._lora = None  # the LoRARequest naming the policy's current adapter (None: a plain policy)
        self._lora_base: weakref.ref | None = None  # the LoRA policy whose frozen base vLLM holds
        if lora_rank:  # a run with LoRA stages: adapters are served by vLLM, not merged into its weights
            from vllm.lora.request import LoRARequest

            self._request = LoRARequest
            self._adapters = tempfile.TemporaryDirectory(prefix="posttrain-lora-")
            self._adapter_step = 0
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= lora_rank))
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
        """Copy the policy's current weights into vLLM (names as transformers saves them); a LoRA policy's adapter
        only, after its frozen base the first time this policy is synced."""
        from ..training.lora import is_lora
        from ..training.world import full_state_dict

        weights = full_state_dict(policy)  # (collective when the policy is sharded)
        if not is_lora(policy):
            self._lora = None
            self._model().load_weights(weights=list(weights.items()))
        else:
            if self._lora_base is None or self._lora_base() is not policy:  # a LoRA stage's first step
                self._model().load_weights(weights=list(base_weights(weights).items()))
                self._lora_base = weakref.ref(policy)
            self._lora = self._save_adapter(policy, weights)
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached prefixes were computed with the old weights
            reset()

    def _save_adapter(self, policy, weights: dict[str, torch.Tensor]):
        """The policy's adapter in peft's format, in a new directory (the last step's removed), as a LoRARequest
        with a new id: vLLM loads it at the next request that names it."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not hasattr(self, "_adapters"):
            raise RuntimeError("this vLLM engine was made without LoRA (lora_rank) and cannot serve an adapter")
        name = policy.active_adapter
        state = get_peft_model_state_dict(policy, state_dict=weights, adapter_name=name)
        self._adapter_step += 1
        path = Path(self._adapters.name) / f"step-{self._adapter_step}"
        path.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
        policy.peft_config[name].save_pretrained(str(path))
        shutil.rmtree(path.parent / f"step-{self._adapter_step - 1}", ignore_errors=True)
        return self._request(f"policy-{self._adapter_step}", self._adapter_step, str(path))

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
        lora = {} if self._lora is None else {"lora_request": self._lora}
        results = self.llm.generate(requests, params, use_tqdm=False, **lora)
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


def base_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA policy's state dict without its adapters, under the base model's names (what vLLM loaded)."""
    def base_name(name: str) -> str:
        name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        return name.replace(".base_layer", "")

    return {base_name(k): v.detach() for k, v in weights.items() if "lora_" not in k}
