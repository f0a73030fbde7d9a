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
@pytest.mark.parametrize("method", ["grpo", "luffy", "prefix_rft", "hpt", "chord_mu"])
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
