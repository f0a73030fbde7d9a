"""`posttrain eval`: a model on a dataset (with a verifier) or on built-in task splits."""
from __future__ import annotations

import math

from ..data import DataError, detect_format, load_rows, validate
from ..rewards.builtin import completion_text as completion_content
from ..models import load_policy, stop_token_ids
from .task_eval import evaluate_task, reward_metrics


def run_eval(args) -> dict:
    if args.data and not args.reward:  # before the model loads
        raise DataError(args.data, None, None, "name the verifier of this data: --reward exact (the whole answer), "
                        "numeric (the last number), math, code (runs the program against a `tests` column) or "
                        "module:function")
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
    if args.answer_column:  # the reference answer sits in another column (e.g. completion)
        missing = [i + 1 for i, r in enumerate(rowset.rows) if args.answer_column not in r]
        if missing:
            raise DataError(rowset.origin, missing[0], args.answer_column, f"missing (--answer-column; {len(missing)} "
                            "rows lack it)")
        rowset.rows = [{**r, "answer": completion_content(r[args.answer_column])} for r in rowset.rows]
    fmt = detect_format(rowset, ("prompt_answer", "prompt_only"))
    validate(rowset, fmt)
    chat = next((i for i, r in enumerate(rowset.rows) if isinstance(r.get("prompt"), list)), None)
    if chat is not None and not getattr(tok, "chat_template", None):
        raise DataError(rowset.origin, rowset.number(chat), "prompt", f"is a chat (a list of messages), but the "
                        f"tokenizer of {args.model} has no chat template; give it one, or use string prompts")
    rows = rowset.rows[: args.n] if args.n else rowset.rows
    name = args.reward
    # The verifier runs like a training reward: out of process, with a timeout; a failing sample is unscored.
    with RewardScorer([RewardSpec(fn=name)], timeout_s=args.reward_timeout) as scorer:
        def verifier(prompts, completions, completion_ids, **columns):
            batch = scorer(prompts, completions, columns=columns, completion_ids=completion_ids,
                           row_ids=list(range(len(prompts))))
            return [None if math.isnan(v) else v for v in batch.total.tolist()]

        kept: list | None = [] if args.save_samples else None
        result = reward_metrics(model, tok, rows, {name: verifier}, name, threshold=args.threshold, keep=kept,
                                **common)
    if kept is not None:
        from ..jsonio import dumps

        with open(args.save_samples, "w", encoding="utf-8") as f:
            f.writelines(dumps(r, indent=None) + "\n" for r in kept)
    return result
