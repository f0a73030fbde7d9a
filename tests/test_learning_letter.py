"""GRPO learns a trivially learnable task on a random tiny model within a fixed budget.

Measured (seed = recipe seed, model seed 0, 30 steps, lr 1e-2): mean reward of the last 3 steps
0.96 / 0.95 / 0.54 / 0.91 for seeds 0-3, from ~0.01 at step 1. Threshold 0.3 leaves a margin
below the weakest seed.
"""
import json

import pytest

import posttrain
from letter_rewards import letter_a
from posttrain.models import save_pretrained
from posttrain.tiny import tiny_model

ROWS = [{"prompt": [{"role": "user", "content": "Answer with the letter A."}], "answer": "A"}] * 8


@pytest.mark.parametrize("seed", [0, 2])
def test_grpo_raises_reward_on_letter_task(tmp_path, tokenizer, seed):
    save_pretrained(tiny_model("llama", tokenizer, seed=0), tokenizer, tmp_path / "model",
                    stop_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    recipe = {"model": str(tmp_path / "model"), "seed": seed, "stages": [{
        "method": "grpo", "data": {}, "steps": 30, "optim": {"lr": 1e-2}, "schedule": {"kind": "constant"},
        "batch": {"size": 4}, "rollout": {"group_size": 8, "max_new_tokens": 8}, "kl": {"beta": 0.0}}]}
    posttrain.train(recipe, out=tmp_path / "run", data=ROWS, rewards=[letter_a], progress=False)
    rewards = [json.loads(line)["reward_mean"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rewards) == 30
    assert rewards[0] < 0.05
    assert sum(rewards[-3:]) / 3 > 0.3, rewards
