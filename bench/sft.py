"""One SFT throughput measurement, of posttrain or of TRL, in this process (`bench/run.py` alternates them).

Both train the same local model on the same `text` rows (bench/assets.py), packed into rows of 128 tokens, 8
packed rows per optimizer step, AdamW at a constant lr 1e-4, gradient clipping at 1.0, fp32 (on a GPU, under
`bench.run --device cuda`: bf16 mixed precision on both sides), no gradient checkpointing, no checkpoints, no
evaluation.

    TRL        SFTConfig(packing=True, max_length=128, per_device_train_batch_size=8): best-fit-decreasing packing
               of the whole dataset before training, padding-free rows (one flat sequence with position ids)
    posttrain  method sft, batch.pack: rows, data.max_len 128, batch.size 8: best-fit-decreasing packing of
               each epoch's documents, 2048 at a time, into 128-token rows, padded to the step's longest row
               (posttrain before `pack: rows`: batch.pack: true, batch.size = the documents that fill ~8 x 128
               tokens, packed step by step)

Measured: the wall-clock interval between the ends of consecutive optimizer steps after `--warmup` steps,
the tokens those steps processed (non-padding input tokens), hence tokens/s (the median step's; the overall rate
too); the caller turns tokens/s into MFU (6 N per token). Prints one BENCH_RESULT line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import device, emit, posttrain_defaults, on_device, setup_threads, step_intervals, trl_checkpointing

PACK_LEN, ROWS_PER_STEP, LR = 128, 8, 1e-4


def posttrain_sft(model: str, data: str, steps: int, docs: int, out: str) -> tuple[list[float], list[int], dict]:
    """(step end times, input tokens per step, notes) of a posttrain SFT run."""
    import posttrain

    notes = posttrain_defaults()
    batch = {"size": ROWS_PER_STEP, "pack": "rows"} if notes["pack_rows"] else {"size": docs}
    if notes["has_pack"] and not notes["pack_rows"]:
        batch["pack"] = True
    recipe = {
        "model": model, "seed": 0, "checkpoint": {"every": 0}, **on_device(),
        "stages": [{"method": "sft", "data": {"path": data, "max_len": PACK_LEN}, "steps": steps,
                    "optim": {"lr": LR, "max_grad_norm": 1.0}, "schedule": {"kind": "constant"},
                    "batch": batch, "samples": {"every": 0}}],
    }
    summary = posttrain.train(recipe, out=out, progress=False)
    notes.update(device=summary["device"], weights_dtype=summary["dtype"])
    records = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
    records = [r for r in records if "wall_s" in r]
    ends = [r["wall_s"] for r in records]
    # the non-padding input tokens (where a version does not log them: a text row trains on every token but its
    # first, so loss tokens + documents)
    tokens = [int(r["forward_tokens"]) if "forward_tokens" in r else int(r["trained_tokens"]) + docs
              for r in records]
    return ends, tokens, notes


def trl_sft(model: str, data: str, steps: int, out: str) -> tuple[list[float], list[int], dict]:
    """(step end times, input tokens per step, notes) of a TRL SFTTrainer run."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=ROWS_PER_STEP, packing=True,
        max_length=PACK_LEN, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, gradient_checkpointing=False, bf16=device() == "cuda", use_cpu=device() == "cpu",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                         processing_class=AutoTokenizer.from_pretrained(model), callbacks=[StepEnds()])
    trainer.train()
    cumulative = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    tokens = [int(b - a) for a, b in zip([0] + cumulative[:-1], cumulative)]
    return ends, tokens, {"padding_free": bool(trainer.padding_free), "checkpointing": trl_checkpointing(trainer),
                          "optim": getattr(args.optim, "value", str(args.optim)),
                          "weights_dtype": str(trainer.model.dtype).removeprefix("torch.")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("posttrain", "trl"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--docs", type=int, required=True, help="posttrain without batch.pack: rows: documents per step (fills ~8 x 128 tokens)")
    a = ap.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as out:
        if a.side == "posttrain":
            ends, tokens, notes = posttrain_sft(a.model, a.data, a.steps, a.docs, out)
        else:
            ends, tokens, notes = trl_sft(a.model, a.data, a.steps, out)
    times = step_intervals(ends, a.warmup)
    timed_tokens = tokens[a.warmup : len(ends)]
    # the median step's rate: one step slowed by another process on the shared machine does not move it
    rates = [n / t for n, t in zip(timed_tokens, times)]
    emit({"side": a.side, "steps_timed": len(times), "step_times": times,
          "tokens_per_step": statistics.mean(timed_tokens), "tokens_per_s": statistics.median(rates),
          "tokens_per_s_overall": sum(timed_tokens) / sum(times), **notes})


if __name__ == "__main__":
    main()
