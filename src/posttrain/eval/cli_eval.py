"""`posttrain eval`: a model on a dataset (with a verifier) or on built-in task splits."""
from __future__ import annotations

from ..data import DataError
from ..models import load_policy, load_tokenizer, resolve_model, stop_token_ids
from .task_eval import evaluate_data, evaluate_task, load_eval_rows


class EvalError(ValueError):
    """A wrong `posttrain eval` command (its verifier), found before the model loads."""


def _checked_data(args) -> list[dict]:
    """The rows to evaluate and their verifier, checked before the model loads: every row valid, the verifier
    importable and callable with the rows' columns as keywords."""
    if not args.reward:
        raise DataError(args.data, None, None, "name the verifier of this data: --reward exact (the whole answer), "
                        "numeric (the last number), math, code (runs the program against a `tests` column) or "
                        "module:function")
    from ..rewards import RewardScorer, RewardSpec, reward_columns

    tok = load_tokenizer(resolve_model(args.model, required_file="tokenizer_config.json"))
    rows = load_eval_rows(args.data, tok, answer_column=args.answer_column, origin=args.model)
    try:
        with RewardScorer([RewardSpec(fn=args.reward)]) as scorer:
            scorer.check_columns(reward_columns(rows))
    except ValueError as e:
        raise EvalError(f"--reward {args.reward}: {e}") from None
    return rows[: args.n] if args.n else rows


def run_eval(args) -> dict:
    rows = _checked_data(args) if args.data else None
    model, tok = load_policy(args.model)
    stop_ids = stop_token_ids(tok, model)
    common = dict(max_new_tokens=args.max_new_tokens, samples=args.samples, temperature=args.temperature,
                  stop_ids=stop_ids, pad_id=tok.pad_token_id, seed=args.seed)
    if args.task:
        splits = args.split or ["id"]
        results = {s: evaluate_task(model, tok, args.task, s, n=args.n or 300, **common) for s in splits}
        return results[splits[0]] if len(splits) == 1 else results
    kept: list | None = [] if args.save_samples else None
    result = evaluate_data(model, tok, rows, args.reward, threshold=args.threshold, reward_timeout=args.reward_timeout,
                           keep=kept, **common)
    if kept is not None:
        from ..jsonio import dumps

        with open(args.save_samples, "w", encoding="utf-8") as f:
            f.writelines(dumps(r, indent=None) + "\n" for r in kept)
    return result
