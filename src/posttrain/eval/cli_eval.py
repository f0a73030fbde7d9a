"""`posttrain eval`: a model on a dataset (with a verifier) or on built-in task splits."""
from __future__ import annotations

import math

from ..data import detect_format, load_rows, validate
from ..models import load_policy, stop_token_ids
from .task_eval import evaluate_task, reward_metrics


def run_eval(args) -> dict:
    model, tok = load_policy(args.model)
    stop_ids = stop_token_ids(tok, model)
    common = dict(max_new_tokens=args.max_new_tokens, samples=args.samples, temperature=args.temperature,
                  stop_ids=stop_ids, pad_id=tok.pad_token_id, seed=args.seed)
    if args.task:
        splits = args.split or ["id"]
        results = {s: evaluate_task(model, tok, args.task, s, n=args.n or 300, **common) for s in splits}
        return results[splits[0]] if len(splits) == 1 else results
    from ..rewards import RewardScorer, RewardSpec

    rowset = load_rows(args.data)
    fmt = detect_format(rowset, ("prompt_answer", "prompt_only"))
    validate(rowset, fmt)
    rows = rowset.rows[: args.n] if args.n else rowset.rows
    name = args.reward or "math"
    # The verifier runs like a training reward: out of process, with a timeout; a failing sample is unscored.
    with RewardScorer([RewardSpec(fn=name)], timeout_s=args.reward_timeout) as scorer:
        def verifier(prompts, completions, completion_ids, **columns):
            batch = scorer(prompts, completions, columns=columns, completion_ids=completion_ids,
                           row_ids=list(range(len(prompts))))
            return [None if math.isnan(v) else v for v in batch.total.tolist()]

        return reward_metrics(model, tok, rows, {name: verifier}, name, **common)
