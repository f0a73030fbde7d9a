"""One GRPO step-time measurement, of posttrain or of TRL, in this process (`bench/run.py` runs them).

Both libraries load the same local model and prompt rows (bench/assets.py) and use identical settings:
`--prompts` prompts x `--group` completions of at most `--new-tokens` tokens per step, temperature 1, top-p 1,
one optimizer update per batch (so no separate pass for the old log-probs), KL beta 0 (no reference model),
group z-scored rewards, clip 0.2, per-sequence token mean (TRL loss_type "grpo", posttrain's grpo preset),
AdamW lr 1e-4 constant, clipping at 1.0, fp32 (bf16 mixed precision on a GPU, `bench.run --device cuda`), no
gradient checkpointing. Reward: bench.rewards.digit_share.

    TRL        GRPOConfig(per_device_train_batch_size = prompts x group, num_generations = group,
               gradient_accumulation_steps 1): generation with transformers' `generate` (KV cache)
    posttrain  method grpo, batch.size = prompts, rollout.group_size = group: its own KV-cached sampler;
               rewards run out of process (its reward worker, a child process)

Measured: the interval between the ends of consecutive optimizer steps after `--warmup` steps (the median step),
completions and generated tokens in those steps (hence completions/s and generated tokens/s), and the tokens of
the training pass (rows x (mean prompt tokens + mean completion length)), for the caller's step MFU.
Prints one BENCH_RESULT line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import device, emit, posttrain_defaults, on_device, setup_threads, share_prompts, step_intervals, \
    trl_checkpointing

LR = 1e-4
REWARD = "bench.rewards:digit_share"


def posttrain_grpo(a, out: str) -> tuple[list[float], list[float], dict]:
    """(step end times, mean completion length per step, notes) of a posttrain GRPO run."""
    import posttrain

    recipe = {
        "model": a.model, "seed": 0, "checkpoint": {"every": 0}, **on_device(),
        "stages": [{
            "method": "grpo", "data": {"path": a.data}, "rewards": [{"fn": REWARD}], "steps": a.steps,
            "optim": {"lr": LR, "max_grad_norm": 1.0}, "schedule": {"kind": "constant"},
            "batch": {"size": a.prompts, "share_prompts": share_prompts()},
            "rollout": {"group_size": a.group, "max_new_tokens": a.new_tokens, "temperature": 1.0, "top_p": 1.0},
            "kl": {"beta": 0.0}, "samples": {"every": 0},
        }],
    }
    summary = posttrain.train(recipe, out=out, progress=False)
    records = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
    records = [r for r in records if "wall_s" in r]
    timed = records[a.warmup :]
    notes = {"t_rollout": _mean(r.get("t_rollout", 0.0) for r in timed),
             "t_reward": _mean(r.get("t_reward", 0.0) for r in timed),
             "t_experience": _mean(r.get("t_experience", 0.0) for r in timed), **posttrain_defaults(),
             "device": summary["device"], "weights_dtype": summary["dtype"]}
    return [r["wall_s"] for r in records], [float(r["response_len"]) for r in records], notes


def trl_grpo(a, out: str) -> tuple[list[float], list[float], dict]:
    """(step end times, mean completion length per step, notes) of a TRL GRPOTrainer run."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.rewards import digit_share

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.prompts * a.group,
        gradient_accumulation_steps=1, num_generations=a.group, max_completion_length=a.new_tokens,
        temperature=1.0, top_p=1.0, beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        num_iterations=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, gradient_checkpointing=False, bf16=device() == "cuda", use_cpu=device() == "cpu",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=a.model, reward_funcs=digit_share, args=args,
                          train_dataset=load_dataset("json", data_files=a.data)["train"],
                          processing_class=AutoTokenizer.from_pretrained(a.model), callbacks=[StepEnds()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = [h["num_tokens"] for h in logs if "num_tokens" in h]
    per_step = (tokens[-1] - tokens[a.warmup - 1]) / (len(tokens) - a.warmup) if len(tokens) > a.warmup else None
    notes = {"trl_num_tokens_per_step": per_step, "checkpointing": trl_checkpointing(trainer),
             "optim": getattr(args.optim, "value", str(args.optim)),
             "weights_dtype": str(trainer.model.dtype).removeprefix("torch.")}
    return ends, [float(h["completions/mean_length"]) for h in logs], notes


def prompt_tokens(model: str, data: str) -> float:
    """Mean tokens of a prompt with the chat template's generation prompt (as both libraries encode it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(l) for l in open(data)][:500]
    ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True) for r in rows]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    return sum(len(x) for x in ids) / len(ids)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(1, len(xs))


def grpo_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The arguments of a GRPO child (this one and profile.py): side, model, data, batch shape, steps."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--side", choices=("posttrain", "trl"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=1)
    return ap


def main() -> None:
    a = grpo_parser(__doc__.splitlines()[0], steps=4).parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as out:
        ends, lengths, notes = (posttrain_grpo if a.side == "posttrain" else trl_grpo)(a, out)
    times = step_intervals(ends, a.warmup)
    rows = a.prompts * a.group
    timed_lengths = lengths[a.warmup : len(ends)]
    completion_len = _mean(timed_lengths)
    step_s = statistics.median(times)  # the median step: one step slowed by another process does not move it
    emit({"side": a.side, "steps_timed": len(times), "step_times": times, "step_s": step_s,
          "completions_per_s": rows / step_s, "completion_len": completion_len,
          "gen_tokens_per_s": statistics.median(rows * n / t for n, t in zip(timed_lengths, times)),
          "gen_tokens_per_step": rows * completion_len,
          "train_tokens_per_step": rows * (prompt_tokens(a.model, a.data) + completion_len), **notes})


if __name__ == "__main__":
    main()
